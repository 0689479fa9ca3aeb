//! Prometheus metrics: the shared metric types the API clients and the AMQP consumer fill in, and the
//! `/metrics` HTTP endpoint every service serves (`--metrics-listen`).
//!
//! Each service builds its own [`Registry`] (so several services in one test process do not mix their
//! numbers) and hands it to [`serve`]. Counters are exposed with the `_total` suffix the exposition
//! format adds.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use prometheus_client;
pub use prometheus_client::registry::Registry;

/// Called before each scrape to refresh gauges that are read from elsewhere (queue depths, budgets).
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Labels of one outgoing API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiCallLabels {
    /// `mailchimp` or `salesforce`.
    pub api: String,
    /// Method and low-cardinality path template, e.g. `GET /lists/{list_id}/members`.
    pub endpoint: String,
    /// HTTP status, or `error` when no response came back.
    pub status: String,
}

/// Outgoing API calls by API, endpoint and status; cheap to clone (clones share the counts).
#[derive(Clone, Debug, Default)]
pub struct ApiCalls {
    family: Family<ApiCallLabels, Counter>,
}

impl ApiCalls {
    /// Counts one call.
    pub fn record(&self, api: &str, endpoint: &str, status: &str) {
        self.family
            .get_or_create(&ApiCallLabels {
                api: api.to_owned(),
                endpoint: endpoint.to_owned(),
                status: status.to_owned(),
            })
            .inc();
    }

    /// Registers the family as `optout_api_calls` (exposed as `optout_api_calls_total`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "optout_api_calls",
            "Calls to the Mailchimp and Salesforce APIs by endpoint and HTTP status",
            self.family.clone(),
        );
    }
}

/// Reads `(name, help, value)` of cumulative counters kept elsewhere (e.g. the `GetStatus` counters).
pub type CounterSource = Arc<dyn Fn() -> Vec<(String, String, u64)> + Send + Sync>;

/// Exposes counters a service already keeps (atomics behind `GetStatus`) without counting twice: read
/// at each scrape, each becomes `<name>_total`.
#[derive(Clone)]
pub struct SnapshotCounters {
    source: CounterSource,
}

impl SnapshotCounters {
    /// Counters read from `source` at each scrape.
    pub fn new(source: CounterSource) -> Self {
        Self { source }
    }
}

impl std::fmt::Debug for SnapshotCounters {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SnapshotCounters")
    }
}

impl Collector for SnapshotCounters {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        for (name, help, value) in (self.source)() {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(&name, &help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

/// Binds the metrics listener early, so a port clash fails start-up.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[derive(Clone)]
struct Scrape {
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrape { registry, refresh });
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    })
}

async fn scrape(State(scrape): State<Scrape>) -> impl IntoResponse {
    if let Some(refresh) = &scrape.refresh {
        refresh().await;
    }
    let mut body = String::new();
    if let Err(error) = encode(&mut body, &scrape.registry) {
        tracing::warn!(%error, "failed to encode metrics");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// Reads one sample from Prometheus text: the value of `name` whose labels contain every `labels`
/// pair, summed over the matching series. For tests and `optoutctl`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let matches = labels
            .iter()
            .all(|(key, wanted)| series_labels.contains(&format!("{key}=\"{wanted}\"")));
        if !matches {
            continue;
        }
        if let Ok(value) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_registered_metrics_as_prometheus_text() {
        let calls = ApiCalls::default();
        calls.record("salesforce", "GET /query", "200");
        calls.record("salesforce", "GET /query", "200");
        calls.record("mailchimp", "GET /lists", "500");
        let mut registry = Registry::default();
        calls.register(&mut registry);
        registry.register_collector(Box::new(SnapshotCounters::new(Arc::new(|| {
            vec![("optout_members_read".to_owned(), "members".to_owned(), 42)]
        }))));
        let listener = bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let server = serve(listener, Arc::new(registry), None, shutdown.clone());
        let text = reqwest::get(format!("http://{address}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        assert_eq!(
            sample(&text, "optout_api_calls_total", &[("api", "salesforce")]),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "optout_api_calls_total",
                &[("api", "mailchimp"), ("status", "500")]
            ),
            Some(1.0)
        );
        assert_eq!(sample(&text, "optout_members_read_total", &[]), Some(42.0));
        shutdown.cancel();
        server.await.expect("join").expect("serve");
    }
}
