//! The report's summary from the rollups (migration `…10_rollups`): whole
//! hours come from `termination_rollup_outcomes` and
//! `termination_rollup_attempts`, which triggers keep for every writer,
//! with the deltas not yet folded into them (`fold`); the
//! partial hour at the start of a window comes from the raw rows, which are
//! few and indexed on time. So a report reads a number of rows that grows
//! with hours and dimensions, not with requests, and writes nothing: a
//! role with SELECT only, or a hot standby, serves it.

use super::AuditError;
use super::report::{Count, ErrorCount, Filter, Latency, ProjectCount, Summary, WorkflowCount};
use crate::domain::Outcome;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use sqlx::PgPool;

/// The upper bounds of the latency buckets, in ms: the columns `le_<X>ms` of
/// `termination_rollup_attempts`, and `termination_latency_bounds_ms()`.
/// Ratios of 1.4 to 2 between neighbours: an estimate lies in the bucket of
/// the true value, so it is off by at most that bucket's width.
pub const LATENCY_BOUNDS_MS: [f64; 28] = [
    1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 70.0, 100.0, 150.0, 200.0, 300.0, 500.0,
    700.0, 1000.0, 1500.0, 2000.0, 3000.0, 5000.0, 7000.0, 10000.0, 15000.0, 20000.0, 30000.0,
    60000.0,
];

/// How many most frequent errors and workflows a summary lists.
pub(super) const TOP: usize = 20;
/// How many projects it lists.
const TOP_PROJECTS: usize = 50;

/// The `q`-quantile of a histogram as Prometheus' `histogram_quantile`
/// computes it: `le[i]` counts the observations at most `bounds[i]`
/// (cumulative), `total` is the +Inf bucket. The rank `q * total` falls in
/// one bucket; the answer interpolates linearly between that bucket's bounds
/// (the first starts at 0). A rank past the last finite bound answers that
/// bound. `None` without observations or for a `q` outside 0..=1.
pub fn quantile(q: f64, bounds: &[f64], le: &[i64], total: i64) -> Option<f64> {
    if total <= 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0i64);
    for (&upper, &count) in bounds.iter().zip(le) {
        if count as f64 >= rank {
            if count == below {
                return Some(upper);
            }
            return Some(lower + (upper - lower) * (rank - below as f64) / (count - below) as f64);
        }
        (lower, below) = (upper, count);
    }
    bounds.last().copied()
}

/// Which rows a window reads: rollup hours from `rollup_from` (all when
/// `None`), raw rows in `raw` (finished or started within it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub rollup_from: Option<DateTime<Utc>>,
    pub raw: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Plan {
    /// The plan for a window that starts at `since`, when the latest prune
    /// cut at `pruned_before`. A start within an hour reads that hour's rest
    /// from the raw rows, unless a prune removed them: then the window
    /// starts at the hour, from the rollup alone.
    pub fn new(since: Option<DateTime<Utc>>, pruned_before: Option<DateTime<Utc>>) -> Self {
        let Some(since) = since else {
            return Plan {
                rollup_from: None,
                raw: None,
            };
        };
        let hour = since.duration_trunc(TimeDelta::hours(1)).unwrap_or(since);
        if hour == since || pruned_before.is_some_and(|cut| since < cut) {
            return Plan {
                rollup_from: Some(hour),
                raw: None,
            };
        }
        let next = hour + TimeDelta::hours(1);
        Plan {
            rollup_from: Some(next),
            raw: Some((since, next)),
        }
    }

    /// Where the counted window starts (`None`: all time).
    pub fn start(&self) -> Option<DateTime<Utc>> {
        self.raw.map(|(from, _)| from).or(self.rollup_from)
    }
}

/// The dimension filters every query shares, on table alias `x`: `$2`
/// workflow, `$3` requested_by, `$4` campaign.
const DIMS: &str = "($2::text IS NULL OR x.workflow_id = $2) \
     AND ($3::text IS NULL OR x.requested_by = $3) \
     AND ($4::text IS NULL OR x.campaign_id = $4)";

/// The outcomes' rollup and its deltas not yet folded, as one table: a
/// statement reads both in one snapshot, and a fold moves rows from one to
/// the other in one transaction, so the sum is exact without a fold.
pub(super) const OUTCOME_ROLLUP: &str = "(SELECT hour, project_id, workflow_id, requested_by, \
       campaign_id, outcome, http_status, error_code, requests \
     FROM termination_rollup_outcomes \
     UNION ALL SELECT hour, project_id, workflow_id, requested_by, campaign_id, outcome, \
       http_status, error_code, requests \
     FROM termination_rollup_outcomes_delta)";

/// Rollup rows from `$1` (all when null); raw rows from `$5` to before `$6`
/// (none when either is null).
const HOURS: &str = "($1::timestamptz IS NULL OR x.hour >= $1)";
const RAW: &str = "$5::timestamptz IS NOT NULL AND $6::timestamptz IS NOT NULL";

/// One row of the outcome query: a group of one of its four grouping sets
/// (over the rows summed by all five keys first: one hash over the rollup
/// instead of four, half the time).
#[derive(sqlx::FromRow)]
struct Group {
    /// 'outcome', 'error', 'project' or 'workflow'.
    kind: String,
    outcome: Option<String>,
    http_status: Option<i32>,
    error_code: Option<String>,
    project_id: Option<String>,
    workflow_id: Option<String>,
    count: i64,
    succeeded: i64,
}

/// The summary of `f` over the rollups and the raw edge.
pub async fn summary(pool: &PgPool, f: &Filter) -> Result<Summary, AuditError> {
    let pruned_before: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(cut) FROM termination_prunes")
            .fetch_one(pool)
            .await?;
    let plan = Plan::new(f.since, pruned_before);
    let succeeded = Outcome::Succeeded.as_str();
    let sql = format!(
        "WITH r AS ( \
           SELECT x.project_id, x.workflow_id, x.outcome, x.http_status, x.error_code, \
                  x.requests AS n \
           FROM {OUTCOME_ROLLUP} x WHERE {HOURS} AND {DIMS} \
           UNION ALL \
           SELECT x.project_id, x.workflow_id, x.outcome, x.http_status, x.error_code, 1 \
           FROM termination_outcomes x \
           WHERE {RAW} AND x.finished_at >= $5 AND x.finished_at < $6 AND {DIMS} \
         ), g AS ( \
           SELECT project_id, workflow_id, outcome, http_status, error_code, sum(n) AS n \
           FROM r GROUP BY 1, 2, 3, 4, 5 \
         ) \
         SELECT CASE WHEN GROUPING(r.workflow_id) = 0 THEN 'workflow' \
                     WHEN GROUPING(r.project_id) = 0 THEN 'project' \
                     WHEN GROUPING(r.http_status) = 0 THEN 'error' ELSE 'outcome' END AS kind, \
                r.outcome, r.http_status, r.error_code, r.project_id, r.workflow_id, \
                sum(r.n)::bigint AS count, \
                coalesce(sum(r.n) FILTER (WHERE r.outcome = '{succeeded}'), 0)::bigint \
                  AS succeeded \
         FROM g r \
         GROUP BY GROUPING SETS ((r.outcome), (r.outcome, r.http_status, r.error_code), \
                                 (r.project_id), (r.project_id, r.workflow_id)) \
         HAVING sum(r.n) <> 0"
    );
    let groups: Vec<Group> = bind(sqlx::query_as(&sql), f, &plan).fetch_all(pool).await?;
    let mut outcomes = Vec::new();
    let mut errors = Vec::new();
    let mut projects = Vec::new();
    let mut workflows = Vec::new();
    for g in groups {
        match g.kind.as_str() {
            "outcome" => outcomes.push(Count {
                outcome: g.outcome.unwrap_or_default(),
                count: g.count,
            }),
            "error" if g.outcome.as_deref() != Some(succeeded) => errors.push(ErrorCount {
                outcome: g.outcome.unwrap_or_default(),
                http_status: g.http_status,
                error_code: g.error_code,
                count: g.count,
            }),
            "project" => projects.push(ProjectCount {
                project_id: g.project_id,
                total: g.count,
                succeeded: g.succeeded,
                failed: g.count - g.succeeded,
            }),
            "workflow" => workflows.push(WorkflowCount {
                project_id: g.project_id,
                workflow_id: g.workflow_id,
                total: g.count,
                succeeded: g.succeeded,
                failed: g.count - g.succeeded,
            }),
            _ => {}
        }
    }
    outcomes.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.outcome.cmp(&b.outcome))
    });
    errors.sort_by(|a, b| {
        b.count.cmp(&a.count).then_with(|| {
            (&a.outcome, a.http_status, &a.error_code).cmp(&(
                &b.outcome,
                b.http_status,
                &b.error_code,
            ))
        })
    });
    errors.truncate(TOP);
    projects.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| a.project_id.cmp(&b.project_id))
    });
    projects.truncate(TOP_PROJECTS);
    workflows.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| (&a.project_id, &a.workflow_id).cmp(&(&b.project_id, &b.workflow_id)))
    });
    workflows.truncate(TOP);
    Ok(Summary {
        total: outcomes.iter().map(|c| c.count).sum(),
        window_start: plan.start(),
        outcomes,
        errors,
        projects,
        workflows,
        latency_ms: latency(pool, f, &plan).await?,
    })
}

/// The API calls' latency of `f`: bucket counts summed over the rollup hours
/// and the raw edge, then quantiles from the buckets.
async fn latency(pool: &PgPool, f: &Filter, plan: &Plan) -> Result<Latency, AuditError> {
    let columns: Vec<String> = LATENCY_BOUNDS_MS
        .iter()
        .map(|b| format!("le_{b}ms"))
        .collect();
    let sums = columns
        .iter()
        .map(|c| format!("sum({c})"))
        .collect::<Vec<_>>()
        .join(", ");
    let raw = LATENCY_BOUNDS_MS
        .iter()
        .zip(&columns)
        .map(|(b, c)| format!("(x.http_status IS NOT NULL AND x.latency_ms <= {b})::int AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    // A delta row holds the calls of one bucket (1 for the first bound, as
    // the fold's); null for attempts without an HTTP answer.
    let delta = (1..=LATENCY_BOUNDS_MS.len())
        .zip(&columns)
        .map(|(i, c)| format!("CASE WHEN x.bucket <= {i} THEN x.calls ELSE 0 END AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT coalesce(sum(calls), 0)::bigint, ARRAY[{sums}]::bigint[] FROM ( \
           SELECT x.calls, {cols} FROM termination_rollup_attempts x WHERE {HOURS} AND {DIMS} \
           UNION ALL \
           SELECT x.calls, {delta} FROM termination_rollup_attempts_delta x \
           WHERE {HOURS} AND {DIMS} \
           UNION ALL \
           SELECT (x.http_status IS NOT NULL)::int, {raw} FROM termination_attempts x \
           WHERE {RAW} AND x.started_at >= $5 AND x.started_at < $6 AND {DIMS} \
         ) t",
        cols = columns
            .iter()
            .map(|c| format!("x.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let (calls, le): (i64, Vec<Option<i64>>) =
        bind(sqlx::query_as(&sql), f, plan).fetch_one(pool).await?;
    let le: Vec<i64> = le.into_iter().map(Option::unwrap_or_default).collect();
    let q = |q| quantile(q, &LATENCY_BOUNDS_MS, &le, calls);
    Ok(Latency {
        calls,
        p50: q(0.5),
        p95: q(0.95),
        p99: q(0.99),
    })
}

fn bind<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    f: &'q Filter,
    plan: &Plan,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(plan.rollup_from)
        .bind(&f.workflow)
        .bind(&f.requested_by)
        .bind(&f.campaign)
        .bind(plan.raw.map(|r| r.0))
        .bind(plan.raw.map(|r| r.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: [f64; 4] = [10.0, 20.0, 50.0, 100.0];

    #[test]
    fn a_quantile_interpolates_within_its_bucket() {
        // 10 observations: 2 in (0,10], 6 in (10,20], 2 in (20,50].
        let le = [2, 8, 10, 10];
        // rank 5: 3 into the 6 of (10,20] -> 10 + 10 * 3/6.
        assert_eq!(quantile(0.5, &B, &le, 10), Some(15.0));
        // rank 1: half of the first bucket, which starts at 0.
        assert_eq!(quantile(0.1, &B, &le, 10), Some(5.0));
        // rank 9.5: 1.5 into the 2 of (20,50] -> 20 + 30 * 0.75.
        assert_eq!(quantile(0.95, &B, &le, 10), Some(42.5));
        // rank 8 is exactly the top of (10,20].
        assert_eq!(quantile(0.8, &B, &le, 10), Some(20.0));
    }

    #[test]
    fn a_rank_past_the_last_bound_answers_that_bound() {
        // 4 observations, 2 above 100 ms (only in the +Inf total).
        let le = [1, 1, 2, 2];
        assert_eq!(quantile(0.99, &B, &le, 4), Some(100.0));
        assert_eq!(quantile(0.5, &B, &le, 4), Some(50.0));
    }

    #[test]
    fn no_observations_or_a_bad_q_has_no_quantile() {
        assert_eq!(quantile(0.5, &B, &[0, 0, 0, 0], 0), None);
        assert_eq!(quantile(1.5, &B, &[1, 1, 1, 1], 1), None);
        assert_eq!(quantile(-0.1, &B, &[1, 1, 1, 1], 1), None);
    }

    #[test]
    fn the_estimate_is_within_the_true_values_bucket() {
        // 1000 values spread evenly over 0..=1000 ms, counted in the real bounds.
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let le: Vec<i64> = LATENCY_BOUNDS_MS
            .iter()
            .map(|b| values.iter().filter(|v| **v <= *b).count() as i64)
            .collect();
        for q in [0.5, 0.95, 0.99] {
            let exact = values[(q * 1000.0) as usize - 1];
            let got = quantile(q, &LATENCY_BOUNDS_MS, &le, 1000).expect("observations");
            let upper = LATENCY_BOUNDS_MS
                .iter()
                .find(|b| **b >= exact)
                .expect("in range");
            let lower = LATENCY_BOUNDS_MS
                .iter()
                .rev()
                .find(|b| **b < exact)
                .copied()
                .unwrap_or(0.0);
            assert!(
                (lower..=*upper).contains(&got),
                "q={q} exact={exact} got={got}"
            );
        }
    }

    #[test]
    fn a_window_within_an_hour_reads_the_rest_of_that_hour_raw() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().expect("time");
        let plan = Plan::new(Some(t("2026-01-01T10:20:00Z")), None);
        assert_eq!(plan.rollup_from, Some(t("2026-01-01T11:00:00Z")));
        assert_eq!(
            plan.raw,
            Some((t("2026-01-01T10:20:00Z"), t("2026-01-01T11:00:00Z")))
        );
        assert_eq!(plan.start(), Some(t("2026-01-01T10:20:00Z")));
        // On the hour: the rollup alone.
        let plan = Plan::new(Some(t("2026-01-01T10:00:00Z")), None);
        assert_eq!(
            (plan.rollup_from, plan.raw),
            (Some(t("2026-01-01T10:00:00Z")), None)
        );
        // Before a prune's cut the raw rows are gone: from the hour.
        let plan = Plan::new(
            Some(t("2026-01-01T10:20:00Z")),
            Some(t("2026-01-02T00:00:00Z")),
        );
        assert_eq!(
            (plan.rollup_from, plan.raw),
            (Some(t("2026-01-01T10:00:00Z")), None)
        );
        // After it, exact again.
        let plan = Plan::new(
            Some(t("2026-01-03T10:20:00Z")),
            Some(t("2026-01-02T00:00:00Z")),
        );
        assert_eq!(plan.rollup_from, Some(t("2026-01-03T11:00:00Z")));
        assert_eq!(Plan::new(None, None).start(), None);
    }
}
