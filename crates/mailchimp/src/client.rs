//! The HTTP client: base URL, Basic auth, the per-key connection limit, timeouts and retries.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use optout_telemetry::{http, metrics::ApiCalls};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::error::{Error, Result};
use crate::subscriber_hash;
use crate::types::{
    Audience, BatchSubscribe, BatchSubscribeResponse, Member, MemberStatus, MembersPage,
    MembersQuery, NewWebhook, UpsertMember, Webhook,
};

/// The `api` label of this client's calls in `optout_api_calls_total`.
pub(crate) const API: &str = "mailchimp";

/// First backoff delay; doubled per attempt, with jitter, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Page size for the members stream and `lists`: Mailchimp's maximum.
const MAX_PAGE: u32 = 1000;

/// How to reach Mailchimp.
#[derive(Clone, Debug)]
pub struct MailchimpConfig {
    /// API key `<hex>-<dc>`; sent as the Basic auth password.
    pub api_key: SecretString,
    /// Base URL including `/3.0` (e.g. `http://127.0.0.1:PORT/3.0`); `None` derives
    /// `https://<dc>.api.mailchimp.com/3.0` from the key.
    pub base_url: Option<String>,
    /// Concurrent requests allowed per client (Mailchimp answers 429 past 10 per key).
    pub max_connections: usize,
    /// Timeout of one request.
    pub timeout: Duration,
    /// Retries of a retryable failure before giving up.
    pub max_retries: u32,
}

impl MailchimpConfig {
    /// A configuration with Mailchimp's base URL and the default limits.
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            api_key: SecretString::from(api_key.into()),
            base_url: None,
            max_connections: 10,
            timeout: Duration::from_secs(30),
            max_retries: 5,
        }
    }
}

/// A Mailchimp Marketing API client; cheap to clone (the connection pool and the concurrency
/// limit are shared between clones).
#[derive(Clone, Debug)]
pub struct MailchimpClient {
    inner: Arc<Inner>,
    api_calls: ApiCalls,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    base_url: String,
    api_key: SecretString,
    permits: Semaphore,
    max_retries: u32,
}

impl MailchimpClient {
    /// Builds a client; fails when the base URL cannot be derived from the key.
    pub fn new(config: MailchimpConfig) -> Result<Self> {
        let base_url = match config.base_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let key = config.api_key.expose_secret();
                let data_center = key
                    .rsplit_once('-')
                    .map(|(_, dc)| dc)
                    .filter(|dc| !dc.is_empty() && dc.chars().all(|c| c.is_ascii_alphanumeric()))
                    .ok_or_else(|| {
                        Error::Config("api key has no data center suffix (`-us6`)".to_owned())
                    })?;
                format!("https://{data_center}.api.mailchimp.com/3.0")
            }
        };
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_max_idle_per_host(config.max_connections.max(1))
            .user_agent(concat!("optout-mailchimp/", env!("CARGO_PKG_VERSION")));
        if optout_telemetry::http::is_loopback_url(&base_url) {
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(Error::Transport)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base_url,
                api_key: config.api_key,
                permits: Semaphore::new(config.max_connections.max(1)),
                max_retries: config.max_retries,
            }),
            api_calls: ApiCalls::default(),
        })
    }

    /// The per-endpoint call counts of this client (and its clones), for a service's metrics registry.
    pub fn api_calls(&self) -> ApiCalls {
        self.api_calls.clone()
    }

    /// Counts this client's calls in `api_calls` (e.g. a family already in a service's registry).
    pub fn with_api_calls(mut self, api_calls: ApiCalls) -> Self {
        self.api_calls = api_calls;
        self
    }

    /// Every audience of the account (pages `GET /lists`).
    pub async fn lists(&self) -> Result<Vec<Audience>> {
        #[derive(serde::Deserialize)]
        struct ListsPage {
            #[serde(default)]
            lists: Vec<ListBody>,
            #[serde(default)]
            total_items: u64,
        }
        #[derive(serde::Deserialize)]
        struct ListBody {
            id: String,
            #[serde(default)]
            name: String,
            #[serde(default)]
            stats: ListStats,
        }
        #[derive(serde::Deserialize, Default)]
        struct ListStats {
            #[serde(default)]
            member_count: u64,
        }
        let mut audiences = Vec::new();
        loop {
            let query = [
                (
                    "fields",
                    "lists.id,lists.name,lists.stats.member_count,total_items".to_owned(),
                ),
                ("count", MAX_PAGE.to_string()),
                ("offset", audiences.len().to_string()),
            ];
            let page: ListsPage = self
                .call(Method::GET, "/lists", &query, None::<&()>)
                .await?;
            let received = page.lists.len();
            audiences.extend(page.lists.into_iter().map(|list| Audience {
                id: list.id,
                name: list.name,
                member_count: list.stats.member_count,
            }));
            if received == 0 || audiences.len() as u64 >= page.total_items {
                return Ok(audiences);
            }
        }
    }

    /// One page of `GET /lists/{list_id}/members`.
    pub async fn members_page(&self, list_id: &str, query: &MembersQuery) -> Result<MembersPage> {
        let path = format!("/lists/{}/members", segment(list_id));
        self.call(Method::GET, &path, &query.to_pairs(), None::<&()>)
            .await
    }

    /// Every page of the members matching `query`, from `query.offset` on, by offset paging.
    /// `count` 0 means 1000 per page. Each item is one page; the stream ends after the last one.
    pub fn members(
        &self,
        list_id: &str,
        query: MembersQuery,
    ) -> impl Stream<Item = Result<MembersPage>> + Send + '_ {
        let list_id = list_id.to_owned();
        let mut query = query;
        if query.count == 0 {
            query.count = MAX_PAGE;
        }
        query.count = query.count.min(MAX_PAGE);
        futures::stream::try_unfold(Some(query), move |state| {
            let list_id = list_id.clone();
            async move {
                let Some(mut query) = state else {
                    return Ok(None);
                };
                let page = self.members_page(&list_id, &query).await?;
                let received = page.members.len() as u32;
                let next_offset = query.offset.saturating_add(received);
                let next = if received == 0 || u64::from(next_offset) >= page.total_items {
                    None
                } else {
                    query.offset = next_offset;
                    Some(query)
                };
                Ok(Some((page, next)))
            }
        })
    }

    /// `GET /lists/{list_id}/members/{hash}`.
    pub async fn member(&self, list_id: &str, email: &str) -> Result<Member> {
        self.call(Method::GET, &member_path(list_id, email), &[], None::<&()>)
            .await
    }

    /// `PUT /lists/{list_id}/members/{hash}`: adds the member with `status_if_new`, or updates it
    /// (its status only when `status` is set).
    pub async fn upsert_member(&self, list_id: &str, request: &UpsertMember) -> Result<Member> {
        let path = member_path(list_id, &request.email_address);
        self.call(Method::PUT, &path, &[], Some(request)).await
    }

    /// `PATCH /lists/{list_id}/members/{hash}` with a new status.
    pub async fn update_member_status(
        &self,
        list_id: &str,
        email: &str,
        status: MemberStatus,
    ) -> Result<Member> {
        let body = serde_json::json!({ "status": status });
        self.call(
            Method::PATCH,
            &member_path(list_id, email),
            &[],
            Some(&body),
        )
        .await
    }

    /// `DELETE /lists/{list_id}/members/{hash}`: archives the member.
    pub async fn archive_member(&self, list_id: &str, email: &str) -> Result<()> {
        self.send(
            Method::DELETE,
            &member_path(list_id, email),
            &[],
            None::<&()>,
        )
        .await?;
        Ok(())
    }

    /// `POST .../members/{hash}/actions/delete-permanent`: erases the member for good.
    pub async fn delete_member_permanently(&self, list_id: &str, email: &str) -> Result<()> {
        let path = format!("{}/actions/delete-permanent", member_path(list_id, email));
        self.send(Method::POST, &path, &[], None::<&()>).await?;
        Ok(())
    }

    /// `POST /lists/{list_id}`: subscribes or updates up to 500 members at once.
    pub async fn batch_subscribe(
        &self,
        list_id: &str,
        request: &BatchSubscribe,
    ) -> Result<BatchSubscribeResponse> {
        let path = format!("/lists/{}", segment(list_id));
        self.call(Method::POST, &path, &[], Some(request)).await
    }

    /// `POST /lists/{list_id}/webhooks`; Mailchimp first checks the URL with a GET.
    pub async fn create_webhook(&self, list_id: &str, request: &NewWebhook) -> Result<Webhook> {
        let path = format!("/lists/{}/webhooks", segment(list_id));
        self.call(Method::POST, &path, &[], Some(request)).await
    }

    /// `GET /lists/{list_id}/webhooks`.
    pub async fn webhooks(&self, list_id: &str) -> Result<Vec<Webhook>> {
        #[derive(serde::Deserialize)]
        struct Webhooks {
            #[serde(default)]
            webhooks: Vec<Webhook>,
        }
        let path = format!("/lists/{}/webhooks", segment(list_id));
        let answer: Webhooks = self.call(Method::GET, &path, &[], None::<&()>).await?;
        Ok(answer.webhooks)
    }

    /// `DELETE /lists/{list_id}/webhooks/{webhook_id}`.
    pub async fn delete_webhook(&self, list_id: &str, webhook_id: &str) -> Result<()> {
        let path = format!(
            "/lists/{}/webhooks/{}",
            segment(list_id),
            segment(webhook_id)
        );
        self.send(Method::DELETE, &path, &[], None::<&()>).await?;
        Ok(())
    }

    async fn call<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<T> {
        let bytes = self.send(method, path, query, body).await?;
        serde_json::from_slice(&bytes).map_err(Error::Decode)
    }

    /// Sends with retries; returns the body of a 2xx answer.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<Vec<u8>> {
        let mut attempt = 0;
        loop {
            match self.send_once(method.clone(), path, query, body).await {
                Ok(bytes) => return Ok(bytes),
                Err(error) if error.is_retryable() && attempt < self.inner.max_retries => {
                    let delay = backoff(attempt);
                    tracing::debug!(%error, %method, path, attempt, ?delay, "retrying mailchimp call");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn send_once<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<Vec<u8>> {
        // Holding the permit for the whole exchange (body included) is what keeps us under
        // Mailchimp's per-key connection limit; it is released before any backoff sleep.
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Config("client semaphore closed".to_owned()))?;
        let url = format!("{}{path}", self.inner.base_url);
        // The template keeps the endpoint label and span name low-cardinality (no list ids or hashes).
        let template = http::path_template(path);
        let endpoint = format!("{method} {template}");
        let span = http::client_span(method.as_str(), &url, &template);
        let mut request = self
            .inner
            .http
            .request(method, url)
            .headers(span.in_scope(http::trace_headers))
            .basic_auth("user", Some(self.inner.api_key.expose_secret()));
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = match request.send().instrument(span.clone()).await {
            Ok(response) => response,
            Err(error) => {
                http::record_error(
                    &span,
                    if error.is_timeout() {
                        "timeout"
                    } else {
                        "transport"
                    },
                );
                self.api_calls.record(API, &endpoint, "error");
                return Err(Error::Transport(error));
            }
        };
        let status = response.status();
        http::record_status(&span, status.as_u16());
        self.api_calls.record(API, &endpoint, status.as_str());
        let bytes = response.bytes().await.map_err(Error::Transport)?;
        if status.is_success() {
            return Ok(if status == StatusCode::NO_CONTENT {
                Vec::new()
            } else {
                bytes.to_vec()
            });
        }
        Err(Error::from_response(status.as_u16(), &bytes))
    }
}

/// Full-jitter exponential backoff: a random delay in `[d/2, d]` with `d = base * 2^attempt`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(MAX_BACKOFF);
    let millis = ceiling.as_millis() as u64;
    Duration::from_millis(fastrand::u64(millis / 2..=millis.max(1)))
}

fn member_path(list_id: &str, email: &str) -> String {
    format!(
        "/lists/{}/members/{}",
        segment(list_id),
        subscriber_hash(email)
    )
}

/// Percent-encodes one path segment (list and webhook ids are hex in practice, but they come from
/// outside).
fn segment(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derives_the_base_url_from_the_key_data_center() {
        let client = MailchimpClient::new(MailchimpConfig::new("0123abcd-us6")).expect("client");
        assert_eq!(client.inner.base_url, "https://us6.api.mailchimp.com/3.0");
        assert!(MailchimpClient::new(MailchimpConfig::new("nodatacenter")).is_err());
    }

    #[test]
    fn keeps_the_api_key_out_of_debug_output() {
        let config = MailchimpConfig::new("supersecretkey-us1");
        assert!(!format!("{config:?}").contains("supersecretkey"));
        let client = MailchimpClient::new(config).expect("client");
        assert!(!format!("{client:?}").contains("supersecretkey"));
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for attempt in 0..40 {
            let delay = backoff(attempt);
            assert!(delay <= MAX_BACKOFF, "{delay:?}");
        }
        assert!(backoff(0) <= BASE_BACKOFF);
    }
}
