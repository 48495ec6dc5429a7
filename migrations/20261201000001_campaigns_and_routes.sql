-- Campaigns (one mass cancellation, as `enqueue` starts it) and the route of
-- each attempt (issue 15: which region and endpoint host a call went to).

-- One row per campaign. `id` is `enqueue --campaign NAME`, or derived from the
-- hash of the file enqueued, so re-enqueueing the same file is the same campaign.
CREATE TABLE termination_campaigns (
    id             text PRIMARY KEY,
    requested_by   text,
    -- The file enqueued, or 'stdin'.
    source         text,
    request_count  bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    note           text
);

-- The campaign a request belongs to (null for messages that carry none).
ALTER TABLE termination_outcomes ADD COLUMN campaign_id text;
ALTER TABLE termination_outcome_history ADD COLUMN campaign_id text;
ALTER TABLE termination_attempts ADD COLUMN campaign_id text;
CREATE INDEX termination_outcomes_campaign_idx ON termination_outcomes (campaign_id, finished_at)
    WHERE campaign_id IS NOT NULL;

-- Where each attempt went: the region it was routed to (null when the
-- endpoint has no {region}) and the host of the endpoint.
ALTER TABLE termination_attempts ADD COLUMN region text;
ALTER TABLE termination_attempts ADD COLUMN endpoint_host text;

CREATE OR REPLACE FUNCTION termination_outcomes_keep_superseded() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO termination_outcome_history
        (why, request_id, project_id, workflow_id, execution_id, outcome, http_status,
         error_code, error_msg, attempts, reason, requested_by, received_at, finished_at,
         redelivered, message_id, replay_of, campaign_id)
    VALUES
        ('superseded', OLD.request_id, OLD.project_id, OLD.workflow_id, OLD.execution_id,
         OLD.outcome, OLD.http_status, OLD.error_code, OLD.error_msg, OLD.attempts, OLD.reason,
         OLD.requested_by, OLD.received_at, OLD.finished_at, OLD.redelivered, OLD.message_id,
         OLD.replay_of, OLD.campaign_id);
    RETURN NEW;
END
$$;
