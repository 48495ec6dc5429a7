//! The pipeline's [`Store`] and [`Letters`] as the daemon provides them:
//! the audit's writer and lookup tasks, and the broker's dead-letter
//! publisher. Each retries until done, or until the shutdown grace is over.

use super::pipeline::{Letters, Store};
use crate::audit::{Audit, AuditWriter, FinalLookups, Record, Recorded};
use crate::broker::{DeadLetters, Parking};
use crate::domain::DeadLetter;
use std::collections::{HashMap, HashSet};
use tokio_util::sync::CancellationToken;

pub struct AuditStore {
    pub writer: AuditWriter,
    pub lookups: FinalLookups,
    pub audit: Audit,
    pub abort: CancellationToken,
}

impl Store for AuditStore {
    async fn commit(&self, record: Record) -> bool {
        self.writer.commit(record).await
    }

    async fn already_final(&self, ids: Vec<String>) -> Option<HashSet<String>> {
        self.lookups.already_final(ids).await
    }

    async fn attempts_recorded(&self, ids: &[String]) -> Option<HashMap<String, Recorded>> {
        self.audit
            .until_done("attempt lookup", &self.abort, || {
                self.audit.attempts_recorded(ids)
            })
            .await
    }
}

pub struct BrokerLetters {
    pub dead_letters: DeadLetters,
    pub parking: Parking,
    pub abort: CancellationToken,
}

impl Letters for BrokerLetters {
    async fn publish(&self, letter: &DeadLetter, held: &CancellationToken) -> bool {
        // Fail fast once the message is back in the queue, rather than
        // retry on a channel that is gone.
        tokio::select! {
            biased;
            () = held.cancelled() => false,
            published = self.dead_letters.publish(letter, &self.abort) => published,
        }
    }

    async fn park(&self, letter: &DeadLetter, held: &CancellationToken) -> bool {
        tokio::select! {
            biased;
            () = held.cancelled() => false,
            parked = self.parking.park(letter, &self.abort) => parked,
        }
    }
}
