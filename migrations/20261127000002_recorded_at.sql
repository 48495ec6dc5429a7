-- When the audit row was written (the flush that committed it), as opposed to
-- finished_at (when the outcome was known). The benchmark's latency and an
-- auditor's "when did we know" both read it.
ALTER TABLE termination_outcomes
    ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT clock_timestamp();
