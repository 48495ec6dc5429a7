-- A request sent again from the dead-letter queue gets a fresh request_id;
-- replay_of names the request it replays, so the audit keeps both.
ALTER TABLE termination_outcomes ADD COLUMN replay_of text;
ALTER TABLE termination_outcome_history ADD COLUMN replay_of text;
CREATE INDEX termination_outcomes_replay_of_idx ON termination_outcomes (replay_of)
    WHERE replay_of IS NOT NULL;

CREATE OR REPLACE FUNCTION termination_outcomes_keep_superseded() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO termination_outcome_history
        (why, request_id, project_id, workflow_id, execution_id, outcome, http_status,
         error_code, error_msg, attempts, reason, requested_by, received_at, finished_at,
         redelivered, message_id, replay_of)
    VALUES
        ('superseded', OLD.request_id, OLD.project_id, OLD.workflow_id, OLD.execution_id,
         OLD.outcome, OLD.http_status, OLD.error_code, OLD.error_msg, OLD.attempts, OLD.reason,
         OLD.requested_by, OLD.received_at, OLD.finished_at, OLD.redelivered, OLD.message_id,
         OLD.replay_of);
    RETURN NEW;
END
$$;
