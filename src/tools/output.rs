//! Where the tools write. Data goes to standard output through [`Stdout`],
//! whose writes return errors rather than panic; a reader that stops early
//! (`| head`) makes a write fail with [`StdoutClosed`], which `main` turns
//! into a quiet exit 0. Progress, summaries and complaints go to standard
//! error through `note!`.

use std::io::{self, BufWriter, IsTerminal, Write};
use std::time::Instant;

/// Standard output, buffered. A write that finds the pipe closed fails with
/// `ErrorKind::BrokenPipe` carrying [`StdoutClosed`], so that a broken pipe
/// here is not mistaken for one on a socket to the broker or the database
/// (which is a real failure and must not end quietly).
pub struct Stdout(BufWriter<Marked>);

impl Stdout {
    pub fn new() -> Self {
        Self(BufWriter::new(Marked(io::stdout())))
    }
}

impl Default for Stdout {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The process's standard output, its broken pipes marked.
struct Marked(io::Stdout);

impl Write for Marked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(mark)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(mark)
    }
}

fn mark(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

/// Standard output's reader went away: nobody wants the rest.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Whether `error` is, anywhere in its chain, standard output closed by its
/// reader.
pub fn stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<StdoutClosed>()
            || cause.downcast_ref::<io::Error>().is_some_and(|io| {
                io.kind() == io::ErrorKind::BrokenPipe
                    && io.get_ref().is_some_and(|inner| inner.is::<StdoutClosed>())
            })
    })
}

/// A `csv::Error` as an error whose chain shows its `io::Error` (csv's own
/// error has no `source`, which would hide a closed pipe).
pub fn csv_error(error: csv::Error) -> anyhow::Error {
    match error.into_kind() {
        csv::ErrorKind::Io(io) => io.into(),
        other => anyhow::anyhow!("cannot write CSV: {other:?}"),
    }
}

/// One line on standard error. A closed or broken standard error is no
/// reason to stop the work (`eprintln!` would panic): the line is dropped.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use note;

/// A progress bar with rate and ETA on a terminal (standard error); a
/// plain line per tenth otherwise. `what` says what is counted.
pub struct Progress {
    total: usize,
    what: &'static str,
    started: Instant,
    tty: bool,
    last_tenth: usize,
}

impl Progress {
    pub fn new(total: usize, what: &'static str) -> Self {
        Self {
            total,
            what,
            started: Instant::now(),
            tty: io::stderr().is_terminal(),
            last_tenth: 0,
        }
    }

    pub fn update(&mut self, done: usize) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let (total, what) = (self.total, self.what);
        if self.tty {
            let width = 30;
            let filled = (width * done / total.max(1)).min(width);
            let eta = total.saturating_sub(done) as f64 / rate.max(1e-9);
            let mut stderr = io::stderr();
            let _ = write!(
                stderr,
                "\r[{}{}] {done}/{total} {what}, {rate:.0}/s, eta {eta:.0}s ",
                "#".repeat(filled),
                " ".repeat(width - filled),
            );
            let _ = stderr.flush();
        } else {
            let tenth = 10 * done / total.max(1);
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                note!("{done}/{total} {what} ({rate:.0}/s)");
            }
        }
    }

    pub fn finish(&self) {
        if self.tty {
            note!("");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_closed_stdout_counts_as_one() {
        let closed = anyhow::Error::from(mark(io::ErrorKind::BrokenPipe.into()))
            .context("writing the report");
        assert!(stdout_closed(&closed));
        // A broken pipe on a socket (the broker, the database) is a failure.
        let socket =
            anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe)).context("publishing");
        assert!(!stdout_closed(&socket));
        let other = anyhow::Error::from(mark(io::ErrorKind::WriteZero.into()));
        assert!(!stdout_closed(&other));
    }

    #[test]
    fn csv_errors_show_their_io_error() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(mark(io::ErrorKind::BrokenPipe.into()))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = csv::Writer::from_writer(Closed);
        let result = w
            .write_record(["a", "b"])
            .and_then(|()| w.flush().map_err(csv::Error::from));
        let err = csv_error(result.expect_err("the pipe is closed"));
        assert!(stdout_closed(&err), "{err:?}");
    }
}
