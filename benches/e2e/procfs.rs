//! CPU and memory from /proc: per-process and machine CPU ticks, RSS.

use anyhow::{Context, Result};
use std::collections::HashMap;

/// CPU seconds over the window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSplit {
    pub(crate) daemon: f64,
    pub(crate) sandbox: f64,
    pub(crate) rabbitmq: f64,
    pub(crate) postgres: f64,
    pub(crate) machine: f64,
    pub(crate) bench: f64,
}

impl CpuSplit {
    /// From `start` to `end`, at `clk_tck` ticks a second. The daemon is
    /// counted from 0: `start` was taken before it was spawned.
    pub(crate) fn between(start: &CpuSnapshot, end: &CpuSnapshot, clk_tck: f64) -> Self {
        let ticks = |t: u64| t as f64 / clk_tck;
        Self {
            daemon: ticks(end.daemon),
            sandbox: ticks(end.sandbox.saturating_sub(start.sandbox)),
            rabbitmq: ticks(delta(&start.rabbitmq, &end.rabbitmq)),
            postgres: ticks(delta(&start.postgres, &end.postgres)),
            machine: ticks(end.machine.saturating_sub(start.machine)),
            bench: ticks(end.bench.saturating_sub(start.bench)),
        }
    }
}

/// CPU ticks (utime + stime) at one instant.
pub(crate) struct CpuSnapshot {
    daemon: u64,
    sandbox: u64,
    rabbitmq: HashMap<u32, u64>,
    postgres: HashMap<u32, u64>,
    machine: u64,
    bench: u64,
}

impl CpuSnapshot {
    pub(crate) fn take(sandbox: u32, daemon: Option<u32>) -> Result<Self> {
        let mut rabbitmq = HashMap::new();
        let mut postgres = HashMap::new();
        for pid in pids()? {
            let Some(comm) = proc_comm(pid) else { continue };
            let group = if matches!(
                comm.as_str(),
                "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost"
            ) {
                &mut rabbitmq
            } else if comm.starts_with("postgres") {
                &mut postgres
            } else {
                continue;
            };
            if let Some(t) = proc_ticks(pid) {
                group.insert(pid, t);
            }
        }
        Ok(Self {
            daemon: daemon.and_then(proc_ticks).unwrap_or(0),
            sandbox: proc_ticks(sandbox).unwrap_or(0),
            rabbitmq,
            postgres,
            machine: machine_busy_ticks()?,
            bench: proc_ticks(std::process::id()).unwrap_or(0),
        })
    }
}

/// Sum of per-pid deltas; a pid absent at the start (a new backend) counts
/// from 0.
fn delta(start: &HashMap<u32, u64>, end: &HashMap<u32, u64>) -> u64 {
    end.iter()
        .map(|(pid, &e)| match start.get(pid) {
            Some(&s) if s <= e => e - s,
            _ => e,
        })
        .sum()
}

fn pids() -> Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc")
        .context("list /proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is the first, utime the 12th, stime the 13th.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Busy ticks of the whole machine: the `cpu` line of /proc/stat without
/// idle and iowait (and without guest/guest_nice, which the kernel already
/// counts in user/nice).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Ok(fields
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4 | 8 | 9))
        .map(|(_, v)| v)
        .sum())
}

/// A `kB` line of /proc/<pid>/status, e.g. `VmRSS:`.
pub(crate) fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub(crate) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}
