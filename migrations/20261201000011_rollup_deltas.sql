-- The rollups' triggers append, a fold adds (issue 17, "the daemon does not
-- slow down"). Upserting the rollup rows from every statement made each
-- daemon flush probe the unique index and write a new version of the same
-- hot rows (the current hour's keys), thousands of times a second: singles
-- against a fast API lost ~11 % of their rate. Now each trigger appends its
-- statement's aggregate to an unindexed delta table (no index probe, no row
-- lock, no update), and termination_rollup_fold() moves the deltas into the
-- rollups: the daemon calls it every few seconds, and `report` and
-- `audit prune` before they read. termination_summary adds the deltas not yet
-- folded, so SQL over it is exact too.
--
-- The deltas have the rollups' columns (LIKE copies the NOT NULLs, not the
-- unique key): one row per statement and key, signed like the rollups'.

CREATE TABLE termination_rollup_outcomes_delta (LIKE termination_rollup_outcomes);
CREATE TABLE termination_rollup_attempts_delta (LIKE termination_rollup_attempts);

CREATE OR REPLACE FUNCTION termination_rollup_outcomes_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO termination_rollup_outcomes_delta
        (hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code, requests)
    SELECT date_bin('1 hour', finished_at, timestamptz '2000-01-01 00:00:00+00'),
           project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code, count(*)
    FROM changed
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION termination_rollup_outcomes_move() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows) THEN
        RETURN NULL;
    END IF;
    INSERT INTO termination_rollup_outcomes_delta
        (hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status,
         error_code, requests)
    SELECT date_bin('1 hour', finished_at, timestamptz '2000-01-01 00:00:00+00'),
           project_id, workflow_id, requested_by, campaign_id, outcome, http_status,
           error_code, sum(sign)
    FROM (SELECT n.*, 1 AS sign FROM new_rows n
          UNION ALL
          SELECT o.*, -1 AS sign FROM old_rows o) c
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    HAVING sum(sign) <> 0;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION termination_rollup_attempts_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    sign bigint := TG_ARGV[0]::bigint;
BEGIN
    INSERT INTO termination_rollup_attempts_delta
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
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END
$$;

-- Move every delta into its rollup; returns how many delta rows it folded.
-- Each DELETE takes the rows it removes: a second fold at the same time
-- waits on them and then finds them gone, so no delta is added twice, and a
-- delta appended meanwhile stays for the next fold. The upserts go in key
-- order, so two folds never lock rollup rows in opposite orders.
CREATE FUNCTION termination_rollup_fold() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    outcome_rows bigint;
    attempt_rows bigint;
BEGIN
    WITH d AS (DELETE FROM termination_rollup_outcomes_delta RETURNING *),
    folded AS (
        INSERT INTO termination_rollup_outcomes AS r
            (hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code, requests)
        SELECT hour, project_id, workflow_id, requested_by, campaign_id, outcome, http_status, error_code,
               sum(requests)
        FROM d
        GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
        ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
        ON CONFLICT ON CONSTRAINT termination_rollup_outcomes_key
        DO UPDATE SET requests = r.requests + EXCLUDED.requests
    )
    SELECT count(*) INTO outcome_rows FROM d;

    WITH d AS (DELETE FROM termination_rollup_attempts_delta RETURNING *),
    folded AS (
        INSERT INTO termination_rollup_attempts AS r
            (hour, project_id, workflow_id, requested_by, campaign_id, attempts, calls, latency_ms_sum,
         le_1ms, le_2ms, le_3ms, le_5ms, le_7ms, le_10ms, le_15ms, le_20ms, le_30ms, le_50ms, le_70ms, le_100ms, le_150ms, le_200ms, le_300ms, le_500ms, le_700ms, le_1000ms, le_1500ms, le_2000ms, le_3000ms, le_5000ms, le_7000ms, le_10000ms, le_15000ms, le_20000ms, le_30000ms, le_60000ms)
        SELECT hour, project_id, workflow_id, requested_by, campaign_id,
           sum(attempts), sum(calls), sum(latency_ms_sum),
           sum(le_1ms), sum(le_2ms), sum(le_3ms), sum(le_5ms), sum(le_7ms), sum(le_10ms), sum(le_15ms), sum(le_20ms), sum(le_30ms), sum(le_50ms), sum(le_70ms), sum(le_100ms), sum(le_150ms), sum(le_200ms), sum(le_300ms), sum(le_500ms), sum(le_700ms), sum(le_1000ms), sum(le_1500ms), sum(le_2000ms), sum(le_3000ms), sum(le_5000ms), sum(le_7000ms), sum(le_10000ms), sum(le_15000ms), sum(le_20000ms), sum(le_30000ms), sum(le_60000ms)
        FROM d
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
        le_60000ms = r.le_60000ms + EXCLUDED.le_60000ms
    )
    SELECT count(*) INTO attempt_rows FROM d;

    RETURN outcome_rows + attempt_rows;
END
$$;

-- The rollups in readable form, one row per hour, project, workflow,
-- requested_by and campaign (a public contract). Quantiles come from the
-- hour's buckets; they do not add up across rows. The deltas not yet folded
-- count too.
CREATE OR REPLACE VIEW termination_summary AS
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
    FROM (SELECT * FROM termination_rollup_outcomes
          UNION ALL SELECT * FROM termination_rollup_outcomes_delta) ro
    UNION ALL
    SELECT hour, project_id, workflow_id, requested_by, campaign_id, NULL, NULL, attempts, calls,
           le_1ms, le_2ms, le_3ms, le_5ms, le_7ms, le_10ms, le_15ms, le_20ms, le_30ms, le_50ms, le_70ms, le_100ms, le_150ms, le_200ms, le_300ms, le_500ms, le_700ms, le_1000ms, le_1500ms, le_2000ms, le_3000ms, le_5000ms, le_7000ms, le_10000ms, le_15000ms, le_20000ms, le_30000ms, le_60000ms
    FROM (SELECT * FROM termination_rollup_attempts
          UNION ALL SELECT * FROM termination_rollup_attempts_delta) ra
) r
GROUP BY hour, project_id, workflow_id, requested_by, campaign_id;
