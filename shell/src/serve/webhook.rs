//! Webhooks: chosen event lines POSTed as JSON to configured URLs, e.g. Home Assistant's
//! webhook trigger (`http://homeassistant.local:8123/api/webhook/<id>`).
//!
//! Each webhook has its own bounded queue and one task that delivers in order, with retries
//! and backoff; a full queue drops the event (counted), so a slow or dead receiver never
//! slows the loop, a call or the other webhooks. The URL's path (Home Assistant's webhook id
//! is a secret) never reaches a log line: only scheme, host and port are shown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use call_assist_core::Secret;
use serde_json::{json, Value};
use smol::channel::Sender;
use tracing::{debug, warn};

/// Events queued per webhook; when full, new events are dropped (counted in `/health`).
pub const QUEUE: usize = 256;
/// One delivery attempt may take this long.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between attempts: doubling from the first to the largest.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Attempts per event before it is given up (counted as failed).
const ATTEMPTS: u32 = 5;

/// The events a webhook gets unless its `events` key says otherwise.
pub const DEFAULT_EVENTS: &[&str] = &[
    "incoming",
    "state",
    "ended",
    "dtmf",
    "door",
    "camera",
    "talkback",
    "speaker",
    "microphone",
    "homeserver",
];

/// Event kinds a webhook may ask for besides the default ones.
pub const MORE_EVENTS: &[&str] = &[
    "ready",
    "recording",
    "recorded",
    "forwarding",
    "keyframe_request",
    "relay",
    "relay_failed",
    "relay_lost",
    "stun",
    "reload",
    "panic",
    "error",
];

/// One configured webhook.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: Secret,
    pub events: Vec<String>,
}

impl PartialEq for WebhookConfig {
    fn eq(&self, other: &Self) -> bool {
        self.url.expose() == other.url.expose() && self.events == other.events
    }
}

/// What became of a webhook's events.
#[derive(Debug, Default)]
pub struct Stats {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
}

/// A started webhook: where its events go in, and its counters.
pub struct Webhook {
    pub shown: String,
    pub events: Vec<String>,
    pub tx: Sender<String>,
    pub stats: Arc<Stats>,
    /// Events dropped because the queue was full (counted where they are queued).
    pub dropped: Arc<AtomicU64>,
}

impl Webhook {
    /// `/health`'s view of it.
    pub fn health(&self) -> Value {
        json!({
            "url": self.shown,
            "delivered": self.stats.delivered.load(Ordering::Relaxed),
            "failed": self.stats.failed.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
        })
    }
}

/// `scheme://host:port/…`: enough to tell webhooks apart, nothing of the secret path.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}/…",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Starts the delivery task of `config`.
pub fn start(config: &WebhookConfig) -> Result<Webhook, reqwest::Error> {
    let client = reqwest::Client::builder().timeout(TIMEOUT).build()?;
    let (tx, rx) = smol::channel::bounded::<String>(QUEUE);
    let stats = Arc::new(Stats::default());
    let shown = redact(config.url.expose());
    let url = config.url.clone();
    {
        let (stats, shown) = (stats.clone(), shown.clone());
        // reqwest needs a tokio context from building a request on (its timeout).
        smol::spawn(async_compat::Compat::new(async move {
            while let Ok(body) = rx.recv().await {
                deliver(&client, &url, &shown, body, &stats).await;
            }
        }))
        .detach();
    }
    Ok(Webhook {
        shown,
        events: config.events.clone(),
        tx,
        stats,
        dropped: Arc::default(),
    })
}

/// POSTs one event, retrying with backoff on connection errors and 5xx answers.
async fn deliver(client: &reqwest::Client, url: &Secret, shown: &str, body: String, stats: &Stats) {
    let mut wait = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        let request = client
            .post(url.expose())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send();
        match request.await {
            Ok(r) if r.status().is_success() => {
                debug!(webhook = shown, "event delivered");
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                // The receiver refuses this event; sending it again will not change that.
                warn!(webhook = shown, status = %r.status(), "webhook refused an event");
                break;
            }
            Ok(r) => warn!(webhook = shown, attempt, status = %r.status(), "webhook failed"),
            // Without the URL: reqwest's message would carry it.
            Err(e) => warn!(
                webhook = shown,
                attempt,
                "webhook failed: {}",
                e.without_url()
            ),
        }
        if attempt < ATTEMPTS {
            smol::Timer::after(wait).await;
            wait = (wait * 2).min(MAX_RETRY);
        }
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_url_is_shown_without_its_secret_path() {
        let shown = redact("http://ha.local:8123/api/webhook/s3cret-id?x=1");
        assert_eq!(shown, "http://ha.local:8123/…");
        assert!(!shown.contains("s3cret"));
        assert_eq!(
            redact("https://example.org/api/webhook/abc"),
            "https://example.org/…"
        );
    }
}
