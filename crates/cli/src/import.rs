//! `optoutctl import`: creates subscribers in one audience from Salesforce records, through the
//! fetcher's `Memberships.Import`. Existing members keep their status; records with Email Opt Out
//! checked are skipped unless asked otherwise. Prints the counts, then each skip reason and failure.

use std::{collections::BTreeMap, fmt, time::Duration};

use optout_proto::memberships::v1::{ImportRequest, memberships_client::MembershipsClient};
use secrecy::SecretString;
use serde::Serialize;
use tonic::transport::Endpoint;

use crate::{
    Error, Result,
    admin::{BearerAuth, grpc_url},
};

/// What to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The audience that receives the subscribers.
    pub audience_id: String,
    /// SOQL over Contact, Lead or Account selecting the email and the opt-out field.
    pub soql: String,
    /// Import records whose Email Opt Out is checked too.
    pub include_opted_out: bool,
    /// How long the call may take: a large import pages Salesforce and calls Mailchimp once per
    /// 500 members, far beyond the 30 s the admin calls allow.
    pub timeout: Duration,
}

/// One record Mailchimp refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The address (empty when Mailchimp did not say which).
    pub email: String,
    /// Mailchimp's reason.
    pub reason: String,
}

/// What the import did; `created + unchanged + skipped + failed == records_read`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    /// The audience.
    pub audience_id: String,
    /// Records the query returned.
    pub records_read: u64,
    /// New members, subscribed.
    pub created: u64,
    /// Existing members, left with their status.
    pub unchanged: u64,
    /// Records not sent, by reason.
    pub skipped: u64,
    /// Records Mailchimp refused.
    pub failed: u64,
    /// Skip reasons with their counts.
    pub skipped_reasons: BTreeMap<String, u64>,
    /// Why each failure happened.
    pub failures: Vec<Failure>,
}

/// Calls `Import` on the fetcher at `endpoint`.
pub async fn run(
    endpoint: &str,
    token: &SecretString,
    options: &ImportOptions,
) -> Result<ImportSummary> {
    const SERVICE: &str = "fetcher";
    let endpoint = grpc_url(endpoint);
    let channel = Endpoint::from_shared(endpoint.clone())
        .map_err(|source| Error::InvalidEndpoint {
            service: SERVICE.to_owned(),
            endpoint: endpoint.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(options.timeout)
        .connect()
        .await
        .map_err(|source| Error::Unreachable {
            service: SERVICE.to_owned(),
            endpoint: endpoint.clone(),
            source,
        })?;
    let mut client = MembershipsClient::with_interceptor(channel, BearerAuth::new(token)?);
    let response = client
        .import(ImportRequest {
            audience_id: options.audience_id.clone(),
            soql: options.soql.clone(),
            include_opted_out: options.include_opted_out,
        })
        .await
        .map_err(|status| Error::from_status(SERVICE, "Import", &status))?
        .into_inner();
    Ok(ImportSummary {
        audience_id: options.audience_id.clone(),
        records_read: response.records_read,
        created: response.created,
        unchanged: response.unchanged,
        skipped: response.skipped,
        failed: response.failed,
        skipped_reasons: response.skipped_reasons.into_iter().collect(),
        failures: response
            .failures
            .into_iter()
            .map(|failure| Failure {
                email: failure.email,
                reason: failure.reason,
            })
            .collect(),
    })
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            formatter,
            "import into {}: {} records read",
            self.audience_id, self.records_read
        )?;
        writeln!(formatter, "  created    {}", self.created)?;
        writeln!(
            formatter,
            "  unchanged  {} (existing members keep their status)",
            self.unchanged
        )?;
        writeln!(formatter, "  skipped    {}", self.skipped)?;
        for (reason, count) in &self.skipped_reasons {
            writeln!(formatter, "    {count:>6}  {reason}")?;
        }
        write!(formatter, "  failed     {}", self.failed)?;
        for failure in &self.failures {
            let email = if failure.email.is_empty() {
                "(no address)"
            } else {
                &failure.email
            };
            write!(formatter, "\n    {email}: {}", failure.reason)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> ImportSummary {
        ImportSummary {
            audience_id: "a1b2c3".to_owned(),
            records_read: 7,
            created: 2,
            unchanged: 3,
            skipped: 1,
            failed: 1,
            skipped_reasons: BTreeMap::from([("email opt out checked".to_owned(), 1)]),
            failures: vec![Failure {
                email: "bad@.example.com".to_owned(),
                reason: "Invalid Resource: looks fake".to_owned(),
            }],
        }
    }

    #[test]
    fn renders_counts_then_skip_reasons_and_failures() {
        let text = summary().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "import into a1b2c3: 7 records read",
                "  created    2",
                "  unchanged  3 (existing members keep their status)",
                "  skipped    1",
                "         1  email opt out checked",
                "  failed     1",
                "    bad@.example.com: Invalid Resource: looks fake",
            ]
        );
    }

    #[test]
    fn names_failures_without_an_address() {
        let mut summary = summary();
        summary.failures[0].email.clear();
        assert!(
            summary
                .to_string()
                .ends_with("\n    (no address): Invalid Resource: looks fake"),
            "{summary}"
        );
    }

    #[test]
    fn json_carries_every_count_and_reason() {
        let value = serde_json::to_value(summary()).expect("serialisable");
        assert_eq!(value["created"], 2);
        assert_eq!(value["unchanged"], 3);
        assert_eq!(value["skipped_reasons"]["email opt out checked"], 1);
        assert_eq!(value["failures"][0]["email"], "bad@.example.com");
    }
}
