//! Which projects the credentials do not cover right now.
//!
//! A 401 (or a credential that cannot be had for a project) holds that
//! project only: its requests are neither sent on nor failed, and the other
//! projects run at full speed. The first request that finds its project
//! held becomes the project's prober and stays in memory, trying again on
//! the probe schedule (1 s doubling to 30 s); the project's later requests
//! are parked (see `daemon::pipeline`). When the probe is answered with
//! anything but a 401, the project is released, and its parked requests
//! are moved back to the request queue.
//!
//! When every project the daemon has recently called is held, the
//! credentials themselves are wrong: the daemon pauses (takes no new
//! messages) as it did before projects were told apart.

use crate::domain::ProjectId;
use crate::metrics::Metrics;
use crate::retry::ProbeSchedule;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A project called within this long counts as "recently seen" for the
/// global pause.
const RECENT: Duration = Duration::from_secs(600);
/// A project's last-seen time is refreshed at most this often (it is taken
/// on every answered call; most of them need not write).
const SEEN_RESOLUTION: Duration = Duration::from_secs(1);

/// What a request that found its project held is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Stay in memory and probe the API for the project.
    Prober,
    /// Another request probes: park this one.
    Park,
}

#[derive(Debug)]
struct Hold {
    schedule: ProbeSchedule,
    has_prober: bool,
}

#[derive(Debug, Default)]
struct State {
    held: HashMap<ProjectId, Hold>,
    /// When each project last had a call answered with something other
    /// than a 401.
    seen: HashMap<ProjectId, Instant>,
}

#[derive(Debug)]
pub struct Holds {
    state: Mutex<State>,
    /// `true` while the daemon takes messages: not every recent project
    /// is held.
    open: watch::Sender<bool>,
    /// Turned by a release: a project's probe succeeding (the credentials
    /// may have been renewed) makes the other probers try again soon.
    released: Notify,
    /// The projects released, for the mover of parked requests.
    moves: mpsc::UnboundedSender<ProjectId>,
    metrics: Arc<Metrics>,
}

impl Holds {
    /// The holds, and the receiver of released projects (whose parked
    /// requests are to be moved back).
    pub fn new(metrics: Arc<Metrics>) -> (Self, mpsc::UnboundedReceiver<ProjectId>) {
        let (moves, released) = mpsc::unbounded_channel();
        let holds = Self {
            state: Mutex::new(State::default()),
            open: watch::Sender::new(true),
            released: Notify::new(),
            moves,
            metrics,
        };
        (holds, released)
    }

    pub fn is_held(&self, project: &ProjectId) -> bool {
        self.lock().held.contains_key(project)
    }

    /// The held projects, sorted (for `/readyz`).
    pub fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = self.lock().held.keys().map(|p| p.to_string()).collect();
        held.sort();
        held
    }

    /// Whether the daemon is taking messages (not every recent project held).
    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Wait until the daemon takes messages again; `false` if `cancel`
    /// fires first.
    pub async fn wait_open(&self, cancel: &CancellationToken) -> bool {
        let mut rx = self.open.subscribe();
        tokio::select! {
            open = rx.wait_for(|open| *open) => open.is_ok(),
            () = cancel.cancelled() => false,
        }
    }

    /// A call for `project` was answered with something other than a 401.
    pub fn seen(&self, project: &ProjectId) {
        let now = Instant::now();
        let mut state = self.lock();
        match state.seen.get_mut(project) {
            Some(at) if now.saturating_duration_since(*at) < SEEN_RESOLUTION => return,
            Some(at) => *at = now,
            None => {
                state.seen.insert(project.clone(), now);
            }
        }
        // An answer for a project that is not held: not every project is.
        if !state.held.contains_key(project) {
            self.set_open(&state);
        }
    }

    /// `project`'s calls are refused. The first request to find it so
    /// probes; the rest park.
    pub fn hold(&self, project: &ProjectId, why: &str) -> Role {
        let mut state = self.lock();
        let role = match state.held.get_mut(project) {
            Some(hold) if hold.has_prober => Role::Park,
            Some(hold) => {
                hold.has_prober = true;
                Role::Prober
            }
            None => {
                tracing::error!(
                    project_id = %project,
                    "{why}. Holding this project's requests (parked, not failed) and probing \
                     the API until it accepts the credentials for it; other projects go on"
                );
                state.held.insert(
                    project.clone(),
                    Hold {
                        schedule: ProbeSchedule::new(),
                        has_prober: true,
                    },
                );
                self.metrics.set_project_held(project.as_str(), true);
                Role::Prober
            }
        };
        self.set_open(&state);
        role
    }

    /// The prober of `project` gave up (shutdown, or its request ended
    /// another way): the next request to find the project held probes.
    pub fn prober_left(&self, project: &ProjectId) {
        if let Some(hold) = self.lock().held.get_mut(project) {
            hold.has_prober = false;
        }
    }

    /// The delay before the next probe of `project`.
    pub fn next_probe(&self, project: &ProjectId) -> Duration {
        self.lock()
            .held
            .get(project)
            .map_or(ProbeSchedule::FIRST, |h| h.schedule.current())
    }

    /// A probe of `project` was refused again.
    pub fn probe_failed(&self, project: &ProjectId, why: &str) {
        let mut state = self.lock();
        if let Some(hold) = state.held.get_mut(project) {
            hold.schedule.failed();
            tracing::warn!(
                project_id = %project,
                next_probe_in_s = hold.schedule.current().as_secs(),
                "still held: {why}"
            );
        }
    }

    /// A probe of `project` was answered: release it, wake the other
    /// probers, and have its parked requests moved back.
    pub fn release(&self, project: &ProjectId) {
        let mut state = self.lock();
        if state.held.remove(project).is_none() {
            return;
        }
        state.seen.insert(project.clone(), Instant::now());
        for hold in state.held.values_mut() {
            hold.schedule.reset();
        }
        tracing::info!(
            project_id = %project,
            "the AOM API accepts the credentials for this project again; releasing its requests"
        );
        self.metrics.set_project_held(project.as_str(), false);
        self.set_open(&state);
        drop(state);
        self.released.notify_waiters();
        // The receiver lives as long as the daemon; after it, nothing is
        // left to move.
        let _ = self.moves.send(project.clone());
    }

    /// Resolves when some project is released.
    pub async fn some_release(&self) {
        self.released.notified().await;
    }

    fn set_open(&self, state: &State) {
        let now = Instant::now();
        let all_held = !state.held.is_empty()
            && state
                .seen
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(**at) < RECENT)
                .all(|(p, _)| state.held.contains_key(p));
        let open = !all_held;
        let was = self.open.send_replace(open);
        if was != open {
            self.metrics.set_paused(!open);
            if open {
                tracing::info!("a project's calls are answered again; taking messages");
            } else {
                tracing::error!(
                    "every project recently called is refused (401): the credentials are wrong \
                     or expired. Pausing: no new messages are taken, and the API is probed \
                     until it accepts them"
                );
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain maps: a panic elsewhere cannot leave them half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}
