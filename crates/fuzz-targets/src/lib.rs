//! Fuzz entry points: one per parser that takes outside input. Each takes arbitrary bytes, runs
//! the parser, and panics only when an invariant breaks (a parser panicking is itself the failure
//! a fuzzer reports). `fuzz/` wraps each in a cargo-fuzz target for the long runs
//! (`fuzz/README.md`); `tests/short_runs.rs` runs each on a seed corpus and random mutations of it
//! as part of the test suite.
//!
//! | target | outside input | invariant beyond "no panic" |
//! |---|---|---|
//! | [`webhook`] | Mailchimp's webhook POST body | a parsed event names an audience and a type |
//! | [`mailchimp_response`] | Mailchimp answers: error bodies, member pages | classification is total |
//! | [`salesforce_response`] | Salesforce answers: error bodies, `Sforce-Limit-Info`, dates, Bulk result CSV | classification is total |
//! | [`soql`] | emails (from Mailchimp and Salesforce) put into SOQL | a quoted value reads back as exactly itself; IN-list chunks keep every value once |
//! | [`members_changed`] | `members.changed` queue messages | every snapshot has an email and the message's audience |

use optout_fetcher::{form::Form, webhook};
use optout_proto::queue::v1::{MembersChanged, PersonsDirty};
use optout_salesforce::soql;
use prost::Message;

/// The names of the targets, as `fuzz/` and the short runs know them.
pub const TARGETS: [&str; 5] = [
    "webhook",
    "mailchimp_response",
    "salesforce_response",
    "soql",
    "members_changed",
];

/// Runs the target called `name` on `data`; `false` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "webhook" => webhook(data),
        "mailchimp_response" => mailchimp_response(data),
        "salesforce_response" => salesforce_response(data),
        "soql" => soql(data),
        "members_changed" => members_changed(data),
        _ => return false,
    }
    true
}

/// The webhook body: form parser, then event reader.
pub fn webhook(data: &[u8]) {
    let Ok(form) = Form::parse(data) else {
        return;
    };
    if let Ok(event) = webhook::parse_event(&form)
        && !matches!(event, webhook::WebhookEvent::Ignored { .. })
    {
        // Every event we act on names its audience: one without could not be scoped.
        let audience = event.audience_id().unwrap_or_default();
        assert!(
            !audience.is_empty(),
            "an event acted on without an audience id"
        );
    }
}

/// The first two bytes pick an HTTP status; the rest is the body.
fn status_and_body(data: &[u8]) -> (u16, &[u8]) {
    match data {
        [high, low, body @ ..] => (100 + u16::from_be_bytes([*high, *low]) % 500, body),
        _ => (500, data),
    }
}

/// Mailchimp answers: the error classifier and the member page and member decoders.
pub fn mailchimp_response(data: &[u8]) {
    let (status, body) = status_and_body(data);
    let error = optout_mailchimp::Error::from_response(status, body);
    let _ = error.is_retryable();
    let _ = error.to_string();
    if let Ok(page) = serde_json::from_slice::<optout_mailchimp::MembersPage>(body) {
        for member in &page.members {
            let _ = optout_mailchimp::subscriber_hash(&member.email_address);
        }
    }
    let _ = serde_json::from_slice::<optout_mailchimp::Member>(body);
    let _ = serde_json::from_slice::<optout_mailchimp::BatchSubscribeResponse>(body);
}

/// Salesforce answers: the error classifier, the limit header, dates and the Bulk result CSV.
pub fn salesforce_response(data: &[u8]) {
    let (status, body) = status_and_body(data);
    let error = optout_salesforce::Error::from_response(status, body);
    let _ = error.is_retryable();
    let _ = error.to_string();
    let text = String::from_utf8_lossy(body);
    let _ = optout_salesforce::parse_limit_info(&text);
    let _ = optout_salesforce::parse_datetime(&text);
    let _ = optout_salesforce::csv_rows(&text);
}

/// SOQL literals: any value, however hostile, stays inside its quotes.
pub fn soql(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let statement = format!(
        "SELECT Id FROM Contact WHERE Email = {} AND IsDeleted = false",
        soql::quote(&text)
    );
    assert_eq!(
        soql::literals(&statement),
        Some(vec![text.to_string()]),
        "the value escaped its literal: {statement}"
    );
    // The same bytes as a list of values (split at NUL), chunked to a limit the first byte picks.
    let values: Vec<String> = text.split('\0').map(str::to_owned).collect();
    let max_len = 200 + usize::from(data.first().copied().unwrap_or(0)) * 16;
    let prefix = "SELECT Id, Email FROM Lead WHERE Email IN ";
    let suffix = " AND IsDeleted = false";
    let statements = soql::chunk_in_clauses(prefix, &values, suffix, max_len);
    let mut seen = Vec::new();
    for statement in &statements {
        let found = soql::literals(statement).expect("a chunk lexes");
        assert!(
            soql::encoded_len(statement) <= max_len || found.len() == 1,
            "a chunk of several values is over the limit"
        );
        seen.extend(found);
    }
    assert_eq!(seen, values, "chunks lost, repeated or reordered values");
}

/// Queue messages: protobuf decoding, then the evaluator's validation; `persons.dirty` decoding.
pub fn members_changed(data: &[u8]) {
    if let Ok(message) = MembersChanged::decode(data)
        && let Ok(snapshots) = optout_rule_evaluator::snapshots_of(&message)
    {
        assert_eq!(snapshots.len(), message.members.len());
        for snapshot in &snapshots {
            assert!(!snapshot.email.is_empty(), "a snapshot without an email");
            assert_eq!(snapshot.audience_id, message.audience_id.trim());
        }
    }
    let _ = PersonsDirty::decode(data);
}

/// A few well-formed inputs per target, for the short runs to mutate and for cargo fuzz to start
/// from (`cargo run -p optout-fuzz-targets --example write_seeds -- DIR`).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    let text = |items: &[&str]| items.iter().map(|item| item.as_bytes().to_vec()).collect();
    let with_status = |status: u16, body: &str| {
        let mut bytes = (status - 100).to_be_bytes().to_vec();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    };
    match name {
        "webhook" => text(&[
            "type=unsubscribe&fired_at=2026-01-02+03%3A04%3A05&data%5Baction%5D=unsub\
             &data%5Breason%5D=manual&data%5Bid%5D=8a25ff1d98&data%5Blist_id%5D=a6b5da1054\
             &data%5Bemail%5D=api%2Bunsub%40mailchimp.com&data%5Bemail_type%5D=html\
             &data%5Bmerges%5D%5BEMAIL%5D=api%2Bunsub%40mailchimp.com&data%5Bmerges%5D%5BFNAME%5D=Mailchimp\
             &data%5Bip_opt%5D=10.20.10.30&data%5Bcampaign_id%5D=cb398d21d2&data%5Breason%5D=hard",
            "type=profile&fired_at=2009-03-26 21:31:21&data[id]=8a25ff1d98&data[list_id]=a6b5da1054\
             &data[email]=api@mailchimp.com&data[merges][ADDRESS][addr1]=1 Main St&data[interests][]=a\
             &data[interests][]=b",
            "type=upemail&fired_at=2009-03-26 22:15:09&data[list_id]=a6b5da1054\
             &data[new_id]=51da8c3259&data[new_email]=api+new@mailchimp.com&data[old_email]=api+old@mailchimp.com",
            "type=cleaned&fired_at=2009-03-26 22:01:00&data[list_id]=a6b5da1054\
             &data[campaign_id]=4fjk2ma9xd&data[reason]=hard&data[email]=api+cleaned@mailchimp.com",
        ]),
        "mailchimp_response" => vec![
            with_status(
                400,
                r#"{"type":"https://mailchimp.com/developer/marketing/docs/errors/","title":"Member In Compliance State","status":400,"detail":"x@y.com is already a list member in compliance state due to unsubscribe, bounce, or compliance review.","instance":"995c5cb0-3280-4a6e-808b-3b096d0bb219"}"#,
            ),
            with_status(429, ""),
            with_status(
                200,
                r#"{"members":[{"id":"852aaa9532cb36adfb5e9fef7a4206a9","email_address":"a@b.com","status":"unsubscribed","last_changed":"2024-05-01T10:00:00+00:00","list_id":"a6b5da1054","merge_fields":{"FNAME":"A"}}],"total_items":1}"#,
            ),
        ],
        "salesforce_response" => vec![
            with_status(
                403,
                r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
            ),
            with_status(
                401,
                r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#,
            ),
            with_status(200, "api-usage=25/15000"),
            with_status(200, "2024-05-01T10:00:00.000+0000"),
            with_status(
                200,
                "\"sf__Id\",\"sf__Error\",\"Id\",\"HasOptedOutOfEmail\"\n\"003xx\",\"UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record:--\",\"003xx\",\"true\"\n",
            ),
        ],
        "soql" => text(&[
            "o'brien@example.com",
            "a\\b@example.com",
            "x' OR Email != '@evil.com",
            "ünïcødé@例え.jp\0second@example.com\0",
        ]),
        "members_changed" => {
            use optout_proto::queue::v1::{MemberSnapshot, MemberStatus, Source};
            let message = MembersChanged {
                audience_id: "a6b5da1054".to_owned(),
                source: Source::Webhook as i32,
                members: vec![MemberSnapshot {
                    email: "A@B.com".to_owned(),
                    status: MemberStatus::Unsubscribed as i32,
                    last_changed: Some(prost_types_timestamp(1_714_557_600)),
                }],
                first_sync: false,
                run_id: "run-1".to_owned(),
                page: 0,
            };
            let dirty = PersonsDirty {
                emails: vec!["a@b.com".to_owned()],
                ..PersonsDirty::default()
            };
            vec![message.encode_to_vec(), dirty.encode_to_vec()]
        }
        _ => Vec::new(),
    }
}

fn prost_types_timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}
