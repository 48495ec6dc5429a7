//! The audit at scale: a synthetic audit of N attempts and N/2 outcomes over
//! 60 days, then every report form timed against it.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo bench --bench audit -- [--attempts N] [--days D] [--keep] [--reuse] [--runs R]
//! ```
//!
//! The rows are made by `generate_series` SQL in the database, a day per
//! statement, into a fresh database `aomt_bench_audit_<N>` with the daemon's
//! migrations: the rollups are built by the same triggers that keep them for
//! the daemon. `--reuse` times an audit a `--keep` run left; `--load-only`
//! makes one and stops.
//!
//! The shape, so that the rollups see what a team that cancels in campaigns
//! would make: 80% of requests belong to a campaign (one every 8 hours,
//! requested_by one of 8 people, 20 workflows of 200 each); the rest come
//! from a scheduler over 50 workflows. 90% succeed, 4% fail for good (404),
//! 3% exhaust their retries (503), 3% are rejected. Each request has two
//! attempts (a 503, then the last answer); latencies 20 ms to 2 s.

use anyhow::{Context, Result};
use aom_terminator::audit::report::{Filter, Reports};
use aom_terminator::settings::DatabaseArgs;
use chrono::{TimeDelta, Utc};
use clap::Parser;
use secrecy::SecretString;
use sqlx::{Connection, PgConnection};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    /// Attempts to make (outcomes: half as many).
    #[arg(long, default_value_t = 10_000_000)]
    attempts: u64,
    /// Days the audit spans, ending now.
    #[arg(long, default_value_t = 60)]
    days: u32,
    /// Keep the database at the end.
    #[arg(long)]
    keep: bool,
    /// Time the reports against the database a `--keep` run left.
    #[arg(long)]
    reuse: bool,
    /// Make the audit and stop (implies --keep).
    #[arg(long)]
    load_only: bool,
    /// Times each report form runs; the median is printed.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let name = format!("aomt_bench_audit_{}", args.attempts);
    let url = database_url(&base, &name)?;
    if !args.reuse {
        let mut admin = PgConnection::connect(&base).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let mut db = PgConnection::connect(&url).await?;
        sqlx::migrate!("./migrations").run(&mut db).await?;
        load(&mut db, args.attempts, args.days).await?;
        describe(&mut db).await?;
    }
    if !args.load_only {
        time_reports(&url, args.runs).await?;
    }
    if !(args.keep || args.load_only) {
        let mut admin = PgConnection::connect(&base).await?;
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
    }
    Ok(())
}

fn database_url(base: &str, name: &str) -> Result<String> {
    let mut url = url::Url::parse(base).context("DATABASE_URL")?;
    url.set_path(name);
    Ok(url.to_string())
}

/// One day of requests per statement: outcomes, then their attempts. The
/// request number `i` decides everything about a request, so a day's
/// statements are independent of the others.
async fn load(db: &mut PgConnection, attempts: u64, days: u32) -> Result<()> {
    let requests = attempts / 2;
    let per_day = requests.div_ceil(u64::from(days));
    let span_s = f64::from(days) * 86_400.0;
    let start = Utc::now() - TimeDelta::days(i64::from(days));
    let started = Instant::now();
    for day in 0..u64::from(days) {
        let (first, last) = (day * per_day, ((day + 1) * per_day).min(requests) - 1);
        let t = Instant::now();
        // $1 first, $2 last, $3 start, $4 seconds per request.
        let request = "SELECT i, \
               $3::timestamptz + make_interval(secs => i * $4::float8) AS t, \
               (i % 10) < 8 AS in_campaign, \
               floor(i * $4::float8 / 28800)::bigint AS c, \
               (hashint8(i) & 2147483647) % 100 AS roll \
             FROM generate_series($1::bigint, $2::bigint) i";
        let shaped = format!(
            "SELECT r.*, \
               CASE WHEN in_campaign THEN (c * 7 + i % 20) % 200 ELSE i % 50 END AS wf, \
               CASE WHEN roll < 90 THEN 'succeeded' WHEN roll < 94 THEN 'failed_permanent' \
                    WHEN roll < 97 THEN 'failed_retries_exhausted' ELSE 'rejected' END AS outcome, \
               CASE WHEN roll < 90 THEN 200 WHEN roll < 94 THEN 404 \
                    WHEN roll < 97 THEN 503 END AS status, \
               CASE WHEN roll < 90 THEN NULL WHEN roll < 94 THEN 'AOM.0404' \
                    WHEN roll < 97 THEN 'AOM.0503' END AS code, \
               CASE WHEN in_campaign THEN 'ops-' || (c % 8) ELSE 'scheduler' END AS who, \
               CASE WHEN in_campaign THEN 'campaign-' || c END AS campaign \
             FROM ({request}) r"
        );
        sqlx::query(&format!(
            "INSERT INTO termination_outcomes (request_id, project_id, workflow_id, execution_id, \
               outcome, http_status, error_code, error_msg, attempts, reason, requested_by, \
               received_at, finished_at, campaign_id) \
             SELECT 'bench-' || i, 'proj-' || (wf % 10), 'wf-' || wf, 'exec-' || i, outcome, \
               status, code, CASE WHEN code IS NOT NULL THEN 'synthetic ' || code END, 2, \
               'bench', who, t - interval '3 seconds', t, campaign \
             FROM ({shaped}) s"
        ))
        .bind(first as i64)
        .bind(last as i64)
        .bind(start)
        .bind(span_s / requests as f64)
        .execute(&mut *db)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO termination_attempts (request_id, attempt, http_status, error_kind, \
               error_code, started_at, latency_ms, campaign_id, project_id, workflow_id, \
               requested_by) \
             SELECT 'bench-' || i, n, \
               CASE WHEN outcome = 'rejected' THEN NULL WHEN n = 1 THEN 503 ELSE status END, \
               CASE WHEN outcome = 'rejected' THEN 'invalid' WHEN n = 1 OR status <> 200 \
                 THEN 'http' END, \
               CASE WHEN n = 1 AND outcome <> 'rejected' THEN 'AOM.0503' ELSE code END, \
               t - make_interval(secs => 3 - n), \
               20 * power(100, (hashint8(i * 2 + n) & 65535) / 65536.0), \
               campaign, 'proj-' || (wf % 10), 'wf-' || wf, who \
             FROM ({shaped}) s CROSS JOIN generate_series(1, 2) n"
        ))
        .bind(first as i64)
        .bind(last as i64)
        .bind(start)
        .bind(span_s / requests as f64)
        .execute(&mut *db)
        .await?;
        eprintln!(
            "day {}/{days}: requests {first}..={last} in {:.1} s ({:.0} s so far)",
            day + 1,
            t.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }
    // The triggers left the loaded rows' counts as deltas: into the rollups
    // now, as a daemon's fold task would, so the timed reports do not scan
    // millions of unindexed delta rows.
    sqlx::query("SELECT termination_rollup_fold()")
        .execute(&mut *db)
        .await?;
    sqlx::query("ANALYZE").execute(&mut *db).await?;
    eprintln!("loaded in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Row counts and sizes, for BENCHMARKS.md.
async fn describe(db: &mut PgConnection) -> Result<()> {
    for table in [
        "termination_outcomes",
        "termination_attempts",
        "termination_rollup_outcomes",
        "termination_rollup_attempts",
    ] {
        let (rows, size): (i64, String) = sqlx::query_as(&format!(
            "SELECT count(*), pg_size_pretty(pg_total_relation_size('{table}')) FROM {table}"
        ))
        .fetch_one(&mut *db)
        .await?;
        println!("{table}: {rows} rows, {size}");
    }
    Ok(())
}

/// Every report form, `runs` times each; the median and the slowest.
async fn time_reports(url: &str, runs: usize) -> Result<()> {
    let settings = DatabaseArgs {
        database_url: SecretString::from(url.to_owned()),
    }
    .settings()?;
    let reports = Reports::connect(&settings).await?;
    let ago = |d: TimeDelta| Some(Utc::now() - d);
    let some = |s: &str| Some(s.to_owned());
    // A campaign from the middle of the audit.
    let mut db = PgConnection::connect(url).await?;
    let campaign: Option<String> = sqlx::query_scalar(
        "SELECT campaign_id FROM termination_rollup_outcomes WHERE campaign_id IS NOT NULL \
         ORDER BY hour DESC OFFSET 200 LIMIT 1",
    )
    .fetch_optional(&mut db)
    .await?;
    let forms: Vec<(String, Filter)> = vec![
        ("report (all time)".into(), Filter::default()),
        (
            "report --since 7d".into(),
            Filter {
                since: ago(TimeDelta::days(7)),
                ..Filter::default()
            },
        ),
        (
            "report --since 24h".into(),
            Filter {
                since: ago(TimeDelta::hours(24)),
                ..Filter::default()
            },
        ),
        (
            "report --since 1h".into(),
            Filter {
                since: ago(TimeDelta::hours(1)),
                ..Filter::default()
            },
        ),
        (
            "report --requested-by ops-3".into(),
            Filter {
                requested_by: some("ops-3"),
                ..Filter::default()
            },
        ),
        (
            "report --workflow wf-7".into(),
            Filter {
                workflow: some("wf-7"),
                ..Filter::default()
            },
        ),
        (
            "report --since 7d --workflow wf-7 --requested-by ops-3".into(),
            Filter {
                since: ago(TimeDelta::days(7)),
                workflow: some("wf-7"),
                requested_by: some("ops-3"),
                ..Filter::default()
            },
        ),
    ];
    println!("| report form | median | slowest | requests counted |");
    println!("|---|---|---|---|");
    let row = |name: &str, mut times: Vec<Duration>, total: i64| {
        times.sort();
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        println!(
            "| `{name}` | {} | {} | {total} |",
            ms(times[times.len() / 2]),
            ms(times[times.len() - 1])
        );
    };
    for (name, filter) in forms {
        let mut times = Vec::with_capacity(runs);
        let mut total = 0;
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            total = reports.summary(&filter).await?.total;
            times.push(t.elapsed());
        }
        row(&name, times, total);
    }
    // `report --campaign` reads the progress view and the campaign's errors.
    if let Some(id) = campaign {
        let mut times = Vec::with_capacity(runs);
        let mut total = 0;
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            total = reports.campaign(&id).await?.map_or(0, |p| p.done);
            reports.campaign_errors(&id).await?;
            times.push(t.elapsed());
        }
        row(&format!("report --campaign {id}"), times, total);
    }
    Ok(())
}
