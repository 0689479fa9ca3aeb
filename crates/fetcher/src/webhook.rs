//! Mailchimp list webhooks: what an event means for the member snapshots we publish.
//!
//! | event | snapshot(s), `last_changed` = `fired_at` (UTC) unless looked up |
//! |---|---|
//! | `subscribe` | the email `subscribed` |
//! | `unsubscribe`, `data[action]=unsub` | the email `unsubscribed` |
//! | `unsubscribe`, `data[action]=delete` | the email `archived`: Mailchimp's "delete" archives the member (the sandbox does the same), and a poll reads it back as `archived` |
//! | `cleaned` | the email `cleaned` |
//! | `profile` | carries no status: the member is read with `GET .../members/{email}` (404 → `deleted`) |
//! | `upemail` | the old address no longer exists → `deleted`; the new one is read with a GET (it keeps the old member's status) |
//! | anything else (`campaign`, unknown) | nothing; acknowledged and logged |
//!
//! `fired_at` has whole seconds, like the `last_changed` a poll reads; the evaluator ignores older
//! snapshots and applies one with an equal time and a different status, so duplicates and
//! out-of-order deliveries are harmless, and two changes within one second converge at the next poll.
//! Changes we make ourselves through the API do not come back: the webhook is registered with
//! sources `user` and `admin` only.

use chrono::{DateTime, NaiveDateTime, Utc};
use optout_mailchimp::{NewWebhook, WebhookEvents, WebhookSources};
use optout_proto::queue::v1::{MemberSnapshot, MemberStatus, Source};
use tracing::{info, warn};

use crate::{
    Error, Result,
    form::Form,
    realtime::{Realtime, member_snapshot},
    sync::timestamp,
};

/// Why a webhook body cannot be used (answered 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// A required field is missing or empty.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// `fired_at` is not `YYYY-MM-DD HH:MM:SS`.
    #[error("unparseable fired_at {0:?}")]
    FiredAt(String),
    /// `data[action]` of an unsubscribe is neither `unsub` nor `delete`.
    #[error("unknown unsubscribe action {0:?}")]
    Action(String),
}

/// What one webhook delivery reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookEvent {
    /// The member's new status is in the payload.
    Status {
        /// The audience.
        audience_id: String,
        /// The member's address.
        email: String,
        /// Its new status.
        status: MemberStatus,
        /// When Mailchimp fired the event.
        fired_at: DateTime<Utc>,
    },
    /// Profile fields changed; the status must be read.
    Profile {
        /// The audience.
        audience_id: String,
        /// The member's address.
        email: String,
        /// When Mailchimp fired the event.
        fired_at: DateTime<Utc>,
    },
    /// The address changed.
    EmailChanged {
        /// The audience.
        audience_id: String,
        /// The address before.
        old_email: String,
        /// The address now.
        new_email: String,
        /// When Mailchimp fired the event.
        fired_at: DateTime<Utc>,
    },
    /// An event that says nothing about membership status (`campaign`, or a type we do not know).
    Ignored {
        /// The `type` field.
        kind: String,
        /// The audience, when given.
        audience_id: Option<String>,
    },
}

impl WebhookEvent {
    /// The audience the event is about.
    pub fn audience_id(&self) -> Option<&str> {
        match self {
            WebhookEvent::Status { audience_id, .. }
            | WebhookEvent::Profile { audience_id, .. }
            | WebhookEvent::EmailChanged { audience_id, .. } => Some(audience_id),
            WebhookEvent::Ignored { audience_id, .. } => audience_id.as_deref(),
        }
    }
}

/// Reads the event out of a parsed webhook body.
pub fn parse_event(form: &Form) -> Result<WebhookEvent, Malformed> {
    let kind = required(form, &["type"], "type")?;
    let audience_id = || required(form, &["data", "list_id"], "data[list_id]");
    let fired_at = || parse_fired_at(required(form, &["fired_at"], "fired_at")?);
    let email = || required(form, &["data", "email"], "data[email]");
    let status = |status| -> Result<WebhookEvent, Malformed> {
        Ok(WebhookEvent::Status {
            audience_id: audience_id()?.to_owned(),
            email: email()?.to_owned(),
            status,
            fired_at: fired_at()?,
        })
    };
    match kind {
        "subscribe" => status(MemberStatus::Subscribed),
        "cleaned" => status(MemberStatus::Cleaned),
        "unsubscribe" => match form.text(&["data", "action"]).map(str::trim) {
            None | Some("" | "unsub") => status(MemberStatus::Unsubscribed),
            Some("delete") => status(MemberStatus::Archived),
            Some(other) => Err(Malformed::Action(other.to_owned())),
        },
        "profile" => Ok(WebhookEvent::Profile {
            audience_id: audience_id()?.to_owned(),
            email: email()?.to_owned(),
            fired_at: fired_at()?,
        }),
        "upemail" => Ok(WebhookEvent::EmailChanged {
            audience_id: audience_id()?.to_owned(),
            old_email: required(form, &["data", "old_email"], "data[old_email]")?.to_owned(),
            new_email: required(form, &["data", "new_email"], "data[new_email]")?.to_owned(),
            fired_at: fired_at()?,
        }),
        other => Ok(WebhookEvent::Ignored {
            kind: other.to_owned(),
            audience_id: form
                .text(&["data", "list_id"])
                .filter(|id| !id.trim().is_empty())
                .map(str::to_owned),
        }),
    }
}

fn required<'a>(form: &'a Form, path: &[&str], name: &'static str) -> Result<&'a str, Malformed> {
    form.text(path)
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .ok_or(Malformed::Missing(name))
}

/// `fired_at` is `YYYY-MM-DD HH:MM:SS` in UTC (RFC 3339 accepted too).
pub fn parse_fired_at(text: &str) -> Result<DateTime<Utc>, Malformed> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
        .map(|naive| naive.and_utc())
        .or_else(|_| DateTime::parse_from_rfc3339(text).map(|time| time.with_timezone(&Utc)))
        .map_err(|_| Malformed::FiredAt(text.chars().take(40).collect()))
}

/// How a delivery was handled (all answered 200).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Snapshots published and confirmed.
    Published(usize),
    /// The audience is unknown or out of scope.
    UnknownAudience(String),
    /// Nothing to publish (an ignored event type, or a lookup that found nothing).
    Ignored,
}

/// Turns an event into snapshots (reading Mailchimp where the payload lacks the status) and
/// publishes them with confirm. An error means nothing may have been published: answer 5xx so
/// Mailchimp retries.
pub async fn handle(realtime: &Realtime, event: WebhookEvent) -> Result<Handled> {
    let Some(audience_id) = event.audience_id().map(str::to_owned) else {
        if let WebhookEvent::Ignored { kind, .. } = &event {
            info!(kind, "webhook event without audience ignored");
        }
        return Ok(Handled::Ignored);
    };
    if !realtime.in_scope(&audience_id).await? {
        warn!(%audience_id, "webhook for an unknown or out-of-scope audience acknowledged and ignored");
        return Ok(Handled::UnknownAudience(audience_id));
    }
    let snapshots = match event {
        WebhookEvent::Status {
            email,
            status,
            fired_at,
            ..
        } => {
            if status == MemberStatus::Unsubscribed {
                realtime
                    .publish_other_memberships(&[&audience_id], &email, Source::Webhook)
                    .await?;
            }
            vec![snapshot(email, status, fired_at)]
        }
        WebhookEvent::Profile {
            email, fired_at, ..
        } => vec![read_member(realtime, &audience_id, email, fired_at).await?],
        WebhookEvent::EmailChanged {
            old_email,
            new_email,
            fired_at,
            ..
        } => {
            let mut snapshots = vec![snapshot(old_email, MemberStatus::Deleted, fired_at)];
            let new = read_member(realtime, &audience_id, new_email, fired_at).await?;
            if new.status != MemberStatus::Deleted as i32 {
                snapshots.push(new);
            }
            snapshots
        }
        WebhookEvent::Ignored { kind, .. } => {
            info!(kind, %audience_id, "webhook event type ignored");
            return Ok(Handled::Ignored);
        }
    };
    let count = snapshots.len();
    realtime
        .publish(&audience_id, Source::Webhook, snapshots)
        .await?;
    Ok(Handled::Published(count))
}

fn snapshot(email: String, status: MemberStatus, fired_at: DateTime<Utc>) -> MemberSnapshot {
    MemberSnapshot {
        email,
        status: status as i32,
        last_changed: Some(timestamp(fired_at)),
    }
}

/// The member as Mailchimp holds it now; gone (404) means deleted.
async fn read_member(
    realtime: &Realtime,
    audience_id: &str,
    email: String,
    fired_at: DateTime<Utc>,
) -> Result<MemberSnapshot> {
    match realtime.client().member(audience_id, &email).await {
        Ok(member) => Ok(member_snapshot(&member, fired_at)),
        Err(optout_mailchimp::Error::NotFound { .. }) => {
            Ok(snapshot(email, MemberStatus::Deleted, fired_at))
        }
        Err(error) => Err(Error::Mailchimp(error)),
    }
}

/// The webhook URL under a public base (`https://optout.example.com` →
/// `https://optout.example.com/webhooks/mailchimp/{secret}`).
pub fn webhook_url(public_base: &str, secret: &str) -> String {
    format!(
        "{}/webhooks/mailchimp/{secret}",
        public_base.trim_end_matches('/')
    )
}

/// Registers `url` on every audience in scope that does not have it yet, for member events from
/// sources `user` and `admin` (not `api`: our own changes must not echo). Returns the audiences it
/// registered on. Mailchimp validates the URL with a GET, so the HTTP server must be up.
pub async fn register(realtime: &Realtime, url: &str) -> Result<Vec<String>> {
    let mut registered = Vec::new();
    for audience_id in realtime.audiences_in_scope().await? {
        let hooks = realtime.client().webhooks(&audience_id).await?;
        if hooks.iter().any(|hook| hook.url == url) {
            continue;
        }
        let request = NewWebhook {
            url: url.to_owned(),
            events: WebhookEvents {
                subscribe: true,
                unsubscribe: true,
                profile: true,
                cleaned: true,
                upemail: true,
                campaign: false,
            },
            sources: WebhookSources {
                user: true,
                admin: true,
                api: false,
            },
        };
        realtime
            .client()
            .create_webhook(&audience_id, &request)
            .await?;
        info!(%audience_id, "mailchimp webhook registered");
        registered.push(audience_id);
    }
    Ok(registered)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn event(body: &str) -> Result<WebhookEvent, Malformed> {
        parse_event(&Form::parse(body.as_bytes()).expect("form"))
    }

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2009, 3, 26, h, m, s)
            .single()
            .expect("valid")
    }

    #[test]
    fn maps_an_unsubscribe_to_unsubscribed_at_fired_at() {
        let parsed = event(
            "type=unsubscribe&fired_at=2009-03-26+21%3A40%3A57&data[action]=unsub&data[reason]=manual\
             &data[list_id]=a6b5da1054&data[email]=Api%2Bunsub%40mailchimp.com",
        );
        assert_eq!(
            parsed,
            Ok(WebhookEvent::Status {
                audience_id: "a6b5da1054".into(),
                email: "Api+unsub@mailchimp.com".into(),
                status: MemberStatus::Unsubscribed,
                fired_at: at(21, 40, 57),
            })
        );
    }

    #[test]
    fn maps_a_delete_action_to_archived() {
        let parsed = event(
            "type=unsubscribe&fired_at=2009-03-26 21:40:57&data[action]=delete&data[list_id]=l&data[email]=a@b.c",
        )
        .expect("event");
        assert!(matches!(
            parsed,
            WebhookEvent::Status {
                status: MemberStatus::Archived,
                ..
            }
        ));
    }

    #[test]
    fn maps_subscribe_and_cleaned() {
        for (kind, status) in [
            ("subscribe", MemberStatus::Subscribed),
            ("cleaned", MemberStatus::Cleaned),
        ] {
            let parsed = event(&format!(
                "type={kind}&fired_at=2009-03-26 22:01:00&data[list_id]=l&data[email]=a@b.c&data[reason]=hard"
            ))
            .expect("event");
            assert!(
                matches!(parsed, WebhookEvent::Status { status: s, .. } if s == status),
                "{kind}"
            );
        }
    }

    #[test]
    fn reads_upemail_and_profile_events() {
        let parsed = event(
            "type=upemail&fired_at=2009-03-26 22:15:09&data[list_id]=l&data[new_id]=51da8c3259\
             &data[new_email]=new%40x.io&data[old_email]=old%40x.io",
        );
        assert_eq!(
            parsed,
            Ok(WebhookEvent::EmailChanged {
                audience_id: "l".into(),
                old_email: "old@x.io".into(),
                new_email: "new@x.io".into(),
                fired_at: at(22, 15, 9),
            })
        );
        let parsed =
            event("type=profile&fired_at=2009-03-26 22:15:09&data[list_id]=l&data[email]=a@b.c")
                .expect("event");
        assert!(matches!(parsed, WebhookEvent::Profile { .. }));
    }

    #[test]
    fn ignores_campaign_and_unknown_types() {
        let parsed = event("type=campaign&fired_at=x&data[id]=c&data[list_id]=l").expect("event");
        assert_eq!(
            parsed,
            WebhookEvent::Ignored {
                kind: "campaign".into(),
                audience_id: Some("l".into())
            }
        );
        assert!(matches!(
            event("type=something_new"),
            Ok(WebhookEvent::Ignored { .. })
        ));
    }

    #[test]
    fn rejects_bodies_missing_what_the_event_needs() {
        assert_eq!(event(""), Err(Malformed::Missing("type")));
        assert_eq!(
            event("type=unsubscribe&fired_at=2009-03-26 21:40:57&data[email]=a@b.c"),
            Err(Malformed::Missing("data[list_id]"))
        );
        assert_eq!(
            event("type=unsubscribe&fired_at=2009-03-26 21:40:57&data[list_id]=l"),
            Err(Malformed::Missing("data[email]"))
        );
        assert!(matches!(
            event("type=subscribe&fired_at=yesterday&data[list_id]=l&data[email]=a@b.c"),
            Err(Malformed::FiredAt(_))
        ));
        assert!(matches!(
            event(
                "type=unsubscribe&fired_at=2009-03-26 21:40:57&data[action]=zap&data[list_id]=l&data[email]=a@b.c"
            ),
            Err(Malformed::Action(_))
        ));
    }

    #[test]
    fn builds_the_public_webhook_url() {
        assert_eq!(
            webhook_url("https://x.io/", "s3"),
            "https://x.io/webhooks/mailchimp/s3"
        );
    }
}
