-- The audit of aom-terminator: every HTTP attempt, and one final outcome per
-- request_id. People query these tables with plain SQL; column names are a
-- public contract.

CREATE TABLE termination_outcomes (
    request_id           text PRIMARY KEY,
    project_id           text,
    workflow_id          text,
    execution_id         text,
    outcome              text NOT NULL CHECK (outcome IN
                             ('succeeded', 'failed_permanent', 'failed_retries_exhausted', 'rejected')),
    http_status          integer,
    error_code           text,
    error_msg            text,
    attempts             integer NOT NULL DEFAULT 0,
    reason               text,
    requested_by         text,
    received_at          timestamptz NOT NULL,
    finished_at          timestamptz NOT NULL,
    -- The message carrying the request had been delivered before (AMQP
    -- redelivered flag): an earlier daemon may have called the API for it.
    redelivered          boolean NOT NULL DEFAULT false,
    -- Deliveries of this request_id acked without an API call because the
    -- request already had its final outcome.
    skipped_redeliveries integer NOT NULL DEFAULT 0,
    message_id           text
);

CREATE INDEX termination_outcomes_outcome_idx ON termination_outcomes (outcome);
CREATE INDEX termination_outcomes_finished_at_idx ON termination_outcomes (finished_at);
CREATE INDEX termination_outcomes_workflow_idx ON termination_outcomes (project_id, workflow_id);

CREATE TABLE termination_attempts (
    id            bigserial PRIMARY KEY,
    request_id    text NOT NULL,
    attempt       integer NOT NULL,
    http_status   integer,
    error_kind    text,
    error_code    text,
    error_msg     text,
    body_excerpt  text,
    started_at    timestamptz NOT NULL,
    latency_ms    double precision NOT NULL
);

CREATE INDEX termination_attempts_request_idx ON termination_attempts (request_id, attempt);
CREATE INDEX termination_attempts_started_at_idx ON termination_attempts (started_at);

-- Verdicts that are not (or no longer) the current one: a rejection replaced
-- by a later valid request with the same id ('superseded'), a rejection of an
-- id that already had a final outcome ('rejected_after_final'), and a second
-- final outcome for an id that already had one ('duplicate': two daemons or a
-- crash sent it twice).
CREATE TABLE termination_outcome_history (
    id                   bigserial PRIMARY KEY,
    why                  text NOT NULL,
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    request_id           text NOT NULL,
    project_id           text,
    workflow_id          text,
    execution_id         text,
    outcome              text NOT NULL,
    http_status          integer,
    error_code           text,
    error_msg            text,
    attempts             integer NOT NULL,
    reason               text,
    requested_by         text,
    received_at          timestamptz NOT NULL,
    finished_at          timestamptz NOT NULL,
    redelivered          boolean NOT NULL,
    message_id           text
);

CREATE INDEX termination_outcome_history_request_idx ON termination_outcome_history (request_id);

CREATE FUNCTION termination_outcomes_keep_superseded() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO termination_outcome_history
        (why, request_id, project_id, workflow_id, execution_id, outcome, http_status,
         error_code, error_msg, attempts, reason, requested_by, received_at, finished_at,
         redelivered, message_id)
    VALUES
        ('superseded', OLD.request_id, OLD.project_id, OLD.workflow_id, OLD.execution_id,
         OLD.outcome, OLD.http_status, OLD.error_code, OLD.error_msg, OLD.attempts, OLD.reason,
         OLD.requested_by, OLD.received_at, OLD.finished_at, OLD.redelivered, OLD.message_id);
    RETURN NEW;
END
$$;

CREATE TRIGGER termination_outcomes_superseded
    AFTER UPDATE OF outcome ON termination_outcomes
    FOR EACH ROW WHEN (OLD.outcome = 'rejected')
    EXECUTE FUNCTION termination_outcomes_keep_superseded();
