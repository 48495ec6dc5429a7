-- Rollups of the audit (issue 17): reports that do not grow with it, and
-- totals that survive a prune. Maintained by statement-level triggers with
-- transition tables, so every writer counts: the daemon, a second daemon, a
-- hand-written INSERT or UPDATE. Deleting rows (prune) leaves them as they
-- are: a rollup keeps what was recorded.
--
-- Both rollups are keyed by the hour (date_bin, so the hour does not depend on
-- the session's TimeZone) and by the report's filters. Rows are added to with
-- INSERT ... ON CONFLICT DO UPDATE SET n = n + EXCLUDED.n, in key order, so two
-- writers at once neither lose an increment nor lock rows in opposite orders.
-- NULLS NOT DISTINCT (Postgres 15) lets a null dimension be one key.

-- An attempt's own row carries the report's dimensions, so its rollup does not
-- depend on whether (or when) its request's outcome is written.
ALTER TABLE termination_attempts ADD COLUMN project_id text;
ALTER TABLE termination_attempts ADD COLUMN workflow_id text;
ALTER TABLE termination_attempts ADD COLUMN requested_by text;

-- Attempts written before this migration carry no project, workflow or
-- requested_by: take them from their request's outcome.
UPDATE termination_attempts a
SET project_id = o.project_id, workflow_id = o.workflow_id, requested_by = o.requested_by
FROM termination_outcomes o
WHERE o.request_id = a.request_id;

-- Final outcomes per hour of finished_at.
CREATE TABLE termination_rollup_outcomes (
    hour          timestamptz NOT NULL,
    project_id    text,
    workflow_id   text,
    requested_by  text,
    campaign_id   text,
    outcome       text NOT NULL,
    http_status   integer,
    error_code    text,
    requests      bigint NOT NULL,
    CONSTRAINT termination_rollup_outcomes_key UNIQUE NULLS NOT DISTINCT
        (hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code)
);

-- Attempts per hour of started_at. `calls` are the attempts that got an HTTP
-- answer; their latencies are counted in cumulative buckets as Prometheus
-- keeps a histogram: le_Xms counts the calls that took at most X ms, and
-- `calls` is the +Inf bucket. The bounds are termination_latency_bounds_ms().
CREATE TABLE termination_rollup_attempts (
    hour            timestamptz NOT NULL,
    project_id      text,
    workflow_id     text,
    requested_by    text,
    campaign_id     text,
    attempts        bigint NOT NULL,
    calls           bigint NOT NULL,
    latency_ms_sum  double precision NOT NULL,

    le_1ms bigint NOT NULL,
    le_2ms bigint NOT NULL,
    le_3ms bigint NOT NULL,
    le_5ms bigint NOT NULL,
    le_7ms bigint NOT NULL,
    le_10ms bigint NOT NULL,
    le_15ms bigint NOT NULL,
    le_20ms bigint NOT NULL,
    le_30ms bigint NOT NULL,
    le_50ms bigint NOT NULL,
    le_70ms bigint NOT NULL,
    le_100ms bigint NOT NULL,
    le_150ms bigint NOT NULL,
    le_200ms bigint NOT NULL,
    le_300ms bigint NOT NULL,
    le_500ms bigint NOT NULL,
    le_700ms bigint NOT NULL,
    le_1000ms bigint NOT NULL,
    le_1500ms bigint NOT NULL,
    le_2000ms bigint NOT NULL,
    le_3000ms bigint NOT NULL,
    le_5000ms bigint NOT NULL,
    le_7000ms bigint NOT NULL,
    le_10000ms bigint NOT NULL,
    le_15000ms bigint NOT NULL,
    le_20000ms bigint NOT NULL,
    le_30000ms bigint NOT NULL,
    le_60000ms bigint NOT NULL,
    CONSTRAINT termination_rollup_attempts_key UNIQUE NULLS NOT DISTINCT
        (hour, project_id, workflow_id, requested_by, campaign_id)
);

-- A campaign's errors (`report --campaign`) read its rows alone.
CREATE INDEX termination_rollup_outcomes_campaign_idx
    ON termination_rollup_outcomes (campaign_id) WHERE campaign_id IS NOT NULL;

CREATE FUNCTION termination_latency_bounds_ms() RETURNS double precision[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY[1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000, 7000, 10000, 15000, 20000, 30000, 60000]::double precision[]
$$;

-- The buckets of a rollup row (or of sums of rows) as one array, in the order
-- of termination_latency_bounds_ms().
CREATE FUNCTION termination_latency_quantile(q double precision, le bigint[], calls bigint)
RETURNS double precision LANGUAGE plpgsql IMMUTABLE AS $$
-- As Prometheus' histogram_quantile: find the bucket that holds the rank,
-- interpolate linearly within it; a rank past the last bound answers that bound.
DECLARE
    bounds double precision[] := termination_latency_bounds_ms();
    rank double precision;
    lower double precision := 0;
    below bigint := 0;
BEGIN
    IF calls IS NULL OR calls <= 0 THEN
        RETURN NULL;
    END IF;
    rank := q * calls;
    FOR i IN 1 .. array_length(bounds, 1) LOOP
        IF le[i] >= rank THEN
            IF le[i] = below THEN
                RETURN bounds[i];
            END IF;
            RETURN lower + (bounds[i] - lower) * (rank - below) / (le[i] - below);
        END IF;
        lower := bounds[i];
        below := le[i];
    END LOOP;
    RETURN bounds[array_length(bounds, 1)];
END
$$;

-- New outcomes count in their key.
CREATE FUNCTION termination_rollup_outcomes_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO termination_rollup_outcomes AS r
        (hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code, requests)
    SELECT date_bin('1 hour', finished_at, timestamptz '2000-01-01 00:00:00+00'),
           project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code, count(*)
    FROM changed
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT ON CONSTRAINT termination_rollup_outcomes_key
    DO UPDATE SET requests = r.requests + EXCLUDED.requests;
    RETURN NULL;
END
$$;

-- An update of outcomes moves each row from its old key to its new one (a
-- `rejected` outcome superseded by a valid request). The daemon's upsert fires
-- this on every flush, mostly with no row updated: that case returns at once;
-- an update that keeps the key (skipped_redeliveries) nets to nothing.
CREATE FUNCTION termination_rollup_outcomes_move() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows) THEN
        RETURN NULL;
    END IF;
    INSERT INTO termination_rollup_outcomes AS r
        (hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status,
         error_code, requests)
    SELECT date_bin('1 hour', finished_at, timestamptz '2000-01-01 00:00:00+00'),
           project_id, workflow_id, requested_by, campaign_id, outcome, http_status,
           error_code, sum(sign)
    FROM (SELECT n.*, 1 AS sign FROM new_rows n
          UNION ALL
          SELECT o.*, -1 AS sign FROM old_rows o) c
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    HAVING sum(sign) <> 0
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT ON CONSTRAINT termination_rollup_outcomes_key
    DO UPDATE SET requests = r.requests + EXCLUDED.requests;
    RETURN NULL;
END
$$;

-- Attempts, for inserts and for both sides of an update (rare: attempts are
-- only ever inserted by the daemon): TG_ARGV[0] is +1 for the rows in
-- `changed` as they are now, -1 for the rows an update replaced.
CREATE FUNCTION termination_rollup_attempts_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    sign bigint := TG_ARGV[0]::bigint;
BEGIN
    INSERT INTO termination_rollup_attempts AS r
        (hour, project_id, workflow_id, requested_by, campaign_id, attempts, calls, latency_ms_sum,
         le_1ms, le_2ms, le_3ms, le_5ms, le_7ms, le_10ms, le_15ms, le_20ms, le_30ms, le_50ms, le_70ms, le_100ms, le_150ms, le_200ms, le_300ms, le_500ms, le_700ms, le_1000ms, le_1500ms, le_2000ms, le_3000ms, le_5000ms, le_7000ms, le_10000ms, le_15000ms, le_20000ms, le_30000ms, le_60000ms)
    SELECT date_bin('1 hour', started_at, timestamptz '2000-01-01 00:00:00+00'),
           project_id, workflow_id, requested_by, campaign_id,
           sign * count(*),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL),
           sign * coalesce(sum(latency_ms) FILTER (WHERE http_status IS NOT NULL), 0),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 1),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 2),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 3),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 5),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 7),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 10),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 15),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 20),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 30),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 50),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 70),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 100),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 150),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 200),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 300),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 500),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 700),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 1000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 1500),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 2000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 3000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 5000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 7000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 10000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 15000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 20000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 30000),
           sign * count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 60000)
    FROM changed
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT ON CONSTRAINT termination_rollup_attempts_key
    DO UPDATE SET attempts = r.attempts + EXCLUDED.attempts,
        calls = r.calls + EXCLUDED.calls,
        latency_ms_sum = r.latency_ms_sum + EXCLUDED.latency_ms_sum,

        le_1ms = r.le_1ms + EXCLUDED.le_1ms,
        le_2ms = r.le_2ms + EXCLUDED.le_2ms,
        le_3ms = r.le_3ms + EXCLUDED.le_3ms,
        le_5ms = r.le_5ms + EXCLUDED.le_5ms,
        le_7ms = r.le_7ms + EXCLUDED.le_7ms,
        le_10ms = r.le_10ms + EXCLUDED.le_10ms,
        le_15ms = r.le_15ms + EXCLUDED.le_15ms,
        le_20ms = r.le_20ms + EXCLUDED.le_20ms,
        le_30ms = r.le_30ms + EXCLUDED.le_30ms,
        le_50ms = r.le_50ms + EXCLUDED.le_50ms,
        le_70ms = r.le_70ms + EXCLUDED.le_70ms,
        le_100ms = r.le_100ms + EXCLUDED.le_100ms,
        le_150ms = r.le_150ms + EXCLUDED.le_150ms,
        le_200ms = r.le_200ms + EXCLUDED.le_200ms,
        le_300ms = r.le_300ms + EXCLUDED.le_300ms,
        le_500ms = r.le_500ms + EXCLUDED.le_500ms,
        le_700ms = r.le_700ms + EXCLUDED.le_700ms,
        le_1000ms = r.le_1000ms + EXCLUDED.le_1000ms,
        le_1500ms = r.le_1500ms + EXCLUDED.le_1500ms,
        le_2000ms = r.le_2000ms + EXCLUDED.le_2000ms,
        le_3000ms = r.le_3000ms + EXCLUDED.le_3000ms,
        le_5000ms = r.le_5000ms + EXCLUDED.le_5000ms,
        le_7000ms = r.le_7000ms + EXCLUDED.le_7000ms,
        le_10000ms = r.le_10000ms + EXCLUDED.le_10000ms,
        le_15000ms = r.le_15000ms + EXCLUDED.le_15000ms,
        le_20000ms = r.le_20000ms + EXCLUDED.le_20000ms,
        le_30000ms = r.le_30000ms + EXCLUDED.le_30000ms,
        le_60000ms = r.le_60000ms + EXCLUDED.le_60000ms;
    RETURN NULL;
END
$$;

-- An audit that predates the rollups: fold what it holds.
INSERT INTO termination_rollup_outcomes
    (hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code, requests)
SELECT date_bin('1 hour', finished_at, timestamptz '2000-01-01 00:00:00+00'),
       project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code, count(*)
FROM termination_outcomes
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;

INSERT INTO termination_rollup_attempts
    (hour, project_id, workflow_id, requested_by, campaign_id, attempts, calls, latency_ms_sum,
     le_1ms, le_2ms, le_3ms, le_5ms, le_7ms, le_10ms, le_15ms, le_20ms, le_30ms, le_50ms, le_70ms, le_100ms, le_150ms, le_200ms, le_300ms, le_500ms, le_700ms, le_1000ms, le_1500ms, le_2000ms, le_3000ms, le_5000ms, le_7000ms, le_10000ms, le_15000ms, le_20000ms, le_30000ms, le_60000ms)
SELECT date_bin('1 hour', started_at, timestamptz '2000-01-01 00:00:00+00'),
       project_id, workflow_id, requested_by, campaign_id,
       count(*),
       count(*) FILTER (WHERE http_status IS NOT NULL),
       coalesce(sum(latency_ms) FILTER (WHERE http_status IS NOT NULL), 0),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 1),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 2),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 3),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 5),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 7),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 10),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 15),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 20),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 30),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 50),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 70),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 100),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 150),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 200),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 300),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 500),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 700),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 1000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 1500),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 2000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 3000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 5000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 7000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 10000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 15000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 20000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 30000),
       count(*) FILTER (WHERE http_status IS NOT NULL AND latency_ms <= 60000)
FROM termination_attempts
GROUP BY 1, 2, 3, 4, 5;

-- A trigger with transition tables serves one event. The attempts' update
-- has two triggers: the rows it replaced go out, the rows it wrote come in.
CREATE TRIGGER termination_outcomes_rollup_insert
    AFTER INSERT ON termination_outcomes REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION termination_rollup_outcomes_add();
CREATE TRIGGER termination_outcomes_rollup_update
    AFTER UPDATE ON termination_outcomes REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION termination_rollup_outcomes_move();

CREATE TRIGGER termination_attempts_rollup_insert
    AFTER INSERT ON termination_attempts REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION termination_rollup_attempts_apply('1');
CREATE TRIGGER termination_attempts_rollup_update_new
    AFTER UPDATE ON termination_attempts REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION termination_rollup_attempts_apply('1');
CREATE TRIGGER termination_attempts_rollup_update_old
    AFTER UPDATE ON termination_attempts REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION termination_rollup_attempts_apply('-1');

-- Every prune: its cut and what it removed. Rows older than the latest cut
-- are gone, so `report` answers a window that starts before it from the
-- rollups alone, from the start of that hour.
CREATE TABLE termination_prunes (
    id                bigserial PRIMARY KEY,
    cut               timestamptz NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    outcomes_removed  bigint NOT NULL DEFAULT 0,
    attempts_removed  bigint NOT NULL DEFAULT 0,
    history_removed   bigint NOT NULL DEFAULT 0
);

-- Prune removes verdicts by age too.
CREATE INDEX termination_outcome_history_finished_at_idx
    ON termination_outcome_history (finished_at);

-- The rollups in readable form, one row per hour, project, workflow,
-- requested_by and campaign (a public contract). Quantiles come from the
-- hour's buckets; they do not add up across rows.
CREATE VIEW termination_summary AS
SELECT hour, project_id, workflow_id, requested_by, campaign_id,
       coalesce(sum(requests), 0)::bigint AS requests,
       coalesce(sum(requests) FILTER (WHERE outcome = 'succeeded'), 0)::bigint AS succeeded,
       coalesce(sum(requests) FILTER (WHERE outcome = 'failed_permanent'), 0)::bigint
           AS failed_permanent,
       coalesce(sum(requests) FILTER (WHERE outcome = 'failed_retries_exhausted'), 0)::bigint
           AS failed_retries_exhausted,
       coalesce(sum(requests) FILTER (WHERE outcome = 'rejected'), 0)::bigint AS rejected,
       coalesce(sum(attempts), 0)::bigint AS attempts,
       coalesce(sum(calls), 0)::bigint AS api_calls,
       termination_latency_quantile(0.5, ARRAY[sum(le_1ms), sum(le_2ms), sum(le_3ms), sum(le_5ms), sum(le_7ms), sum(le_10ms), sum(le_15ms), sum(le_20ms), sum(le_30ms), sum(le_50ms), sum(le_70ms), sum(le_100ms), sum(le_150ms), sum(le_200ms), sum(le_300ms), sum(le_500ms), sum(le_700ms), sum(le_1000ms), sum(le_1500ms), sum(le_2000ms), sum(le_3000ms), sum(le_5000ms), sum(le_7000ms), sum(le_10000ms), sum(le_15000ms), sum(le_20000ms), sum(le_30000ms), sum(le_60000ms)]::bigint[], sum(calls)::bigint)
           AS latency_p50_ms,
       termination_latency_quantile(0.95, ARRAY[sum(le_1ms), sum(le_2ms), sum(le_3ms), sum(le_5ms), sum(le_7ms), sum(le_10ms), sum(le_15ms), sum(le_20ms), sum(le_30ms), sum(le_50ms), sum(le_70ms), sum(le_100ms), sum(le_150ms), sum(le_200ms), sum(le_300ms), sum(le_500ms), sum(le_700ms), sum(le_1000ms), sum(le_1500ms), sum(le_2000ms), sum(le_3000ms), sum(le_5000ms), sum(le_7000ms), sum(le_10000ms), sum(le_15000ms), sum(le_20000ms), sum(le_30000ms), sum(le_60000ms)]::bigint[], sum(calls)::bigint)
           AS latency_p95_ms,
       termination_latency_quantile(0.99, ARRAY[sum(le_1ms), sum(le_2ms), sum(le_3ms), sum(le_5ms), sum(le_7ms), sum(le_10ms), sum(le_15ms), sum(le_20ms), sum(le_30ms), sum(le_50ms), sum(le_70ms), sum(le_100ms), sum(le_150ms), sum(le_200ms), sum(le_300ms), sum(le_500ms), sum(le_700ms), sum(le_1000ms), sum(le_1500ms), sum(le_2000ms), sum(le_3000ms), sum(le_5000ms), sum(le_7000ms), sum(le_10000ms), sum(le_15000ms), sum(le_20000ms), sum(le_30000ms), sum(le_60000ms)]::bigint[], sum(calls)::bigint)
           AS latency_p99_ms
FROM (
    SELECT hour, project_id, workflow_id, requested_by, campaign_id, outcome, requests,
           NULL::bigint AS attempts, NULL::bigint AS calls,
           NULL::bigint AS le_1ms, NULL::bigint AS le_2ms, NULL::bigint AS le_3ms, NULL::bigint AS le_5ms, NULL::bigint AS le_7ms, NULL::bigint AS le_10ms, NULL::bigint AS le_15ms, NULL::bigint AS le_20ms, NULL::bigint AS le_30ms, NULL::bigint AS le_50ms, NULL::bigint AS le_70ms, NULL::bigint AS le_100ms, NULL::bigint AS le_150ms, NULL::bigint AS le_200ms, NULL::bigint AS le_300ms, NULL::bigint AS le_500ms, NULL::bigint AS le_700ms, NULL::bigint AS le_1000ms, NULL::bigint AS le_1500ms, NULL::bigint AS le_2000ms, NULL::bigint AS le_3000ms, NULL::bigint AS le_5000ms, NULL::bigint AS le_7000ms, NULL::bigint AS le_10000ms, NULL::bigint AS le_15000ms, NULL::bigint AS le_20000ms, NULL::bigint AS le_30000ms, NULL::bigint AS le_60000ms
    FROM termination_rollup_outcomes
    UNION ALL
    SELECT hour, project_id, workflow_id, requested_by, campaign_id, NULL, NULL, attempts, calls,
           le_1ms, le_2ms, le_3ms, le_5ms, le_7ms, le_10ms, le_15ms, le_20ms, le_30ms, le_50ms, le_70ms, le_100ms, le_150ms, le_200ms, le_300ms, le_500ms, le_700ms, le_1000ms, le_1500ms, le_2000ms, le_3000ms, le_5000ms, le_7000ms, le_10000ms, le_15000ms, le_20000ms, le_30000ms, le_60000ms
    FROM termination_rollup_attempts
) r
GROUP BY hour, project_id, workflow_id, requested_by, campaign_id;
