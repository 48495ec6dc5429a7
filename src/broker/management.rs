//! The RabbitMQ management API, for what AMQP cannot tell: how many of a
//! queue's messages are delivered and not yet acked. Credentials come from
//! `AMQP_URL`.

use super::Admin;
use crate::settings::AmqpSettings;
use std::time::Duration;

/// What is pending in a queue. `unacked` is known only through the
/// management API; without it, AMQP tells only what is waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: Option<u64>,
    pub unacked: Option<u64>,
    /// Requests waiting in the parking queue (their project is held).
    pub parked: Option<u64>,
}

/// The counts of `settings.queue`: from the management API at
/// `management_url` (checked by `settings::management_url`) when it
/// answers, else the ready count over AMQP.
pub async fn queue_counts(settings: &AmqpSettings, management_url: &url::Url) -> QueueCounts {
    let managed = from_management(settings, management_url).await;
    let (ready, parked) = match Admin::open(settings).await {
        Ok(admin) => {
            let ready = match managed {
                Some(_) => None,
                None => admin.depth(&settings.queue).await,
            };
            let parked = admin.depth(&settings.parking_queue).await;
            admin.close().await;
            (ready, parked)
        }
        Err(_) => (None, None),
    };
    match managed {
        Some((ready, unacked)) => QueueCounts {
            ready: Some(ready),
            unacked: Some(unacked),
            parked: parked.map(u64::from),
        },
        None => QueueCounts {
            ready: ready.map(u64::from),
            unacked: None,
            parked: parked.map(u64::from),
        },
    }
}

async fn from_management(settings: &AmqpSettings, management_url: &url::Url) -> Option<(u64, u64)> {
    let uri = super::uri(settings).ok()?;
    let encode = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let url = format!(
        "{}/api/queues/{}/{}",
        management_url.as_str().trim_end_matches('/'),
        encode(&uri.vhost),
        encode(&settings.queue)
    );
    let auth = &uri.authority.userinfo;
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(5));
    if let Some(ca) = &settings.tls.ca_pem {
        // The system's roots, and the private CA.
        client = client.tls_certs_merge(reqwest::Certificate::from_pem_bundle(ca.as_bytes()).ok()?);
    }
    let resp = client
        .build()
        .ok()?
        .get(url)
        .basic_auth(&auth.username, Some(&auth.password))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&resp.text().await.ok()?).ok()?;
    Some((
        v["messages_ready"].as_u64()?,
        v["messages_unacknowledged"].as_u64()?,
    ))
}
