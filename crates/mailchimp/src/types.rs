//! Request and response bodies of the Mailchimp endpoints the client calls.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A list member's subscription status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Receives campaigns.
    Subscribed,
    /// Opted out; Mailchimp refuses to set such a member back to subscribed.
    Unsubscribed,
    /// Hard bounced or complained.
    Cleaned,
    /// Waiting for double opt-in confirmation.
    Pending,
    /// Only receives transactional email.
    Transactional,
    /// Archived (not counted in the audience).
    Archived,
}

impl MemberStatus {
    /// The wire name (`"subscribed"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Subscribed => "subscribed",
            MemberStatus::Unsubscribed => "unsubscribed",
            MemberStatus::Cleaned => "cleaned",
            MemberStatus::Pending => "pending",
            MemberStatus::Transactional => "transactional",
            MemberStatus::Archived => "archived",
        }
    }
}

impl std::fmt::Display for MemberStatus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Query of `GET /lists/{list_id}/members`. `count` 0 means Mailchimp's default (10) for one page
/// and 1000 for [`crate::MailchimpClient::members`].
#[derive(Clone, Debug, Default)]
pub struct MembersQuery {
    /// Page size, at most 1000.
    pub count: u32,
    /// Members to skip.
    pub offset: u32,
    /// Only members with this status.
    pub status: Option<MemberStatus>,
    /// Only members changed at or after this time.
    pub since_last_changed: Option<DateTime<Utc>>,
    /// Only members changed before this time.
    pub before_last_changed: Option<DateTime<Utc>>,
    /// `timestamp_opt`, `timestamp_signup` or `last_changed`.
    pub sort_field: Option<String>,
    /// `ASC` or `DESC`.
    pub sort_dir: Option<String>,
    /// Projection, comma separated with dot notation (`members.email_address,total_items`).
    pub fields: Option<String>,
}

impl MembersQuery {
    pub(crate) fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        if let Some(fields) = &self.fields {
            pairs.push(("fields", fields.clone()));
        }
        if self.count > 0 {
            pairs.push(("count", self.count.min(1000).to_string()));
        }
        if self.offset > 0 {
            pairs.push(("offset", self.offset.to_string()));
        }
        if let Some(status) = self.status {
            pairs.push(("status", status.as_str().to_owned()));
        }
        if let Some(since) = &self.since_last_changed {
            pairs.push(("since_last_changed", crate::time::format(since)));
        }
        if let Some(before) = &self.before_last_changed {
            pairs.push(("before_last_changed", crate::time::format(before)));
        }
        if let Some(sort_field) = &self.sort_field {
            pairs.push(("sort_field", sort_field.clone()));
        }
        if let Some(sort_dir) = &self.sort_dir {
            pairs.push(("sort_dir", sort_dir.clone()));
        }
        pairs
    }
}

/// One page of list members.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct MembersPage {
    /// The members on this page.
    #[serde(default)]
    pub members: Vec<Member>,
    /// Members matching the query over all pages.
    #[serde(default)]
    pub total_items: u64,
}

/// A list member. Every field but `status` defaults when a `fields` projection leaves it out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The subscriber hash (MD5 of the lower-cased address).
    #[serde(default)]
    pub id: String,
    /// The address as the member spelled it.
    #[serde(default)]
    pub email_address: String,
    /// Subscription status.
    pub status: MemberStatus,
    /// When the member last changed in any way.
    #[serde(default, with = "crate::time::optional")]
    pub last_changed: Option<DateTime<Utc>>,
    /// The audience.
    #[serde(default)]
    pub list_id: String,
    /// Identifier of the address across all audiences.
    #[serde(default)]
    pub unique_email_id: String,
    /// Merge fields by tag (`FNAME`, `LNAME`, ...).
    #[serde(default)]
    pub merge_fields: serde_json::Value,
    /// Contact id, agnostic of the address.
    #[serde(default)]
    pub contact_id: Option<String>,
    /// Full name.
    #[serde(default)]
    pub full_name: Option<String>,
    /// Why the member unsubscribed, when they did.
    #[serde(default)]
    pub unsubscribe_reason: Option<String>,
    /// When the member signed up.
    #[serde(default, with = "crate::time::optional")]
    pub timestamp_signup: Option<DateTime<Utc>>,
    /// When the member confirmed their opt-in.
    #[serde(default, with = "crate::time::optional")]
    pub timestamp_opt: Option<DateTime<Utc>>,
    /// How the member was added (`API - Generic`, ...).
    #[serde(default)]
    pub source: Option<String>,
}

/// Body of `PUT /lists/{list_id}/members/{hash}` (add or update).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UpsertMember {
    /// The address.
    pub email_address: String,
    /// Status when the member does not exist yet; ignored for existing members.
    pub status_if_new: MemberStatus,
    /// Status to set on an existing member.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<MemberStatus>,
    /// Merge fields to set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_fields: Option<serde_json::Value>,
}

/// An audience (list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audience {
    /// List id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Subscribed members (Mailchimp's `stats.member_count`).
    pub member_count: u64,
}

/// One member of a batch subscribe.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchMember {
    /// The address.
    pub email_address: String,
    /// Status to give the member.
    pub status: MemberStatus,
    /// Merge fields to set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_fields: Option<serde_json::Value>,
}

/// Body of `POST /lists/{list_id}` (up to 500 members).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BatchSubscribe {
    /// The members.
    pub members: Vec<BatchMember>,
    /// Whether existing members are updated (else they are reported as errors).
    pub update_existing: bool,
}

/// One failed member of a batch subscribe.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct BatchError {
    /// The address.
    #[serde(default)]
    pub email_address: String,
    /// What went wrong.
    #[serde(default)]
    pub error: String,
    /// `ERROR_CONTACT_EXISTS` or `ERROR_GENERIC`.
    #[serde(default)]
    pub error_code: String,
    /// The field at fault, if any.
    #[serde(default)]
    pub field: String,
    /// What is wrong with the field.
    #[serde(default)]
    pub field_message: String,
}

/// Answer of a batch subscribe; HTTP 200 even when members failed.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct BatchSubscribeResponse {
    /// Members created.
    #[serde(default)]
    pub new_members: Vec<Member>,
    /// Members updated.
    #[serde(default)]
    pub updated_members: Vec<Member>,
    /// Members that failed.
    #[serde(default)]
    pub errors: Vec<BatchError>,
    /// Count of created members.
    #[serde(default)]
    pub total_created: u64,
    /// Count of updated members.
    #[serde(default)]
    pub total_updated: u64,
    /// Count of failed members.
    #[serde(default)]
    pub error_count: u64,
}

/// Which events fire a list webhook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookEvents {
    /// A member subscribed.
    pub subscribe: bool,
    /// A member unsubscribed (or was archived).
    pub unsubscribe: bool,
    /// A member's profile changed.
    pub profile: bool,
    /// A member was cleaned.
    pub cleaned: bool,
    /// A member's address changed.
    pub upemail: bool,
    /// A campaign was sent.
    pub campaign: bool,
}

/// Whose actions fire a list webhook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WebhookSources {
    /// The member (signup form, unsubscribe link).
    pub user: bool,
    /// An admin in the web app.
    pub admin: bool,
    /// Calls through the API (including ours: beware of loops).
    pub api: bool,
}

/// Body of `POST /lists/{list_id}/webhooks`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NewWebhook {
    /// Where Mailchimp posts the events; it must answer the validation GET with 2xx.
    pub url: String,
    /// Events to send.
    pub events: WebhookEvents,
    /// Sources to send events for.
    pub sources: WebhookSources,
}

/// A registered list webhook.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Webhook {
    /// Webhook id.
    pub id: String,
    /// Target URL.
    pub url: String,
    /// Events sent.
    #[serde(default)]
    pub events: WebhookEvents,
    /// Sources sent.
    #[serde(default)]
    pub sources: WebhookSources,
    /// The audience.
    #[serde(default)]
    pub list_id: String,
}
