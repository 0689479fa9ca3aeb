//! The writer's Prometheus metrics: records written and failed, the opt-out clock (latency from
//! Mailchimp's `last_changed` of an opt-out to its Salesforce write, and the age of the oldest opt-out
//! not yet written), and the remaining Salesforce API budget.
//!
//! "Not yet written" covers the opt-outs this writer has taken in hand (decided, diffed, being written
//! or failing); opt-outs still queued show up as queue depth and lag instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use optout_salesforce::ApiUsage;
use optout_telemetry::metrics::{ApiCalls, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The object label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ObjectLabels {
    object: String,
}

/// Object and Salesforce error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct FailureLabels {
    object: String,
    error_code: String,
}

/// Metrics of the write path; registered once per service.
#[derive(Debug)]
pub(crate) struct WriterMetrics {
    written: Family<ObjectLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    latency: Histogram,
    oldest_unwritten: Gauge<f64, AtomicU64>,
    api_remaining: Gauge,
    /// Calls of the Salesforce client, by endpoint and status.
    pub(crate) api_calls: ApiCalls,
    /// Opt-outs taken in hand and not yet written.
    in_hand: Mutex<InHand>,
}

/// The opt-outs behind the oldest-unwritten gauge. A pass under way counts as one entry, its
/// oldest opt-out, rather than one per email: a first sync's pass holds tens of thousands.
#[derive(Debug, Default)]
struct InHand {
    /// The oldest opt-out of each pass under way, by pass number.
    passes: HashMap<u64, DateTime<Utc>>,
    next_pass: u64,
    /// Opt-outs a pass ended without writing (records still failing or rejected), by email,
    /// until a later pass writes them.
    emails: HashMap<String, DateTime<Utc>>,
}

/// A pass's opt-outs, in hand until it is dropped at the end of the pass.
#[derive(Debug)]
pub(crate) struct PassInHand<'a> {
    metrics: &'a WriterMetrics,
    pass: u64,
}

impl Drop for PassInHand<'_> {
    fn drop(&mut self) {
        self.metrics.in_hand().passes.remove(&self.pass);
    }
}

impl Default for WriterMetrics {
    fn default() -> Self {
        Self {
            written: Family::default(),
            failed: Family::default(),
            // 100 ms .. ~27 h: a webhook opt-out lands in about a second, an hourly poll in up to an hour.
            latency: Histogram::new(exponential_buckets(0.1, 2.0, 21)),
            oldest_unwritten: Gauge::default(),
            api_remaining: Gauge::default(),
            api_calls: ApiCalls::default(),
            in_hand: Mutex::new(InHand::default()),
        }
    }
}

impl WriterMetrics {
    /// Registers every metric, the Salesforce client's per-endpoint call counts included.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "optout_salesforce_records_written",
            "Salesforce records whose Email Opt Out field was written, by object",
            self.written.clone(),
        );
        registry.register(
            "optout_salesforce_records_failed",
            "Salesforce records rejected for good, by object and Salesforce error code",
            self.failed.clone(),
        );
        registry.register(
            "optout_opt_out_latency_seconds",
            "Time from an opt-out in Mailchimp (its last_changed) to the Salesforce write, per record",
            self.latency.clone(),
        );
        registry.register(
            "optout_oldest_unwritten_opt_out_seconds",
            "Age of the oldest opt-out this writer has in hand and has not yet written (0 when none)",
            self.oldest_unwritten.clone(),
        );
        registry.register(
            "optout_salesforce_api_remaining",
            "Salesforce daily API requests left, from the last Sforce-Limit-Info header (-1 before any)",
            self.api_remaining.clone(),
        );
        self.api_calls.register(registry);
    }

    /// Updates the gauges that are read, not counted; called at each scrape.
    pub(crate) fn refresh(&self, limits: Option<ApiUsage>) {
        let remaining = limits.map_or(-1, |usage| {
            i64::try_from(usage.max.saturating_sub(usage.used)).unwrap_or(i64::MAX)
        });
        self.api_remaining.set(remaining);
        let oldest = {
            let in_hand = self.in_hand();
            in_hand
                .passes
                .values()
                .chain(in_hand.emails.values())
                .min()
                .copied()
        };
        let age = oldest.map_or(0.0, |opted_out_at| {
            (Utc::now() - opted_out_at).num_milliseconds().max(0) as f64 / 1000.0
        });
        self.oldest_unwritten.set(age);
    }

    fn in_hand(&self) -> std::sync::MutexGuard<'_, InHand> {
        self.in_hand
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A pass is about to write opt-outs, the oldest of which became effective at `oldest`.
    pub(crate) fn pass_in_hand(&self, oldest: DateTime<Utc>) -> PassInHand<'_> {
        let mut in_hand = self.in_hand();
        let pass = in_hand.next_pass;
        in_hand.next_pass = pass.wrapping_add(1);
        in_hand.passes.insert(pass, oldest);
        PassInHand {
            metrics: self,
            pass,
        }
    }

    /// A pass ends without having written the opt-out of `email`.
    pub(crate) fn still_in_hand(&self, email: &str, opted_out_at: DateTime<Utc>) {
        self.in_hand()
            .emails
            .entry(email.to_owned())
            .and_modify(|earliest| *earliest = (*earliest).min(opted_out_at))
            .or_insert(opted_out_at);
    }

    /// Every record of `email` now carries its target value.
    pub(crate) fn settled(&self, email: &str) {
        let mut in_hand = self.in_hand();
        if !in_hand.emails.is_empty() {
            in_hand.emails.remove(email);
        }
    }

    /// The age of the oldest opt-out in hand, as the gauge shows it after a refresh.
    #[cfg(test)]
    fn oldest_unwritten(&self) -> f64 {
        self.refresh(None);
        self.oldest_unwritten.get()
    }

    /// One record written; `opted_out_at` is set for an opt-out write.
    pub(crate) fn written(&self, object: &str, opted_out_at: Option<DateTime<Utc>>) {
        self.written
            .get_or_create(&ObjectLabels {
                object: object.to_owned(),
            })
            .inc();
        if let Some(opted_out_at) = opted_out_at {
            let latency = (Utc::now() - opted_out_at).num_milliseconds().max(0) as f64 / 1000.0;
            self.latency.observe(latency);
        }
    }

    /// One record rejected for good.
    pub(crate) fn failed(&self, object: &str, error_code: &str) {
        self.failed
            .get_or_create(&FailureLabels {
                object: object.to_owned(),
                error_code: error_code.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_counts_until_it_ends_and_an_email_it_left_unwritten_until_written() {
        let metrics = WriterMetrics::default();
        assert_eq!(metrics.oldest_unwritten(), 0.0);
        let now = Utc::now();
        let hour_ago = now - chrono::Duration::hours(1);
        let pass = metrics.pass_in_hand(hour_ago);
        let other = metrics.pass_in_hand(now);
        assert!(metrics.oldest_unwritten() >= 3600.0);
        // The pass leaves one of its opt-outs unwritten.
        metrics.still_in_hand("ann@example.com", hour_ago - chrono::Duration::hours(1));
        drop(pass);
        assert!(metrics.oldest_unwritten() >= 7200.0);
        metrics.settled("bob@example.com");
        assert!(metrics.oldest_unwritten() >= 7200.0);
        metrics.settled("ann@example.com");
        let age = metrics.oldest_unwritten();
        assert!((0.0..3600.0).contains(&age), "{age}");
        drop(other);
        assert_eq!(metrics.oldest_unwritten(), 0.0);
    }
}
