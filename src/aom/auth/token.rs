//! A static token, or one read from a file and re-read when it changes (a
//! mounted Kubernetes secret is rotated by swapping the file).

use super::AuthError;
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often the file's metadata is looked at between 401s.
const CHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct TokenSource {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Fixed(HeaderValue),
    File {
        path: PathBuf,
        state: Mutex<FileState>,
    },
}

#[derive(Debug)]
struct FileState {
    token: HeaderValue,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
    generation: u64,
}

impl TokenSource {
    pub fn fixed(token: &SecretString) -> Result<Self, AuthError> {
        Ok(Self {
            kind: Kind::Fixed(header(token.expose_secret()).ok_or_else(|| {
                AuthError::TokenFile {
                    path: "AOM_AUTH_TOKEN".to_owned(),
                    reason: "not a valid header value".to_owned(),
                }
            })?),
        })
    }

    pub fn file(path: &Path) -> Result<Self, AuthError> {
        let (token, stamp) = read(path)?;
        Ok(Self {
            kind: Kind::File {
                path: path.to_owned(),
                state: Mutex::new(FileState {
                    token,
                    stamp,
                    checked: Instant::now(),
                    generation: 0,
                }),
            },
        })
    }

    pub fn current(&self) -> Result<(HeaderValue, u64), AuthError> {
        match &self.kind {
            Kind::Fixed(token) => Ok((token.clone(), 0)),
            Kind::File { path, state } => {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                if s.checked.elapsed() >= CHECK_EVERY {
                    refresh(path, &mut s, false);
                }
                Ok((s.token.clone(), s.generation))
            }
        }
    }

    /// After a 401 with `generation`: re-read the file now. `true` if the
    /// token in use is no longer the one that was refused.
    pub fn rejected(&self, generation: u64) -> bool {
        match &self.kind {
            Kind::Fixed(_) => false,
            Kind::File { path, state } => {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                if s.generation == generation {
                    refresh(path, &mut s, true);
                }
                s.generation != generation
            }
        }
    }
}

fn refresh(path: &Path, s: &mut FileState, force: bool) {
    s.checked = Instant::now();
    let stamp = stamp(path);
    if !force && stamp.is_some() && stamp == s.stamp {
        return;
    }
    match read(path) {
        Ok((token, stamp)) => {
            s.stamp = stamp;
            if token != s.token {
                s.token = token;
                s.generation += 1;
                tracing::info!(path = %path.display(), "the token file changed; using the new token");
            }
        }
        Err(e) => tracing::warn!(error = %e, "keeping the last token read"),
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<(HeaderValue, Option<(SystemTime, u64)>), AuthError> {
    let fail = |reason: String| AuthError::TokenFile {
        path: path.display().to_string(),
        reason,
    };
    let stamp = stamp(path);
    let token = crate::settings::auth::read_token_file(path).map_err(fail)?;
    let token =
        header(token.expose_secret()).ok_or_else(|| fail("not a valid header value".to_owned()))?;
    Ok((token, stamp))
}

fn header(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(token).ok()?;
    value.set_sensitive(true);
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_file_is_picked_up_after_a_401() {
        let dir = std::env::temp_dir().join(format!("aomt-token-{:x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("token");
        std::fs::write(&path, "first\n").expect("write");
        let source = TokenSource::file(&path).expect("readable");
        let (token, generation) = source.current().expect("token");
        assert_eq!(
            token.to_str().ok(),
            Some("first"),
            "trailing newline trimmed"
        );
        assert!(!source.rejected(generation), "unchanged file: nothing new");
        std::fs::write(&path, "second-and-longer").expect("rotate");
        assert!(source.rejected(generation), "rotated file: retry with it");
        let (token, newer) = source.current().expect("token");
        assert_eq!(token.to_str().ok(), Some("second-and-longer"));
        assert_eq!(newer, generation + 1);
        assert!(
            !format!("{source:?}").contains("second"),
            "Debug hides the token"
        );
        std::fs::write(&path, "").expect("empty it");
        assert!(
            !source.rejected(newer),
            "an empty file keeps the last token"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let err = TokenSource::file(Path::new("/nonexistent/aom-token"))
            .expect_err("no such file")
            .to_string();
        assert!(err.contains("/nonexistent/aom-token"), "{err}");
    }
}
