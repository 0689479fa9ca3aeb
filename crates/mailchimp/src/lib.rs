//! Typed client for the Mailchimp Marketing API v3.0: audiences, list members (paged as a stream),
//! upserts that respect Mailchimp's compliance rules, batch subscribe and list webhooks.
//!
//! The client limits itself to `max_connections` concurrent requests per API key (Mailchimp answers
//! 429 past 10) and retries throttling, server errors and timeouts with jittered exponential backoff.

mod client;
mod error;
mod time;
mod types;

use md5::{Digest, Md5};

pub use client::{MailchimpClient, MailchimpConfig};
pub use error::{Error, Result};
pub use types::{
    Audience, BatchError, BatchMember, BatchSubscribe, BatchSubscribeResponse, Member,
    MemberStatus, MembersPage, MembersQuery, NewWebhook, UpsertMember, Webhook, WebhookEvents,
    WebhookSources,
};

/// Normalizes an email address the way Mailchimp does before hashing: trimmed and lower-cased.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// The subscriber hash Mailchimp uses in member paths: the MD5 hex of the normalized address.
pub fn subscriber_hash(email: &str) -> String {
    hex::encode(Md5::digest(normalize_email(email).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_the_trimmed_lowercase_address() {
        assert_eq!(
            subscriber_hash(" Urist.McVankab@Freddie's.com "),
            subscriber_hash("urist.mcvankab@freddie's.com")
        );
        assert_eq!(
            subscriber_hash("test@example.com"),
            "55502f40dc8b7c769880b10874abc9d0"
        );
    }
}
