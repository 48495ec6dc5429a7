//! What is printed: the preamble, a run's report, the BENCHMARKS.md table,
//! and the number formats they share.

use crate::Bench;
use crate::run::{Report, RunOutcome};
use crate::scenario::Scenario;

pub(crate) fn preamble(bench: &Bench) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1} GiB", kib / 1_048_576.0),
        );
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let revision = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".to_owned(), |s| s.trim().to_owned());
    format!(
        "machine: {} cores (nproc), {model}, {mem_gib} memory\n\
         command: AMQP_URL={} DATABASE_URL={} cargo bench --bench e2e -- {}\n\
         binary:  {} (bench profile), git {revision}",
        bench.cores,
        redact(&bench.amqp_url),
        redact(&bench.database_url),
        args.join(" "),
        bench.binary.display(),
    )
}

/// A URL with its password replaced.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

fn pct(part: f64, whole: f64) -> f64 {
    100.0 * part / whole
}

pub(crate) fn print_report(bench: &Bench, scenario: &Scenario, r: &Report) {
    println!("results ({}):", scenario.label);
    print_daemon(r);
    print_bounds(scenario, r);
    println!(
        "  start-up (spawn → first delivery): {}; publish (pre-fill) took {:.2} s; daemon log lines (warn+): {}",
        r.startup_s
            .map_or_else(|| "unknown".to_owned(), |s| format!("{s:.3} s")),
        r.publish.as_secs_f64(),
        r.log_lines
    );
    print_cpu_split(bench, r);
}

/// The daemon's own numbers: rate, latencies, memory, CPU.
fn print_daemon(r: &Report) {
    let rate = r.rate();
    println!(
        "  terminations/s end to end:   {} /s  ({} requests in {} msgs; drain window {:.3} s = max(recorded_at) - min(received_at))",
        thousands_f(rate),
        thousands(r.requests),
        thousands(r.messages),
        r.drain_s
    );
    println!(
        "  delivered→committed (time from delivery to the daemon to audit commit, recorded_at - received_at): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.p50_ms, r.p99_ms, r.max_ms
    );
    println!(
        "  published→committed (publish to audit commit; the queue was pre-filled, so this is mostly \
         the wait in the queue and the daemon's start-up, and grows with N): p50 {:.2} s, p99 {:.2} s",
        r.published_p50_s, r.published_p99_s
    );
    println!(
        "  daemon peak RSS:             {:.1} MiB (VmHWM{}; max sampled VmRSS {:.1} MiB)",
        r.peak_rss_mib(),
        if r.hwm_kib.is_some() {
            ""
        } else {
            " unavailable"
        },
        r.rss_max_kib as f64 / 1024.0
    );
    let tenths: Vec<String> = r
        .rss_by_tenth
        .iter()
        .map(|kib| format!("{:.1}", *kib as f64 / 1024.0))
        .collect();
    println!(
        "  daemon RSS by tenth of the run (max sampled VmRSS, MiB): {}",
        tenths.join(" / ")
    );
    println!(
        "  daemon CPU:                  {:.2} s = {:.1} µs per termination",
        r.cpu.daemon,
        r.cpu_us_per_termination()
    );
}

/// The rate against what bounds it: the ceilings, Little's law, the rate
/// limit; and what the sandbox saw.
fn print_bounds(scenario: &Scenario, r: &Report) {
    let rate = r.rate();
    match &r.ceiling {
        Some(c) if scenario.batch > 0 => println!(
            "  ceiling (bare ack consumer, prefetch {}): {} msgs/s = {} requests/s; daemon at {:.2} % of it",
            r.prefetch,
            thousands_f(c.msgs_per_s()),
            thousands_f(c.requests_per_s()),
            pct(rate, c.requests_per_s())
        ),
        Some(c) => println!(
            "  ceiling (bare ack consumer, prefetch {}): {} msgs/s; daemon at {:.1} % of it",
            r.prefetch,
            thousands_f(c.msgs_per_s()),
            pct(rate, c.msgs_per_s())
        ),
        None => println!("  ceiling:                     not measured"),
    }
    if let (Some(h), Some(bound)) = (&r.held, littles_law(scenario)) {
        println!(
            "  held ceiling (bare consumer, {} ms in one of {} slots, prefetch {}): {} msgs/s = {:.1} % of Little's law; daemon at {:.1} % of it",
            scenario.latency_ms,
            scenario.concurrency,
            r.prefetch,
            thousands_f(h.msgs_per_s()),
            pct(h.msgs_per_s(), bound),
            pct(rate, h.msgs_per_s())
        );
    }
    if let Some(bound) = littles_law(scenario) {
        println!(
            "  Little's law bound C/L:      {} /s ({} / {} ms); daemon at {:.1} % of it{}",
            thousands_f(bound),
            scenario.concurrency,
            scenario.latency_ms,
            pct(rate, bound),
            if scenario.batch == 0 && u32::from(r.prefetch) < scenario.concurrency {
                format!(
                    " (note: PREFETCH {} < C holds at most {} single requests in flight)",
                    r.prefetch, r.prefetch
                )
            } else {
                String::new()
            }
        );
    }
    if let Some(limit) = scenario.rate_limit {
        println!(
            "  RATE_LIMIT {limit}/s:  daemon at {:.1} % of it",
            pct(rate, f64::from(limit))
        );
    }
    let refused = |n: u64| format!("{n} ({:.2} % of calls)", pct(n as f64, r.calls as f64));
    println!(
        "  sandbox calls:               {}; 429: {}; 503: {}",
        r.calls,
        refused(r.throttled),
        refused(r.busy)
    );
    if let Some(bound) = scenario.sandbox.goodput_bound(scenario.latency_ms) {
        println!(
            "  the sandbox's limit:         {} /s; goodput at {:.1} % of it",
            thousands_f(bound),
            pct(rate, bound)
        );
    }
    if let Some(m) = r.max_in_flight {
        println!("  sandbox max in flight:       {m}");
    }
    if let Some(ms) = r.sandbox_answer_ms {
        println!(
            "  sandbox answer time:         mean {ms:.3} ms from a call's arrival to its answer (latency asked: {} ms)",
            scenario.latency_ms
        );
        // A busy sandbox answers late, which lowers the bound of any
        // client: the bound again with the latency the sandbox gave.
        if littles_law(scenario).is_some() && ms > 0.0 {
            let bound = f64::from(scenario.concurrency) * 1000.0 / ms;
            println!(
                "  C / the sandbox's answer time: {} /s; daemon at {:.1} % of it",
                thousands_f(bound),
                pct(rate, bound)
            );
        }
    }
}

/// Where the CPU went over the window.
fn print_cpu_split(bench: &Bench, r: &Report) {
    let core_s = r.wall.as_secs_f64() * bench.cores as f64;
    println!(
        "CPU over the window daemon start → all committed ({:.3} s wall × {} cores = {:.2} core-s):",
        r.wall.as_secs_f64(),
        bench.cores,
        core_s
    );
    for (name, s) in [
        ("daemon", r.cpu.daemon),
        ("sandbox", r.cpu.sandbox),
        ("rabbitmq", r.cpu.rabbitmq),
        ("postgres", r.cpu.postgres),
        ("machine (all)", r.cpu.machine),
        ("this bench", r.cpu.bench),
        (
            "other load",
            (r.cpu.machine
                - r.cpu.daemon
                - r.cpu.sandbox
                - r.cpu.rabbitmq
                - r.cpu.postgres
                - r.cpu.bench)
                .max(0.0),
        ),
    ] {
        println!("  {name:<14} {s:>8.2} CPU-s  {:>5.1} %", pct(s, core_s));
    }
}

fn littles_law(scenario: &Scenario) -> Option<f64> {
    (scenario.latency_ms > 0)
        .then(|| f64::from(scenario.concurrency) * 1000.0 / scenario.latency_ms as f64)
}

pub(crate) fn table_header() -> String {
    "| scenario | requests | batch | latency | concurrency | terminations/s | ceiling msgs/s | % of ceiling \
     | % of Little's law | p50 / p99 delivered→committed ms | p50 / p99 published→committed s \
     | peak RSS MiB | daemon CPU s | daemon CPU µs per termination \
     | CPU split daemon/sandbox/rabbitmq/postgres % |\n\
     |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        .to_owned()
}

pub(crate) fn markdown_row(scenario: &Scenario, outcome: &RunOutcome, cores: usize) -> String {
    let label = match scenario.rate_limit {
        Some(limit) => match outcome {
            RunOutcome::Correct(r) => format!(
                "{} ({:.1} % of the limit)",
                scenario.label,
                pct(r.rate(), f64::from(limit))
            ),
            RunOutcome::Incorrect(_) => scenario.label.clone(),
        },
        None => scenario.label.clone(),
    };
    let label = match (scenario.sandbox.goodput_bound(scenario.latency_ms), outcome) {
        (Some(bound), RunOutcome::Correct(r)) => format!(
            "{label} ({:.1} % of the sandbox's {}/s; 429 {:.2} %, 503 {:.2} % of calls)",
            pct(r.rate(), bound),
            thousands_f(bound),
            pct(r.throttled as f64, r.calls as f64),
            pct(r.busy as f64, r.calls as f64)
        ),
        _ => label,
    };
    let fixed = format!(
        "| {label} | {} | {} | {} ms | {} ",
        thousands(scenario.requests),
        if scenario.batch == 0 {
            "—".to_owned()
        } else {
            thousands(scenario.batch)
        },
        scenario.latency_ms,
        thousands(u64::from(scenario.concurrency)),
    );
    let r = match outcome {
        RunOutcome::Correct(r) => r,
        RunOutcome::Incorrect(_) => {
            return format!("{fixed}| NOT CORRECT | | | | | | | | | |");
        }
    };
    let rate = r.rate();
    let (ceiling, of_ceiling) = match &r.ceiling {
        Some(c) if scenario.batch > 0 => (
            format!(
                "{} ({} req/s)",
                thousands_f(c.msgs_per_s()),
                thousands_f(c.requests_per_s())
            ),
            format!("{:.2} %", pct(rate, c.requests_per_s())),
        ),
        Some(c) => (
            thousands_f(c.msgs_per_s()),
            format!("{:.1} %", pct(rate, c.msgs_per_s())),
        ),
        None => ("—".to_owned(), "—".to_owned()),
    };
    let little = match (littles_law(scenario), &r.held) {
        (Some(b), Some(h)) => format!(
            "{:.1} % (held bare consumer: {:.1} %)",
            pct(rate, b),
            pct(h.msgs_per_s(), b)
        ),
        (Some(b), None) => format!("{:.1} %", pct(rate, b)),
        (None, _) => "—".to_owned(),
    };
    let core_s = r.wall.as_secs_f64() * cores as f64;
    format!(
        "{fixed}| {} | {ceiling} | {of_ceiling} | {little} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1} | {:.2} | {:.0} | {:.0}/{:.0}/{:.0}/{:.0} |",
        thousands_f(rate),
        r.p50_ms,
        r.p99_ms,
        r.published_p50_s,
        r.published_p99_s,
        r.peak_rss_mib(),
        r.cpu.daemon,
        r.cpu_us_per_termination(),
        pct(r.cpu.daemon, core_s),
        pct(r.cpu.sandbox, core_s),
        pct(r.cpu.rabbitmq, core_s),
        pct(r.cpu.postgres, core_s),
    )
}

pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn thousands_f(x: f64) -> String {
    if x.is_finite() && x >= 0.0 {
        thousands(x.round() as u64)
    } else {
        format!("{x}")
    }
}
