//! Imports (the seed's data wizard): creates subscribers in one audience from Salesforce records read
//! with a SOQL query, by batch subscribe (`POST /lists/{id}`, 500 members per call) with
//! `update_existing: false`, so an existing member — unsubscribed, cleaned, archived or anything
//! else — keeps its status and is reported as unchanged. Records whose Email Opt Out is checked are
//! skipped unless asked otherwise.
//!
//! Note: with `include_opted_out`, a new subscribed member in an audience whose first sync completed
//! is opt-in evidence, so the pipeline will uncheck that person's box; that is what the option asks.

use std::{
    collections::{BTreeMap, BTreeSet},
    pin::pin,
};

use chrono::Utc;
use futures::StreamExt;
use optout_mailchimp::{BatchError, BatchMember, BatchSubscribe, MemberStatus, normalize_email};
use optout_proto::{memberships::v1 as pb, queue::v1::Source};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::info;

use crate::{
    Error,
    memberships::ApiError,
    realtime::{Realtime, member_snapshot},
};

/// Members per batch subscribe call (Mailchimp's maximum).
pub const BATCH_SIZE: usize = 500;
/// Skip reason: the record's Email Opt Out is checked.
pub const SKIP_OPTED_OUT: &str = "email opt out checked";
/// Skip reason: no email on the record.
pub const SKIP_NO_EMAIL: &str = "no email";
/// Skip reason: the address appeared earlier in the same import.
pub const SKIP_DUPLICATE: &str = "duplicate address";
/// Mailchimp's error code for an existing member in a batch without `update_existing`.
const CONTACT_EXISTS: &str = "ERROR_CONTACT_EXISTS";

/// An import request (HTTP JSON shape too).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRequest {
    /// The audience to add subscribers to.
    pub audience_id: String,
    /// SOQL over Contact, Lead or Account selecting `Email` (or `PersonEmail`) and the opt-out field.
    pub soql: String,
    /// Import records whose Email Opt Out is checked too.
    #[serde(default)]
    pub include_opted_out: bool,
}

/// One record that failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportFailure {
    /// The address.
    pub email: String,
    /// Mailchimp's reason.
    pub reason: String,
}

/// What an import did; `created + unchanged + skipped + failed == records_read`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    /// Records the query returned.
    pub records_read: u64,
    /// New subscribed members.
    pub created: u64,
    /// Existing members, left as they were.
    pub unchanged: u64,
    /// Records not sent.
    pub skipped: u64,
    /// Records Mailchimp refused.
    pub failed: u64,
    /// Why each failure happened.
    pub failures: Vec<ImportFailure>,
    /// Skip reasons with counts.
    pub skipped_reasons: BTreeMap<String, u64>,
}

impl From<ImportReport> for pb::ImportResponse {
    fn from(report: ImportReport) -> Self {
        pb::ImportResponse {
            records_read: report.records_read,
            created: report.created,
            unchanged: report.unchanged,
            skipped: report.skipped,
            failed: report.failed,
            failures: report
                .failures
                .into_iter()
                .map(|failure| pb::ImportFailure {
                    email: failure.email,
                    reason: failure.reason,
                })
                .collect(),
            skipped_reasons: report.skipped_reasons.into_iter().collect(),
        }
    }
}

impl ImportReport {
    fn skip(&mut self, reason: &str) {
        self.skipped += 1;
        *self.skipped_reasons.entry(reason.to_owned()).or_insert(0) += 1;
    }
}

/// One Salesforce record as the import sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportRecord {
    /// Normalised address, `None` when empty.
    pub email: Option<String>,
    /// Email Opt Out, `None` when the query did not select it.
    pub opted_out: Option<bool>,
    /// FNAME / LNAME from FirstName / LastName.
    pub merge_fields: Map<String, Value>,
}

/// Reads a query row: `Email` or `PersonEmail`, `HasOptedOutOfEmail` or `PersonHasOptedOutOfEmail`.
pub fn parse_row(row: &Value) -> ImportRecord {
    let text = |field: &str| {
        row.get(field)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|value| !value.is_empty())
    };
    let email = text("Email")
        .or_else(|| text("PersonEmail"))
        .map(normalize_email);
    let opted_out = ["HasOptedOutOfEmail", "PersonHasOptedOutOfEmail"]
        .iter()
        .find_map(|field| row.get(*field).and_then(Value::as_bool));
    let mut merge_fields = Map::new();
    for (field, tag) in [("FirstName", "FNAME"), ("LastName", "LNAME")] {
        if let Some(value) = text(field) {
            merge_fields.insert(tag.to_owned(), Value::String(value.to_owned()));
        }
    }
    ImportRecord {
        email,
        opted_out,
        merge_fields,
    }
}

/// Runs an import: reads the records page by page and batch-subscribes them 500 at a time.
pub async fn import(
    realtime: &Realtime,
    request: &ImportRequest,
) -> std::result::Result<ImportReport, ApiError> {
    let Some(salesforce) = realtime.salesforce() else {
        return Err(ApiError::Precondition(
            "imports need Salesforce: configure the fetcher's --salesforce-* options".to_owned(),
        ));
    };
    let audience_id = request.audience_id.trim().to_owned();
    if audience_id.is_empty() || request.soql.trim().is_empty() {
        return Err(ApiError::Invalid(
            "audience_id and soql are required".to_owned(),
        ));
    }
    if !realtime.in_scope(&audience_id).await? {
        return Err(ApiError::UnknownAudience(audience_id));
    }
    let mut report = ImportReport::default();
    let mut seen = BTreeSet::new();
    let mut batch: Vec<BatchMember> = Vec::with_capacity(BATCH_SIZE);
    let mut pages = pin!(salesforce.query_stream::<Value>(request.soql.clone()));
    while let Some(page) = pages.next().await {
        let rows = page.map_err(|error| match error {
            optout_salesforce::Error::MalformedQuery { .. }
            | optout_salesforce::Error::InvalidField { .. } => {
                ApiError::Invalid(format!("the soql was refused: {error}"))
            }
            other => ApiError::Internal(Error::Salesforce(other)),
        })?;
        for row in &rows {
            report.records_read += 1;
            let record = parse_row(row);
            let Some(email) = record.email else {
                report.skip(SKIP_NO_EMAIL);
                continue;
            };
            match (record.opted_out, request.include_opted_out) {
                (Some(true), false) => {
                    report.skip(SKIP_OPTED_OUT);
                    continue;
                }
                (None, false) => {
                    return Err(ApiError::Invalid(
                        "select HasOptedOutOfEmail (or PersonHasOptedOutOfEmail) so opted-out records can be skipped"
                            .to_owned(),
                    ));
                }
                _ => {}
            }
            if !seen.insert(email.clone()) {
                report.skip(SKIP_DUPLICATE);
                continue;
            }
            batch.push(BatchMember {
                email_address: email,
                status: MemberStatus::Subscribed,
                merge_fields: (!record.merge_fields.is_empty())
                    .then_some(Value::Object(record.merge_fields)),
            });
            if batch.len() == BATCH_SIZE {
                send_batch(
                    realtime,
                    &audience_id,
                    std::mem::take(&mut batch),
                    &mut report,
                )
                .await?;
            }
        }
    }
    if !batch.is_empty() {
        send_batch(realtime, &audience_id, batch, &mut report).await?;
    }
    info!(
        %audience_id,
        records = report.records_read,
        created = report.created,
        unchanged = report.unchanged,
        skipped = report.skipped,
        failed = report.failed,
        "import finished"
    );
    Ok(report)
}

/// Mailchimp's reason for one refused member; the field message is added only when it says more
/// (Mailchimp often repeats the error there).
fn failure_reason(error: &BatchError) -> String {
    if error.field_message.is_empty() || error.error.contains(&error.field_message) {
        error.error.clone()
    } else {
        format!("{}: {}", error.error, error.field_message)
    }
}

async fn send_batch(
    realtime: &Realtime,
    audience_id: &str,
    members: Vec<BatchMember>,
    report: &mut ImportReport,
) -> std::result::Result<(), ApiError> {
    let sent = members.len() as u64;
    let response = realtime
        .client()
        .batch_subscribe(
            audience_id,
            &BatchSubscribe {
                members,
                update_existing: false,
            },
        )
        .await?;
    let created = response.new_members.len() as u64;
    let mut unchanged = response.updated_members.len() as u64;
    let mut failed = 0;
    for error in &response.errors {
        if error.error_code == CONTACT_EXISTS {
            unchanged += 1;
        } else {
            failed += 1;
            report.failures.push(ImportFailure {
                email: error.email_address.clone(),
                reason: failure_reason(error),
            });
        }
    }
    report.created += created;
    report.unchanged += unchanged;
    report.failed += failed;
    // Whatever Mailchimp did not account for is a failure too, so the counts always add up.
    let unaccounted = sent.saturating_sub(created + unchanged + failed);
    if unaccounted > 0 {
        report.failed += unaccounted;
        report.failures.push(ImportFailure {
            email: String::new(),
            reason: format!("{unaccounted} members missing from mailchimp's answer"),
        });
    }
    let now = Utc::now();
    let snapshots = response
        .new_members
        .iter()
        .map(|member| member_snapshot(member, now))
        .collect();
    realtime
        .publish(audience_id, Source::Api, snapshots)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_contact_and_person_account_rows() {
        let contact = parse_row(&json!({
            "Id": "003", "Email": " Ada@X.io ", "HasOptedOutOfEmail": true, "FirstName": "Ada", "LastName": ""
        }));
        assert_eq!(contact.email.as_deref(), Some("ada@x.io"));
        assert_eq!(contact.opted_out, Some(true));
        assert_eq!(contact.merge_fields.get("FNAME"), Some(&json!("Ada")));
        assert!(!contact.merge_fields.contains_key("LNAME"));

        let account = parse_row(
            &json!({"Id": "001", "PersonEmail": "b@x.io", "PersonHasOptedOutOfEmail": false}),
        );
        assert_eq!(account.email.as_deref(), Some("b@x.io"));
        assert_eq!(account.opted_out, Some(false));

        let bare = parse_row(&json!({"Id": "00Q", "Email": null}));
        assert_eq!(bare.email, None);
        assert_eq!(bare.opted_out, None);
    }

    #[test]
    fn a_failure_reason_does_not_repeat_the_field_message() {
        let mut error = BatchError {
            email_address: "bad@.x.io".to_owned(),
            error: "bad@.x.io looks fake or invalid".to_owned(),
            error_code: "ERROR_GENERIC".to_owned(),
            field: "email_address".to_owned(),
            field_message: "bad@.x.io looks fake or invalid".to_owned(),
        };
        assert_eq!(failure_reason(&error), "bad@.x.io looks fake or invalid");
        error.error = "Invalid Resource".to_owned();
        assert_eq!(
            failure_reason(&error),
            "Invalid Resource: bad@.x.io looks fake or invalid"
        );
        error.field_message.clear();
        assert_eq!(failure_reason(&error), "Invalid Resource");
    }

    #[test]
    fn counts_skips_by_reason() {
        let mut report = ImportReport::default();
        report.skip(SKIP_OPTED_OUT);
        report.skip(SKIP_OPTED_OUT);
        report.skip(SKIP_NO_EMAIL);
        assert_eq!(report.skipped, 3);
        assert_eq!(report.skipped_reasons[SKIP_OPTED_OUT], 2);
        let response: pb::ImportResponse = report.into();
        assert_eq!(response.skipped_reasons[SKIP_NO_EMAIL], 1);
    }
}
