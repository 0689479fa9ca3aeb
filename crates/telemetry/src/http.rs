//! W3C trace context and client spans for outgoing HTTP calls (Mailchimp, Salesforce), following the
//! OpenTelemetry HTTP conventions: span name `{method} {template}`, `http.request.method`,
//! `server.address`, `server.port`, `url.full` (without the query, which may hold personal data),
//! `http.response.status_code` and `error.type`.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};
use tracing::Span;

/// Writes into HTTP headers.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads from HTTP headers (gRPC metadata arrives as HTTP/2 headers too).
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The current span's trace context as headers, for a request builder (`.headers(..)`).
pub fn trace_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    crate::inject(&mut HeaderInjector(&mut headers));
    headers
}

/// A client span for `method url`, named `{method} {template}` (`template` is the low-cardinality path,
/// e.g. `/lists/{list_id}/members`). Record the answer with [`record_status`] or [`record_error`].
pub fn client_span(method: &str, url: &str, template: &str) -> Span {
    let without_query = url.split(['?', '#']).next().unwrap_or(url);
    let (address, port) = match without_query.parse::<http::Uri>() {
        Ok(uri) => {
            let default_port = if uri.scheme_str() == Some("http") {
                80
            } else {
                443
            };
            (
                uri.host().unwrap_or_default().to_owned(),
                uri.port_u16().unwrap_or(default_port),
            )
        }
        Err(_) => (String::new(), 0),
    };
    tracing::info_span!(
        "http.client",
        otel.name = %format_args!("{method} {template}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        url.full = %without_query,
        url.template = %template,
        server.address = %address,
        server.port = port,
        http.response.status_code = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
    )
}

/// A low-cardinality path template: every segment holding a digit (ids, hashes, cursors) becomes
/// `{id}`, and the query is dropped. `/lists/a1b2/members/9f8e` becomes `/lists/{id}/members/{id}`.
pub fn path_template(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let template: Vec<&str> = path
        .split('/')
        .map(|segment| {
            if segment.chars().any(|character| character.is_ascii_digit()) {
                "{id}"
            } else {
                segment
            }
        })
        .collect();
    let joined = template.join("/");
    if joined.starts_with('/') {
        joined
    } else {
        format!("/{joined}")
    }
}

/// Records the response status on a span from [`client_span`]; 4xx and 5xx mark it failed.
pub fn record_status(span: &Span, status: u16) {
    span.record("http.response.status_code", status);
    if status >= 400 {
        span.record("error.type", status.to_string());
        span.record("otel.status_code", "ERROR");
    }
}

/// Records a transport failure (no response) on a span from [`client_span`].
pub fn record_error(span: &Span, kind: &str) {
    span.record("error.type", kind);
    span.record("otel.status_code", "ERROR");
}

/// Whether `url` names this machine (`localhost`, 127.0.0.0/8, `::1`).
///
/// HTTP clients honour `HTTPS_PROXY` and friends, which is what a cluster behind an egress proxy
/// needs for Mailchimp and Salesforce; but a proxy cannot reach our loopback, so clients built for
/// a loopback URL (the sandbox, a local collector) must skip it even when `NO_PROXY` forgets them.
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback_url("http://127.0.0.1:4000/3.0"));
        assert!(is_loopback_url("https://127.8.0.1"));
        assert!(is_loopback_url("http://[::1]:80/x"));
        assert!(is_loopback_url("http://LOCALHOST:9"));
        assert!(!is_loopback_url("https://us6.api.mailchimp.com/3.0"));
        assert!(!is_loopback_url("https://login.salesforce.com"));
        assert!(!is_loopback_url("http://10.0.0.1:80"));
        assert!(!is_loopback_url("not a url"));
    }

    #[test]
    fn templates_replace_ids_and_drop_queries() {
        assert_eq!(
            path_template("/lists/a1b2/members/9f8e?fields=x"),
            "/lists/{id}/members/{id}"
        );
        assert_eq!(path_template("query"), "/query");
        assert_eq!(
            path_template("jobs/ingest/7504x000/batches"),
            "/jobs/ingest/{id}/batches"
        );
    }
}
