//! Request ids being worked on right now in this daemon, so that one sent
//! by two messages at once is sent once.

use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::watch;

/// Request ids being worked on right now, so that one sent by two messages
/// at once is sent once: the second waits for the first one's outcome.
#[derive(Debug, Default)]
pub struct InFlight {
    leaders: Mutex<HashMap<String, watch::Receiver<Option<bool>>>>,
}

pub enum Claim<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Option<bool>>),
}

/// The one working on a request_id. Tells followers whether its outcome
/// was committed; dropping it unfinished tells them "not committed".
pub struct Leader<'a> {
    owner: &'a InFlight,
    request_id: String,
    done: watch::Sender<Option<bool>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Receiver<Option<bool>>>> {
        // Inserts and removes are single calls; a poisoned map is consistent.
        self.leaders.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn claim(&self, request_id: &str) -> Claim<'_> {
        let mut leaders = self.lock();
        if let Some(rx) = leaders.get(request_id) {
            return Claim::Follower(rx.clone());
        }
        let (done, rx) = watch::channel(None);
        leaders.insert(request_id.to_owned(), rx);
        Claim::Leader(Leader {
            owner: self,
            request_id: request_id.to_owned(),
            done,
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader<'_> {
    pub fn finish(self, committed: bool) {
        self.done.send_replace(Some(committed));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Publish before unregistering: a newcomer either follows and sees
        // the result, or finds no leader and looks the outcome up.
        if self.done.borrow().is_none() {
            self.done.send_replace(Some(false));
        }
        self.owner.lock().remove(&self.request_id);
    }
}

pub async fn follow(mut rx: watch::Receiver<Option<bool>>) -> bool {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_follows_the_first() {
        let in_flight = InFlight::default();
        let Claim::Leader(leader) = in_flight.claim("r1") else {
            panic!("first claim leads")
        };
        let Claim::Follower(rx) = in_flight.claim("r1") else {
            panic!("second claim follows")
        };
        assert!(matches!(in_flight.claim("r2"), Claim::Leader(_)));
        leader.finish(true);
        assert!(follow(rx).await);
        assert!(in_flight.is_empty(), "a finished leader unregisters");
    }

    #[tokio::test]
    async fn an_unfinished_leader_tells_followers_nothing_was_committed() {
        let in_flight = InFlight::default();
        let leader = in_flight.claim("r1");
        let Claim::Follower(rx) = in_flight.claim("r1") else {
            panic!("second claim follows")
        };
        drop(leader);
        assert!(!follow(rx).await);
        assert!(matches!(in_flight.claim("r1"), Claim::Leader(_)));
    }
}
