//! The sandbox's call accounting (`/_sandbox/stats`) and differences between two readings.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use serde_json::Value;

/// One reading of `/_sandbox/stats`.
#[derive(Clone, Debug, Default)]
pub struct Stats(pub Value);

impl Stats {
    /// Reads the stats at `url` (the sandbox's `stats_url`).
    pub async fn read(http: &reqwest::Client, url: &str) -> Result<Self> {
        let value = http
            .get(url)
            .send()
            .await
            .context("reading the sandbox stats")?
            .error_for_status()?
            .json()
            .await?;
        Ok(Self(value))
    }

    /// Calls per endpoint label of one API (`mailchimp` or `salesforce`).
    pub fn calls(&self, api: &str) -> BTreeMap<String, u64> {
        self.0
            .pointer(&format!("/calls/{api}"))
            .and_then(Value::as_object)
            .map(|calls| {
                calls
                    .iter()
                    .map(|(label, count)| (label.clone(), count.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records created, changed or deleted through one API.
    pub fn records_written(&self, api: &str) -> u64 {
        self.0
            .pointer(&format!("/records_written/{api}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// Calls per endpoint made between two readings (endpoints with none left out).
pub fn calls_between(before: &Stats, after: &Stats, api: &str) -> BTreeMap<String, u64> {
    let earlier = before.calls(api);
    after
        .calls(api)
        .into_iter()
        .filter_map(|(label, count)| {
            let made = count.saturating_sub(earlier.get(&label).copied().unwrap_or(0));
            (made > 0).then_some((label, made))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn differences_per_endpoint() {
        let before = Stats(json!({"calls": {"salesforce": {"GET /query": 2}}}));
        let after = Stats(
            json!({"calls": {"salesforce": {"GET /query": 5, "PATCH /composite/sobjects": 1}}, "records_written": {"salesforce": 7}}),
        );
        let made = calls_between(&before, &after, "salesforce");
        assert_eq!(made.get("GET /query"), Some(&3));
        assert_eq!(made.get("PATCH /composite/sobjects"), Some(&1));
        assert_eq!(after.records_written("salesforce"), 7);
        assert!(calls_between(&after, &after, "salesforce").is_empty());
    }
}
