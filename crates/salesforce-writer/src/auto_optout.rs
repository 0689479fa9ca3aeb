//! Automated opt-out (off by default, `--auto-optout`): when Email Opt Out becomes checked on a
//! Contact, Lead or Person Account, the person is unsubscribed from every audience in scope they are
//! a member of, through the fetcher's Memberships API (`Unsubscribe`, `existing_only`), and each
//! audience changed gets an audit row with trigger `salesforce-auto-optout`.
//!
//! A poll of its own (watermarks `auto-optout:<object>` next to the write poll's), every poll interval
//! (60 s when polls run on demand only) and after each triggered poll cycle, reads records with
//! the box checked whose `SystemModstamp` moved. People whose decision is already OptOut are skipped:
//! that covers the boxes this writer checked itself, so nothing echoes. Our own unsubscribes reach
//! the evaluator as `api` snapshots and come back from Mailchimp as no webhook (the webhook is
//! registered without the `api` source). Records checked before the feature was turned on are not
//! revisited: the first cycle only sets the watermarks to now.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use optout_proto::evaluator::v1::Decision;
use optout_proto::memberships::v1::UnsubscribeRequest;
use optout_proto::memberships::v1::memberships_client::MembershipsClient;
use optout_service::AttachBearer;
use secrecy::SecretString;
use serde_json::Value;
use sqlx::Row;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::plan::{self, SfObject};
use crate::writer::Writer;
use crate::{Error, Result};

/// The audit log's trigger for these changes.
pub(crate) const TRIGGER: &str = "salesforce-auto-optout";
/// The audit log's object for a Mailchimp membership (its record id is the audience id).
pub(crate) const AUDIT_OBJECT: &str = "MailchimpMember";

/// Settings of the automated opt-out, flattened into the writer's configuration.
#[derive(Clone, Debug, clap::Args)]
pub struct AutoOptOutConfig {
    /// Unsubscribe a person from every audience when Email Opt Out becomes checked in Salesforce.
    #[arg(long, env = "OPTOUT_AUTO_OPTOUT")]
    pub auto_optout: bool,
    /// The fetcher's gRPC endpoint (`http://127.0.0.1:PORT`), which serves the Memberships API.
    #[arg(long, env = "OPTOUT_FETCHER_URL")]
    pub fetcher_url: Option<String>,
    /// Bearer token for the Memberships API; defaults to `--admin-token`.
    #[arg(long, env = "OPTOUT_FETCHER_TOKEN", hide_env_values = true)]
    pub fetcher_token: Option<SecretString>,
}

impl AutoOptOutConfig {
    /// Checks that an enabled automated opt-out knows where the fetcher is.
    pub fn validate(&self) -> Result<()> {
        if self.auto_optout && self.fetcher_url.is_none() {
            return Err(Error::Config(
                "--auto-optout needs --fetcher-url (the fetcher's gRPC endpoint)".into(),
            ));
        }
        Ok(())
    }
}

type Memberships = MembershipsClient<InterceptedService<Channel, AttachBearer>>;

/// The running automated opt-out.
#[derive(Debug, Clone)]
pub(crate) struct AutoOptOut {
    memberships: Memberships,
    /// One cycle at a time (the scheduled loop and a triggered poll cycle both run them): two at
    /// once would both see a member subscribed and audit the same unsubscribe twice.
    cycle_lock: Arc<tokio::sync::Mutex<()>>,
}

impl AutoOptOut {
    /// Builds the fetcher client (lazily connected: the fetcher may start after us); `None` when
    /// the feature is off.
    pub(crate) fn new(
        config: &AutoOptOutConfig,
        admin_token: &SecretString,
    ) -> Result<Option<Self>> {
        if !config.auto_optout {
            return Ok(None);
        }
        let url = config
            .fetcher_url
            .clone()
            .ok_or_else(|| Error::Config("--auto-optout needs --fetcher-url".into()))?;
        let channel = Endpoint::from_shared(url)
            .map_err(|error| Error::Config(format!("invalid --fetcher-url: {error}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect_lazy();
        let token = config.fetcher_token.as_ref().unwrap_or(admin_token);
        let bearer = AttachBearer::new(token)
            .map_err(|error| Error::Config(format!("invalid OPTOUT_FETCHER_TOKEN: {error}")))?;
        Ok(Some(Self {
            memberships: MembershipsClient::with_interceptor(channel, bearer),
            cycle_lock: Arc::default(),
        }))
    }
}

/// What one cycle did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CycleReport {
    pub(crate) checked_records: usize,
    pub(crate) people_unsubscribed: usize,
    pub(crate) audiences_unsubscribed: usize,
}

/// Runs a cycle every `period` until `shutdown`, skipping while paused.
pub(crate) async fn run_loop(
    writer: Arc<Writer>,
    auto: AutoOptOut,
    period: Duration,
    paused: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(?period, "automated opt-out enabled");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if *paused.borrow() {
            continue;
        }
        match cycle(&writer, &auto).await {
            Ok(report) if report.people_unsubscribed > 0 => tracing::info!(
                checked_records = report.checked_records,
                people = report.people_unsubscribed,
                audiences = report.audiences_unsubscribed,
                "automated opt-out cycle unsubscribed people"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), "automated opt-out cycle failed")
            }
        }
    }
}

/// The watermark key of `object` in `sf_watermarks`.
fn watermark_key(object: SfObject) -> String {
    format!("auto-optout:{}", object.name())
}

/// Records of `object` with the box checked whose `SystemModstamp` moved after `since`.
pub(crate) fn checked_query(
    object: SfObject,
    since: DateTime<Utc>,
    person_accounts: bool,
) -> String {
    let field = object.opt_out_field();
    plan::poll_query(object, Some(since), person_accounts).replacen(
        &format!("{field} = false"),
        &format!("{field} = true"),
        1,
    )
}

/// One pass over every enabled object.
pub(crate) async fn cycle(writer: &Writer, auto: &AutoOptOut) -> Result<CycleReport> {
    let _one_at_a_time = auto.cycle_lock.lock().await;
    let mut report = CycleReport::default();
    let mut done: BTreeSet<String> = BTreeSet::new();
    for object in writer.objects.clone() {
        let key = watermark_key(object);
        let Some(since) = watermark(writer, &key).await? else {
            tracing::info!(%object, "automated opt-out starts watching from now");
            advance(writer, &key, Utc::now()).await?;
            continue;
        };
        let soql = checked_query(object, since, writer.person_accounts);
        let mut pages = pin!(writer.salesforce.query_stream::<Value>(soql));
        let mut newest: Option<DateTime<Utc>> = None;
        let mut settled = true;
        while let Some(page) = pages.next().await {
            let rows = page?;
            report.checked_records += rows.len();
            let mut records: BTreeMap<String, String> = BTreeMap::new();
            for row in &rows {
                let stamp = row
                    .get("SystemModstamp")
                    .and_then(Value::as_str)
                    .and_then(plan::parse_sf_datetime);
                newest = newest.max(stamp);
                if let Some(record) = plan::parse_record(object, row)
                    && record.opted_out
                    && !done.contains(&record.email)
                {
                    records.entry(record.email).or_insert(record.id);
                }
            }
            if records.is_empty() {
                continue;
            }
            let emails: Vec<String> = records.keys().cloned().collect();
            let decisions = writer.decide(&emails).await?;
            let opted_out: BTreeSet<&str> = decisions
                .iter()
                .filter(|decision| decision.decision == Decision::OptOut as i32)
                .map(|decision| decision.email.as_str())
                .collect();
            for (email, record_id) in &records {
                done.insert(email.clone());
                if opted_out.contains(email.as_str()) {
                    continue;
                }
                match unsubscribe(writer, auto, object, email, record_id).await {
                    Ok(0) => {}
                    Ok(audiences) => {
                        report.people_unsubscribed += 1;
                        report.audiences_unsubscribed += audiences;
                    }
                    Err(error) => {
                        tracing::warn!(%object, error = %crate::error_chain(&error), "automated opt-out of one person failed; retried next cycle");
                        settled = false;
                        done.remove(email);
                    }
                }
            }
        }
        if let (true, Some(newest)) = (settled, newest) {
            advance(writer, &key, newest).await?;
        }
    }
    Ok(report)
}

/// Unsubscribes one person everywhere they are a member and audits each audience changed; returns
/// how many audiences changed.
async fn unsubscribe(
    writer: &Writer,
    auto: &AutoOptOut,
    object: SfObject,
    email: &str,
    record_id: &str,
) -> Result<usize> {
    let mut client = auto.memberships.clone();
    let response = client
        .unsubscribe(UnsubscribeRequest {
            email: email.to_owned(),
            audience_ids: Vec::new(),
            all: true,
            reason: format!("{TRIGGER}: Email Opt Out checked on {object} {record_id}"),
            existing_only: true,
        })
        .await
        .map_err(|status| Error::Fetcher(Box::new(status)))?
        .into_inner();
    let mut changed = 0;
    let mut failures = Vec::new();
    for result in &response.results {
        if !result.error.is_empty() {
            failures.push(format!("{}: {}", result.audience_id, result.error));
            continue;
        }
        let was = result.previous_status.as_str();
        if result.status == "unsubscribed" && was != "unsubscribed" && was != "not_member" {
            let reason = format!(
                "Email Opt Out checked on {object} {record_id}: unsubscribed from audience {} (was {was})",
                result.audience_id
            );
            sqlx::query(
                "INSERT INTO audit_log (email, object, record_id, old_value, new_value, reason, \"trigger\") \
                 VALUES ($1, $2, $3, false, true, $4, $5)",
            )
            .bind(email)
            .bind(AUDIT_OBJECT)
            .bind(&result.audience_id)
            .bind(reason)
            .bind(TRIGGER)
            .execute(writer.store.pool())
            .await?;
            changed += 1;
        }
    }
    if !failures.is_empty() {
        return Err(Error::Config(format!(
            "unsubscribe failed in {}",
            failures.join("; ")
        )));
    }
    Ok(changed)
}

async fn watermark(writer: &Writer, key: &str) -> Result<Option<DateTime<Utc>>> {
    let row = sqlx::query("SELECT watermark FROM sf_watermarks WHERE object = $1")
        .bind(key)
        .fetch_optional(writer.store.pool())
        .await?;
    Ok(row.map(|row| row.try_get("watermark")).transpose()?)
}

async fn advance(writer: &Writer, key: &str, watermark: DateTime<Utc>) -> Result<()> {
    sqlx::query(
        "INSERT INTO sf_watermarks (object, watermark) VALUES ($1, $2) \
         ON CONFLICT (object) DO UPDATE SET watermark = GREATEST(sf_watermarks.watermark, EXCLUDED.watermark)",
    )
    .bind(key)
    .bind(watermark)
    .execute(writer.store.pool())
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn queries_checked_records_changed_since_the_watermark() {
        let since = Utc
            .with_ymd_and_hms(2024, 5, 1, 10, 0, 0)
            .single()
            .expect("valid");
        let soql = checked_query(SfObject::Contact, since, true);
        assert!(soql.contains("HasOptedOutOfEmail = true"), "{soql}");
        assert!(!soql.contains("HasOptedOutOfEmail = false"), "{soql}");
        assert!(
            soql.contains("SystemModstamp > 2024-05-01T09:59:59Z"),
            "{soql}"
        );
        assert!(soql.contains("IsPersonAccount = false"), "{soql}");
        let soql = checked_query(SfObject::PersonAccount, since, true);
        assert!(soql.contains("PersonHasOptedOutOfEmail = true"), "{soql}");
        let soql = checked_query(SfObject::Lead, since, false);
        assert!(soql.contains("IsConverted = false"), "{soql}");
    }

    #[test]
    fn requires_the_fetcher_url_when_enabled() {
        let config = AutoOptOutConfig {
            auto_optout: true,
            fetcher_url: None,
            fetcher_token: None,
        };
        assert!(config.validate().is_err());
        let off = AutoOptOutConfig {
            auto_optout: false,
            ..config
        };
        assert!(off.validate().is_ok());
        assert!(
            AutoOptOut::new(&off, &SecretString::from("t"))
                .expect("off")
                .is_none()
        );
    }
}
