//! Webhooks: every event ([`Hook`]) posted as JSON to each configured URL.
//!
//! Each URL has its own queue and one delivery at a time, so a receiver gets events in
//! the order they happened (in particular per room), and a slow or dead receiver holds up
//! only itself. A failed delivery (no connection, or a status other than 2xx) is retried
//! after 0.5, 1, 2 and 4 s, then logged and dropped. Queues hold up to [`QUEUE`] events;
//! beyond that new events for that URL are dropped with a warning. Nothing here is ever
//! awaited by the portal or the media path: `emit` only queues.
//!
//! Body: the event's fields plus `id` (unique per event) and `createdAt` (ms since the
//! epoch). Headers: `X-Tessera-Timestamp` (seconds since the epoch, at sending) and
//! `X-Tessera-Signature: v1=<hex HMAC-SHA256(service key, "<timestamp>.<body>")>`, so a
//! receiver checks both the body and its freshness (docs/operator-guide.md, "Webhooks").

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_core::hooks::{Hook, HookSink};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

/// Events queued per URL before new ones are dropped.
pub const QUEUE: usize = 10_000;
/// Attempts per event.
const ATTEMPTS: u32 = 5;
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The webhook sender: one queue and one delivery task per URL.
pub struct Webhooks {
    queues: Vec<(String, mpsc::Sender<Arc<str>>)>,
    /// Events queued or being delivered, over every URL.
    pending: Arc<AtomicUsize>,
}

impl Webhooks {
    /// Starts delivering to `urls`, signing with `key`. Must be called inside a tokio runtime.
    /// https receivers are checked against the system's roots.
    pub fn start(urls: &[String], key: &str) -> anyhow::Result<Arc<Webhooks>> {
        let client = reqwest::Client::builder().build().map_err(|e| anyhow::anyhow!("webhooks: the HTTP client: {e}"))?;
        let pending = Arc::new(AtomicUsize::new(0));
        let queues = urls
            .iter()
            .map(|url| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(deliver(client.clone(), url.clone(), key.as_bytes().to_vec(), rx, pending.clone()));
                (url.clone(), tx)
            })
            .collect();
        Ok(Arc::new(Webhooks { queues, pending }))
    }

    /// Waits (at most `within`) until every queued event was delivered or given up, so
    /// the events of a stop (participants leaving, recordings finishing) go out.
    pub async fn flush(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                warn!(events = self.pending.load(Ordering::Acquire), "webhook events still undelivered at exit");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl HookSink for Webhooks {
    fn emit(&self, hook: Hook) {
        let mut body = match serde_json::to_value(&hook) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return,
        };
        body.insert("id".into(), tessera_core::ids::random_hex(8).into());
        body.insert("createdAt".into(), u64::try_from(now().as_millis()).unwrap_or(u64::MAX).into());
        let body: Arc<str> = serde_json::Value::Object(body).to_string().into();
        for (url, queue) in &self.queues {
            self.pending.fetch_add(1, Ordering::AcqRel);
            if queue.try_send(body.clone()).is_err() {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                warn!(url = %url, room = ?hook.room(), "webhook queue full or closed; event dropped");
            }
        }
    }
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Posts the events of one URL, one at a time, in order.
async fn deliver(client: reqwest::Client, url: String, key: Vec<u8>, mut events: mpsc::Receiver<Arc<str>>, pending: Arc<AtomicUsize>) {
    while let Some(body) = events.recv().await {
        post(&client, &url, &key, &body).await;
        pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Delivers one event, retrying with backoff; gives up (logged) after [`ATTEMPTS`].
async fn post(client: &reqwest::Client, url: &str, key: &[u8], body: &str) {
    let mut pause = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        let timestamp = now().as_secs().to_string();
        let signature = tessera_core::crypto::hmac_sha256_hex(key, format!("{timestamp}.{body}").as_bytes());
        let sent = client
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Tessera-Timestamp", &timestamp)
            .header("X-Tessera-Signature", format!("v1={signature}"))
            .body(body.to_string())
            .timeout(ATTEMPT_TIMEOUT)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => break,
            Ok(r) => debug!(url = %url, status = %r.status(), attempt, "webhook refused"),
            Err(e) => debug!(url = %url, error = %e, attempt, "webhook not delivered"),
        }
        if attempt == ATTEMPTS {
            error!(url = %url, attempts = ATTEMPTS, "webhook event dropped: the receiver did not take it");
            break;
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}
