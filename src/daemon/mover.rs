//! Moves parked requests back to the request queue: everything at start
//! (whatever a daemon parked before it stopped), and a held project's
//! requests when its probe succeeds. See `broker::parking` for the
//! guarantee of a move.

use super::holds::Holds;
use crate::broker::Parking;
use crate::domain::ProjectId;
use crate::telemetry::cause_chain;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long to wait before trying a move again (no session yet, or the
/// broker failed mid-pass).
const RETRY: Duration = Duration::from_secs(2);

pub(super) async fn run(
    parking: Parking,
    holds: Arc<Holds>,
    mut released: mpsc::UnboundedReceiver<ProjectId>,
    stop: CancellationToken,
) {
    // At start nothing is held: every parked request goes back, and is
    // judged afresh (parked again if its project is still refused).
    loop {
        // One pass, tried until it goes through.
        loop {
            let stays = |project: &str| ProjectId::parse(project).is_ok_and(|p| holds.is_held(&p));
            let pass = tokio::select! {
                pass = parking.move_back(stays) => pass,
                () = stop.cancelled() => return,
            };
            match pass {
                Ok(moved) => {
                    if moved.back > 0 {
                        tracing::info!(
                            moved_back = moved.back,
                            still_parked = moved.kept,
                            "parked requests moved back to the request queue"
                        );
                    }
                    break;
                }
                Err(e) => {
                    tracing::debug!(
                        error.cause_chain = %cause_chain(&e),
                        "moving parked requests failed; trying again"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            project = released.recv() => {
                if project.is_none() {
                    return;
                }
                // Releases that came meanwhile are served by one pass.
                while released.try_recv().is_ok() {}
            }
            () = stop.cancelled() => return,
        }
    }
}
