//! Limits on the public HTTP port: a rate limit per route group and a bound on request headers.
//!
//! The webhook URL and the Memberships API face the internet (Mailchimp must reach the first,
//! Salesforce the second). Bodies are bounded by `DefaultBodyLimit` in [`crate::http`]; this module
//! bounds the rest: how often requests may come and how large their head may be. The rate limit is
//! one token bucket per route group, not per client address: behind a Kubernetes ingress every
//! request comes from the ingress, so a per-address bucket would be one bucket anyway, and a
//! global one protects what we must protect (the Mailchimp connection budget and RabbitMQ).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header::RETRY_AFTER},
    middleware::Next,
    response::{IntoResponse, Response},
};
use tracing::warn;

/// Largest request head we read: the request line plus every header name and value. Mailchimp's
/// webhook requests and Apex callouts carry a few hundred bytes; 16 KiB leaves room for proxies.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A token bucket refilled at `per_second`, holding at most one second's worth.
#[derive(Debug)]
pub struct RateLimit {
    name: &'static str,
    per_second: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    /// A bucket allowing `per_second` requests on average and bursts of as many; `None` for 0
    /// (no limit).
    pub fn new(name: &'static str, per_second: u32) -> Option<Arc<Self>> {
        (per_second > 0).then(|| {
            Arc::new(Self {
                name,
                per_second: f64::from(per_second),
                bucket: Mutex::new(Bucket {
                    tokens: f64::from(per_second),
                    refilled: Instant::now(),
                }),
            })
        })
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn acquire_at(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self
            .bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.per_second);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

/// Middleware: 429 with `Retry-After` when the group's bucket is empty.
pub async fn rate_limit(
    State(limit): State<Option<Arc<RateLimit>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(limit) = limit
        && let Err(wait) = limit.acquire_at(Instant::now())
    {
        warn!(group = limit.name, "http rate limit exceeded");
        // Whole seconds, rounded up: Retry-After has no fractions.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut response = (StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded\n").into_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        return response;
    }
    next.run(request).await
}

/// Middleware: 431 when the request head is larger than [`MAX_HEAD_BYTES`], 414 when the URI
/// alone is.
pub async fn bound_head(request: Request, next: Next) -> Response {
    let uri = request.uri().to_string().len();
    if uri > MAX_HEAD_BYTES {
        return (StatusCode::URI_TOO_LONG, "request uri too long\n").into_response();
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if uri + headers > MAX_HEAD_BYTES {
        return (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large\n",
        )
            .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limit = RateLimit::new("test", 10).expect("a limit");
        let start = Instant::now();
        for _ in 0..10 {
            assert_eq!(limit.acquire_at(start), Ok(()));
        }
        let wait = limit.acquire_at(start).expect_err("the burst is spent");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        // A tenth of a second buys one more request, not two.
        let later = start + Duration::from_millis(100);
        assert_eq!(limit.acquire_at(later), Ok(()));
        assert!(limit.acquire_at(later).is_err());
        // A long pause refills to the burst, never beyond it.
        let much_later = start + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(limit.acquire_at(much_later), Ok(()));
        }
        assert!(limit.acquire_at(much_later).is_err());
    }

    #[test]
    fn zero_means_no_limit() {
        assert!(RateLimit::new("test", 0).is_none());
    }
}
