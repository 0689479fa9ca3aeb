//! What the benchmark knows about the generated org: every membership as the Mailchimp API lists
//! it, the rule's decision per person (computed here independently of the evaluator), and the
//! Salesforce records of chosen people read through the REST API.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use optout_mailchimp::{MailchimpClient, MemberStatus, MembersQuery, normalize_email};
use optout_salesforce::{Auth, SalesforceClient, SalesforceConfig, parse_datetime, soql};
use serde_json::Value;

/// The decision of the rule for one person (README, "The rule").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every member unsubscribed: every record gets the box checked.
    OptOut,
    /// Some member subscribed: the box is unchecked only on opt-in evidence.
    OptIn,
    /// Anything else.
    NoChange,
}

/// The rule over the statuses of one person's members.
pub fn decide(statuses: impl IntoIterator<Item = MemberStatus>) -> Decision {
    let mut any = false;
    let mut all_unsubscribed = true;
    for status in statuses {
        any = true;
        if status == MemberStatus::Subscribed {
            return Decision::OptIn;
        }
        all_unsubscribed &= status == MemberStatus::Unsubscribed;
    }
    if any && all_unsubscribed {
        Decision::OptOut
    } else {
        Decision::NoChange
    }
}

/// Every membership of the org, by normalized email.
#[derive(Debug, Default)]
pub struct Org {
    /// Audience ids, in the sandbox's order.
    pub audiences: Vec<String>,
    /// Normalized email → `(audience index, status)` of each of its members.
    pub persons: BTreeMap<String, Vec<(usize, MemberStatus)>>,
    /// Members per audience.
    pub members_per_audience: Vec<u64>,
}

impl Org {
    /// Pages every member of every audience through the Mailchimp API (the audiences in
    /// parallel; the caller keeps these calls out of any measured window).
    pub async fn read(mailchimp: &MailchimpClient, audiences: &[String]) -> Result<Self> {
        let pages = audiences.iter().map(|audience| async move {
            let query = MembersQuery {
                count: 1000,
                fields: Some("members.email_address,members.status,total_items".to_owned()),
                ..MembersQuery::default()
            };
            let members: Vec<(String, MemberStatus)> = mailchimp
                .members(audience, query)
                .map_ok(|page| {
                    futures::stream::iter(page.members.into_iter().map(|member| {
                        Ok::<_, optout_mailchimp::Error>((
                            normalize_email(&member.email_address),
                            member.status,
                        ))
                    }))
                })
                .try_flatten()
                .try_collect()
                .await
                .with_context(|| format!("paging the members of {audience}"))?;
            Ok::<_, anyhow::Error>(members)
        });
        let per_audience = futures::future::try_join_all(pages).await?;
        let mut org = Self {
            audiences: audiences.to_vec(),
            ..Self::default()
        };
        for (index, members) in per_audience.into_iter().enumerate() {
            org.members_per_audience.push(members.len() as u64);
            for (email, status) in members {
                org.persons.entry(email).or_default().push((index, status));
            }
        }
        Ok(org)
    }

    /// Memberships over every audience.
    pub fn members(&self) -> u64 {
        self.members_per_audience.iter().sum()
    }

    /// The rule's decision for a person.
    pub fn decision(&self, email: &str) -> Decision {
        self.persons
            .get(email)
            .map_or(Decision::NoChange, |members| {
                decide(members.iter().map(|(_, status)| *status))
            })
    }

    /// Every person whose decision is OptOut, sorted.
    pub fn opt_out_emails(&self) -> Vec<String> {
        self.persons
            .keys()
            .filter(|email| self.decision(email) == Decision::OptOut)
            .cloned()
            .collect()
    }

    /// Records a status change made in the sandbox.
    pub fn set_status(&mut self, email: &str, audience: usize, status: MemberStatus) {
        if let Some(members) = self.persons.get_mut(email) {
            for member in members.iter_mut().filter(|(index, _)| *index == audience) {
                member.1 = status;
            }
        }
    }
}

/// One Salesforce record carrying an email.
#[derive(Clone, Debug)]
pub struct SfRecord {
    /// `Contact` or `Lead`.
    pub object: &'static str,
    /// Record id.
    pub id: String,
    /// Email Opt Out.
    pub opted_out: bool,
    /// A converted Lead, which Salesforce refuses to update.
    pub converted: bool,
    /// `SystemModstamp` in Unix milliseconds: the time of its last write.
    pub modstamp_ms: i64,
}

impl SfRecord {
    /// Whether the writer may update it.
    pub fn writable(&self) -> bool {
        !self.converted
    }
}

/// The objects the benchmark's org has (no Person Accounts).
pub const OBJECTS: [&str; 2] = ["Contact", "Lead"];

/// A Salesforce client of the bench itself (its calls are kept out of the measured windows).
pub fn salesforce_client(sandbox_info: &Value) -> Result<SalesforceClient> {
    let field = |key: &str| {
        sandbox_info
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut config = SalesforceConfig::new(
        field("salesforce_login_url"),
        Auth::ClientCredentials {
            client_id: field("salesforce_client_id"),
            client_secret: field("salesforce_client_secret").into(),
        },
    );
    config.ca_file = Some(field("salesforce_ca_file").into());
    Ok(SalesforceClient::new(config)?)
}

/// The Contacts and Leads of `emails` (normalized), by normalized email.
pub async fn records_of(
    client: &SalesforceClient,
    emails: &[String],
) -> Result<HashMap<String, Vec<SfRecord>>> {
    let mut statements = Vec::new();
    for object in OBJECTS {
        let converted = if object == "Lead" {
            ", IsConverted"
        } else {
            ""
        };
        let prefix = format!(
            "SELECT Id, Email, HasOptedOutOfEmail, SystemModstamp{converted} FROM {object} WHERE Email IN "
        );
        for statement in soql::chunk_in_clauses(&prefix, emails, "", soql::DEFAULT_MAX_ENCODED_LEN)
        {
            statements.push((object, statement));
        }
    }
    let results: Vec<(&'static str, Vec<Value>)> = futures::stream::iter(statements)
        .map(|(object, statement)| async move {
            let records: Vec<Value> = client
                .query(&statement)
                .await
                .with_context(|| format!("reading {object} records"))?;
            Ok::<_, anyhow::Error>((object, records))
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
    let mut by_email: HashMap<String, Vec<SfRecord>> = HashMap::new();
    for (object, records) in results {
        for record in records {
            let text = |key: &str| record.get(key).and_then(Value::as_str).unwrap_or_default();
            let flag = |key: &str| record.get(key).and_then(Value::as_bool).unwrap_or(false);
            by_email
                .entry(normalize_email(text("Email")))
                .or_default()
                .push(SfRecord {
                    object,
                    id: text("Id").to_owned(),
                    opted_out: flag("HasOptedOutOfEmail"),
                    converted: flag("IsConverted"),
                    modstamp_ms: parse_datetime(text("SystemModstamp"))
                        .map_or(0, |at| at.timestamp_millis()),
                });
        }
    }
    Ok(by_email)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemberStatus::{Archived, Cleaned, Subscribed, Unsubscribed};

    #[test]
    fn the_rule_matches_the_readme() {
        assert_eq!(decide([]), Decision::NoChange);
        assert_eq!(decide([Unsubscribed, Unsubscribed]), Decision::OptOut);
        assert_eq!(decide([Unsubscribed, Subscribed]), Decision::OptIn);
        assert_eq!(decide([Unsubscribed, Cleaned]), Decision::NoChange);
        assert_eq!(decide([Archived]), Decision::NoChange);
    }
}
