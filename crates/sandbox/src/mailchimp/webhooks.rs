//! List webhooks: registration (with Mailchimp's GET validation ping) and delivery of
//! form-encoded event POSTs from background tasks, retried with growing delays.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::store::{Change, ChangeKind};

/// Mailchimp gives a webhook 10 s to answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Delays before each retry of a failed delivery (Mailchimp retries "at increasing intervals").
const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(10),
    Duration::from_secs(30),
];

/// Which events fire a webhook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Events {
    pub(crate) subscribe: bool,
    pub(crate) unsubscribe: bool,
    pub(crate) profile: bool,
    pub(crate) cleaned: bool,
    pub(crate) upemail: bool,
    pub(crate) campaign: bool,
}

impl Events {
    /// Every event: what a registration without `events` gets.
    pub(crate) fn all() -> Self {
        Self {
            subscribe: true,
            unsubscribe: true,
            profile: true,
            cleaned: true,
            upemail: true,
            campaign: true,
        }
    }
}

/// Whose actions fire a webhook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Sources {
    pub(crate) user: bool,
    pub(crate) admin: bool,
    pub(crate) api: bool,
}

impl Sources {
    /// What a registration without `sources` gets: Mailchimp's web form leaves API-triggered
    /// events off unless asked.
    pub(crate) fn standard() -> Self {
        Self {
            user: true,
            admin: true,
            api: false,
        }
    }
}

/// Who made a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The member (signup form, unsubscribe link, bounce).
    User,
    /// An admin in the web app.
    Admin,
    /// A call through `/3.0`.
    Api,
}

impl Source {
    pub(crate) fn parse(text: &str) -> Option<Source> {
        match text {
            "user" => Some(Source::User),
            "admin" => Some(Source::Admin),
            "api" => Some(Source::Api),
            _ => None,
        }
    }
}

/// A registered webhook.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Webhook {
    pub(crate) id: String,
    pub(crate) url: String,
    pub(crate) events: Events,
    pub(crate) sources: Sources,
    pub(crate) list_id: String,
}

/// Every list's webhooks and the delivery machinery.
#[derive(Debug)]
pub(crate) struct WebhookHub {
    hooks: Mutex<HashMap<String, Vec<Webhook>>>,
    http: reqwest::Client,
    shutdown: CancellationToken,
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
}

impl WebhookHub {
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        // Receivers are the project's own services, next to the sandbox: never through a proxy.
        let http = reqwest::Client::builder()
            .timeout(DELIVERY_TIMEOUT)
            .no_proxy()
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            hooks: Mutex::new(HashMap::new()),
            http,
            shutdown,
            delivered: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
        }
    }

    fn hooks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Webhook>>> {
        self.hooks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deliveries that got a 2xx, and attempts that failed.
    pub(crate) fn counters(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.failed_attempts.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn list(&self, list_id: &str) -> Vec<Webhook> {
        self.hooks().get(list_id).cloned().unwrap_or_default()
    }

    pub(crate) fn get(&self, list_id: &str, id: &str) -> Option<Webhook> {
        self.hooks()
            .get(list_id)?
            .iter()
            .find(|hook| hook.id == id)
            .cloned()
    }

    pub(crate) fn url_taken(&self, list_id: &str, url: &str, except: Option<&str>) -> bool {
        self.hooks().get(list_id).is_some_and(|hooks| {
            hooks
                .iter()
                .any(|h| h.url == url && Some(h.id.as_str()) != except)
        })
    }

    pub(crate) fn insert(&self, hook: Webhook) {
        self.hooks()
            .entry(hook.list_id.clone())
            .or_default()
            .push(hook);
    }

    pub(crate) fn update(&self, hook: Webhook) {
        if let Some(existing) = self
            .hooks()
            .get_mut(&hook.list_id)
            .and_then(|hooks| hooks.iter_mut().find(|h| h.id == hook.id))
        {
            *existing = hook;
        }
    }

    pub(crate) fn remove(&self, list_id: &str, id: &str) -> bool {
        let mut hooks = self.hooks();
        let Some(list) = hooks.get_mut(list_id) else {
            return false;
        };
        let before = list.len();
        list.retain(|hook| hook.id != id);
        before != list.len()
    }

    /// Mailchimp's check on registration: a GET that must answer 2xx.
    pub(crate) async fn validate(&self, url: &str) -> bool {
        let answer = self
            .http
            .get(url)
            .header(
                reqwest::header::USER_AGENT,
                "MailChimp.com WebHook Validator",
            )
            .send()
            .await;
        match answer {
            Ok(response) => response.status().is_success(),
            Err(error) => {
                tracing::info!(%error, url, "webhook validation ping failed");
                false
            }
        }
    }

    /// Queues deliveries of `changes` to every matching webhook of the list; never waits.
    pub(crate) fn emit(
        self: &std::sync::Arc<Self>,
        list_id: &str,
        source: Source,
        changes: &[Change],
        extra: &[(&str, String)],
    ) {
        if changes.is_empty() {
            return;
        }
        let hooks = self.list(list_id);
        for change in changes {
            let (kind, body) = payload(list_id, change, extra);
            for hook in &hooks {
                let wanted = match kind {
                    "subscribe" => hook.events.subscribe,
                    "unsubscribe" => hook.events.unsubscribe,
                    "profile" => hook.events.profile,
                    "cleaned" => hook.events.cleaned,
                    "upemail" => hook.events.upemail,
                    _ => false,
                };
                let allowed = match source {
                    Source::User => hook.sources.user,
                    Source::Admin => hook.sources.admin,
                    Source::Api => hook.sources.api,
                };
                if wanted && allowed {
                    let hub = std::sync::Arc::clone(self);
                    let url = hook.url.clone();
                    let body = body.clone();
                    tokio::spawn(async move { hub.deliver(url, body).await });
                }
            }
        }
    }

    async fn deliver(&self, url: String, body: String) {
        for attempt in 0..=RETRY_DELAYS.len() {
            if attempt > 0 {
                tokio::select! {
                    () = tokio::time::sleep(RETRY_DELAYS[attempt - 1]) => {}
                    () = self.shutdown.cancelled() => return,
                }
            }
            let answer = self
                .http
                .post(&url)
                .header(reqwest::header::USER_AGENT, "MailChimp.com")
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body.clone())
                .send()
                .await;
            match answer {
                Ok(response) if response.status().is_success() => {
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(response) => {
                    tracing::info!(url, attempt, status = %response.status(), "webhook delivery refused");
                }
                Err(error) => tracing::info!(url, attempt, %error, "webhook delivery failed"),
            }
            self.failed_attempts.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(url, "webhook delivery given up after retries");
    }
}

/// The event type and form body of one change, with Mailchimp's `data[...]` bracket keys.
fn payload(list_id: &str, change: &Change, extra: &[(&str, String)]) -> (&'static str, String) {
    let member = &change.member;
    let fired_at = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut push = |key: &str, value: String| pairs.push((key.to_owned(), value));
    let kind = match &change.kind {
        ChangeKind::Subscribe => "subscribe",
        ChangeKind::Unsubscribe { .. } => "unsubscribe",
        ChangeKind::Cleaned => "cleaned",
        ChangeKind::Profile => "profile",
        ChangeKind::Upemail { .. } => "upemail",
    };
    push("type", kind.to_owned());
    push("fired_at", fired_at);
    let merges = |push: &mut dyn FnMut(&str, String)| {
        push("data[merges][EMAIL]", member.email.clone());
        for (tag, value) in member.merge_fields.pairs() {
            flatten(&format!("data[merges][{tag}]"), &value, push);
        }
    };
    match &change.kind {
        ChangeKind::Subscribe | ChangeKind::Profile => {
            push("data[id]", member.unique_email_id_hex());
            push("data[list_id]", list_id.to_owned());
            push("data[email]", member.email.clone());
            push("data[email_type]", member.email_type.to_owned());
            push("data[web_id]", member.web_id.to_string());
            merges(&mut push);
            push("data[ip_opt]", member.ip_opt.clone());
            if change.kind == ChangeKind::Subscribe {
                push("data[ip_signup]", member.ip_signup.clone());
            }
        }
        ChangeKind::Unsubscribe { action } => {
            push("data[action]", (*action).to_owned());
            if !extra.iter().any(|(key, _)| *key == "reason") {
                push("data[reason]", "manual".to_owned());
            }
            push("data[id]", member.unique_email_id_hex());
            push("data[list_id]", list_id.to_owned());
            push("data[email]", member.email.clone());
            push("data[email_type]", member.email_type.to_owned());
            push("data[web_id]", member.web_id.to_string());
            merges(&mut push);
            push("data[ip_opt]", member.ip_opt.clone());
        }
        ChangeKind::Cleaned => {
            push("data[list_id]", list_id.to_owned());
            if !extra.iter().any(|(key, _)| *key == "reason") {
                push("data[reason]", "hard".to_owned());
            }
            push("data[email]", member.email.clone());
        }
        ChangeKind::Upemail { old_email } => {
            push("data[list_id]", list_id.to_owned());
            push("data[new_id]", member.unique_email_id_hex());
            push("data[new_email]", member.email.clone());
            push("data[old_email]", old_email.clone());
        }
    }
    for (key, value) in extra {
        push(&format!("data[{key}]"), value.clone());
    }
    let body = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    (kind, body)
}

/// Nested merge values (`ADDRESS`) become deeper bracket keys, as PHP-style forms do.
fn flatten(prefix: &str, value: &Value, push: &mut dyn FnMut(&str, String)) {
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                flatten(&format!("{prefix}[{key}]"), child, push);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{index}]"), child, push);
            }
        }
        Value::String(text) => push(prefix, text.clone()),
        Value::Null => push(prefix, String::new()),
        other => push(prefix, other.to_string()),
    }
}

/// A fresh 10-hex-character id, like Mailchimp's webhook ids.
pub(crate) fn new_id() -> String {
    format!("{:010x}", fastrand::u64(..1 << 40))
}
