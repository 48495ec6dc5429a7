//! Logging: human lines on a terminal, JSON for log shippers. `RUST_LOG`
//! filters (default `info`, plus the directives the adapters give to quiet
//! their clients' own lines about lost connections: the daemon logs each
//! such event once itself).

use crate::settings::LogFormat;
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

/// Start logging. Without `RUST_LOG`, the filter is `info` plus `quiet`:
/// directives such as `broker::QUIET_LOGS`.
pub fn init(format: LogFormat, quiet: &[&str]) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let mut directives = vec!["info"];
        directives.extend_from_slice(quiet);
        EnvFilter::new(directives.join(","))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// An error with its whole `source()` chain, for `error.cause_chain = %...`.
pub fn cause_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// `err` and its causes. An I/O error's `source()` skips the error it
/// wraps (which may be another I/O error, wrapping a rustls one), so it is
/// looked into.
pub fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| {
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        }
    })
}

/// The rustls error somewhere in `err`'s causes, as one line.
pub fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    causes(err).find_map(|e| e.downcast_ref::<rustls::Error>().map(ToString::to_string))
}

#[cfg(test)]
mod tls_tests {
    use super::tls_failure;

    #[test]
    fn a_rustls_error_is_found_inside_nested_io_errors() {
        let rustls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls);
        let outer = std::io::Error::other(inner);
        assert_eq!(
            tls_failure(&outer).as_deref(),
            Some("invalid peer certificate: UnknownIssuer")
        );
        assert_eq!(tls_failure(&std::io::Error::other("refused")), None);
    }
}

/// A run of the same failure, logged as its first occurrence and then one
/// line a minute saying how many followed.
#[derive(Debug, Default)]
pub struct Repeats {
    /// When the last line was logged, and the failures since.
    logged: Option<(Instant, u64)>,
}

impl Repeats {
    const EVERY: Duration = Duration::from_secs(60);

    /// Another failure. `Some(n)` when a line is due: `n` failures followed
    /// the last line (0 for the first of the run).
    pub fn failed(&mut self) -> Option<u64> {
        match &mut self.logged {
            None => {
                self.logged = Some((Instant::now(), 0));
                Some(0)
            }
            Some((at, since)) => {
                *since += 1;
                if at.elapsed() < Self::EVERY {
                    return None;
                }
                let n = *since;
                *at = Instant::now();
                *since = 0;
                Some(n)
            }
        }
    }

    /// The run is over; returns how many failures it had, if any.
    pub fn ended(&mut self) -> Option<u64> {
        self.logged.take().map(|(_, since)| since + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_logs_its_first_then_counts() {
        let mut r = Repeats::default();
        assert_eq!(r.failed(), Some(0));
        assert_eq!(r.failed(), None);
        assert_eq!(r.failed(), None);
        assert_eq!(r.ended(), Some(3));
        assert_eq!(r.ended(), None);
        assert_eq!(r.failed(), Some(0), "a new run logs its first again");
    }
}
