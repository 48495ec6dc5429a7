-- The inputs each campaign was enqueued from, one row per distinct input (by
-- the SHA-256 of its bytes). termination_campaigns.request_count is the sum of
-- these rows' counts: enqueueing the same file again into a campaign finds its
-- row and adds nothing; a different file under the same --campaign adds its own.
CREATE TABLE termination_campaign_inputs (
    campaign_id    text NOT NULL REFERENCES termination_campaigns (id),
    input_sha256   text NOT NULL,
    -- The file enqueued, or 'stdin'.
    source         text,
    requested_by   text,
    request_count  bigint NOT NULL,
    enqueued_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, input_sha256)
);

-- `report --campaigns` lists the most recent first.
CREATE INDEX termination_campaigns_created_at_idx ON termination_campaigns (created_at);
