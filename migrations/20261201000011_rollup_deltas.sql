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
-- The outcomes' deltas have their rollup's columns (LIKE copies the NOT
-- NULLs, not the unique key): one row per statement and key, signed like the
-- rollups'.

CREATE TABLE termination_rollup_outcomes_delta (LIKE termination_rollup_outcomes);
-- The attempts' deltas are narrow: a row per statement, key and latency bucket
-- (`bucket` i: the calls above bound i-1 and at most bound i of
-- termination_latency_bounds_ms(), 29 above the last; null for attempts
-- without an HTTP answer). The fold turns them into the cumulative le_Xms.
-- Aggregating 28 cumulative buckets in every flush's trigger was most of its
-- cost.
CREATE TABLE termination_rollup_attempts_delta (
    hour            timestamptz NOT NULL,
    project_id      text,
    workflow_id     text,
    requested_by    text,
    campaign_id     text,
    bucket          smallint,
    attempts        bigint NOT NULL,
    calls           bigint NOT NULL,
    latency_ms_sum  double precision NOT NULL
);

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
    -- width_bucket over the negated bounds, ascending, counts the bounds at
    -- or above the latency: 29 minus that is the first bound it fits under.
    INSERT INTO termination_rollup_attempts_delta
        (hour, project_id, workflow_id, requested_by, campaign_id, bucket, attempts, calls,
         latency_ms_sum)
    SELECT date_bin('1 hour', started_at, timestamptz '2000-01-01 00:00:00+00'),
           project_id, workflow_id, requested_by, campaign_id,
           CASE WHEN http_status IS NOT NULL THEN 29 - width_bucket(-latency_ms,
               ARRAY[-60000, -30000, -20000, -15000, -10000, -7000, -5000, -3000, -2000, -1500, -1000, -700, -500, -300, -200, -150, -100, -70, -50, -30, -20, -15, -10, -7, -5, -3, -2, -1]::double precision[]) END,
           sign * count(*),
           sign * count(http_status),
           sign * coalesce(sum(latency_ms) FILTER (WHERE http_status IS NOT NULL), 0)
    FROM changed
    GROUP BY 1, 2, 3, 4, 5, 6;
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
           -- le_Xms: the calls in bucket i or below, for each bound i
           coalesce(sum(calls) FILTER (WHERE bucket <= 1), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 2), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 3), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 4), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 5), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 6), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 7), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 8), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 9), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 10), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 11), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 12), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 13), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 14), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 15), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 16), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 17), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 18), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 19), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 20), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 21), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 22), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 23), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 24), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 25), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 26), 0), coalesce(sum(calls) FILTER (WHERE bucket <= 27), 0),
           coalesce(sum(calls) FILTER (WHERE bucket <= 28), 0)
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
          UNION ALL
          SELECT hour, project_id, workflow_id, requested_by, campaign_id, attempts, calls,
                 latency_ms_sum, CASE WHEN bucket <= 1 THEN calls ELSE 0 END, CASE WHEN bucket <= 2 THEN calls ELSE 0 END, CASE WHEN bucket <= 3 THEN calls ELSE 0 END, CASE WHEN bucket <= 4 THEN calls ELSE 0 END, CASE WHEN bucket <= 5 THEN calls ELSE 0 END, CASE WHEN bucket <= 6 THEN calls ELSE 0 END, CASE WHEN bucket <= 7 THEN calls ELSE 0 END, CASE WHEN bucket <= 8 THEN calls ELSE 0 END, CASE WHEN bucket <= 9 THEN calls ELSE 0 END, CASE WHEN bucket <= 10 THEN calls ELSE 0 END, CASE WHEN bucket <= 11 THEN calls ELSE 0 END, CASE WHEN bucket <= 12 THEN calls ELSE 0 END, CASE WHEN bucket <= 13 THEN calls ELSE 0 END, CASE WHEN bucket <= 14 THEN calls ELSE 0 END, CASE WHEN bucket <= 15 THEN calls ELSE 0 END, CASE WHEN bucket <= 16 THEN calls ELSE 0 END, CASE WHEN bucket <= 17 THEN calls ELSE 0 END, CASE WHEN bucket <= 18 THEN calls ELSE 0 END, CASE WHEN bucket <= 19 THEN calls ELSE 0 END, CASE WHEN bucket <= 20 THEN calls ELSE 0 END, CASE WHEN bucket <= 21 THEN calls ELSE 0 END, CASE WHEN bucket <= 22 THEN calls ELSE 0 END, CASE WHEN bucket <= 23 THEN calls ELSE 0 END, CASE WHEN bucket <= 24 THEN calls ELSE 0 END, CASE WHEN bucket <= 25 THEN calls ELSE 0 END, CASE WHEN bucket <= 26 THEN calls ELSE 0 END, CASE WHEN bucket <= 27 THEN calls ELSE 0 END, CASE WHEN bucket <= 28 THEN calls ELSE 0 END
          FROM termination_rollup_attempts_delta) ra
) r
GROUP BY hour, project_id, workflow_id, requested_by, campaign_id;
