//! The open-files limit: every API call in flight holds a connection, so
//! `CONCURRENCY=1024` needs more than the 1,024 open files many systems
//! allow a process by default (the soft limit; the hard one is usually far
//! higher). Past the limit a call fails to connect, and its request would
//! use up its attempts on a fault of the host, not of the API.

use super::ConfigError;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Files the daemon keeps open besides its calls' connections: the broker,
/// the audit's pool, the metrics listener, IAM, logs, with room to spare.
pub const BESIDES_CALLS: u64 = 64;

/// Raise this process's soft limit on open files to its hard limit, as Go's
/// runtime does at start: a process may always do so. Returns the soft
/// limit now in force (`None`: unlimited).
pub fn raise_to_hard_limit() -> Option<u64> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current != maximum {
        // Refused only where the hard limit is "unlimited" and the kernel
        // wants a number (macOS): the soft limit then stays as it was.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: maximum,
                maximum,
            },
        );
    }
    getrlimit(Resource::Nofile).current
}

/// Whether `limit` open files are enough for `concurrency` calls in flight.
pub fn check(limit: Option<u64>, concurrency: usize) -> Result<(), ConfigError> {
    let needed = concurrency as u64 + BESIDES_CALLS;
    match limit {
        Some(limit) if limit < needed => Err(ConfigError(format!(
            "CONCURRENCY={concurrency} needs about {needed} open files, but this process may \
             open only {limit} (its hard limit: raise it with `ulimit -Hn`, or LimitNOFILE= \
             in a systemd unit), or lower CONCURRENCY"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let hard = getrlimit(Resource::Nofile).maximum;
        assert_eq!(raise_to_hard_limit(), hard);
    }

    #[test]
    fn concurrency_must_fit_in_the_limit() {
        assert!(check(Some(1024), 960).is_ok());
        assert!(check(None, 10_000).is_ok());
        let refused = check(Some(1024), 1024).expect_err("too many").0;
        assert!(
            refused.contains("CONCURRENCY=1024") && refused.contains("1088"),
            "{refused}"
        );
    }
}
