//! Unit tests of the pure write planning: targets, diff, SOQL and CSV.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use optout_proto::evaluator::v1::{Decision, PersonDecision};
use optout_salesforce_writer::plan::{
    self, Change, CurrentRecord, MAX_SOQL_LEN, Read, ReadPacker, SfObject, Target, diff,
    parse_record, poll_query, read_queries, target_for, targets,
};
use proptest::prelude::*;
use serde_json::json;

fn decision(email: &str, decision: Decision, evidence: i64) -> PersonDecision {
    PersonDecision {
        email: email.to_owned(),
        decision: decision as i32,
        version: 7,
        opt_in_evidence_id: evidence,
        rule: format!("rule for {email}"),
        ..PersonDecision::default()
    }
}

fn record(object: SfObject, id: &str, email: &str, opted_out: bool) -> CurrentRecord {
    CurrentRecord {
        object,
        id: id.to_owned(),
        email: email.to_owned(),
        opted_out,
    }
}

fn target_map(list: &[(&str, bool, i64)]) -> BTreeMap<String, Target> {
    list.iter()
        .map(|(email, opted_out, evidence)| {
            (
                (*email).to_owned(),
                Target {
                    email: (*email).into(),
                    opted_out: *opted_out,
                    rule: "rule".into(),
                    version: 1,
                    evidence_id: *evidence,
                    opted_out_at: None,
                    trace_id: None,
                },
            )
        })
        .collect()
}

#[test]
fn an_opt_out_keeps_its_mailchimp_time_and_targets_share_their_rule_text() {
    let at = prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 5_000,
    };
    let mut opt_out = decision("ann@example.com", Decision::OptOut, 0);
    opt_out.opted_out_at = Some(at);
    opt_out.rule = "unsubscribed".to_owned();
    let mut other = decision("bob@example.com", Decision::OptOut, 0);
    other.rule = "unsubscribed".to_owned();
    // An opt-in never starts the opt-out clock, even if the decision carries a time.
    let mut opt_in = decision("cy@example.com", Decision::OptIn, 9);
    opt_in.opted_out_at = Some(at);
    let targets = targets(&[opt_out, other, opt_in], false);
    let ann = &targets["ann@example.com"];
    assert_eq!(
        ann.opted_out_at.map(|time| time.timestamp_nanos_opt()),
        Some(Some(1_700_000_000_000_005_000))
    );
    assert_eq!(targets["bob@example.com"].opted_out_at, None);
    assert_eq!(targets["cy@example.com"].opted_out_at, None);
    assert!(std::sync::Arc::ptr_eq(
        &ann.rule,
        &targets["bob@example.com"].rule
    ));
    let changes = diff(
        &targets,
        &[record(SfObject::Contact, "003A", "ann@example.com", false)],
    );
    assert_eq!(changes[0].opted_out_at, ann.opted_out_at);
    assert!(std::sync::Arc::ptr_eq(&changes[0].reason, &ann.rule));
}

#[test]
fn opt_out_decision_asks_for_a_checked_box() {
    let target = target_for(&decision(" Ann@Example.COM ", Decision::OptOut, 0)).expect("a target");
    assert!(target.opted_out);
    assert_eq!(&*target.email, "ann@example.com");
    assert_eq!(target.evidence_id, 0);
    assert_eq!(target.version, 7);
}

#[test]
fn opt_in_without_evidence_asks_for_nothing() {
    assert_eq!(target_for(&decision("a@x.com", Decision::OptIn, 0)), None);
}

#[test]
fn opt_in_with_evidence_asks_for_an_unchecked_box() {
    let target = target_for(&decision("a@x.com", Decision::OptIn, 42)).expect("a target");
    assert!(!target.opted_out);
    assert_eq!(target.evidence_id, 42);
}

#[test]
fn no_change_and_unknown_decisions_ask_for_nothing() {
    assert_eq!(
        target_for(&decision("a@x.com", Decision::NoChange, 5)),
        None
    );
    assert_eq!(
        target_for(&decision("a@x.com", Decision::Unspecified, 5)),
        None
    );
    let mut unknown = decision("a@x.com", Decision::OptOut, 0);
    unknown.decision = 99;
    assert_eq!(target_for(&unknown), None);
}

#[test]
fn poll_targets_ignore_opt_ins_even_with_evidence() {
    let decisions = [
        decision("in@x.com", Decision::OptIn, 3),
        decision("out@x.com", Decision::OptOut, 0),
    ];
    let poll = targets(&decisions, true);
    assert_eq!(poll.keys().collect::<Vec<_>>(), ["out@x.com"]);
    assert_eq!(targets(&decisions, false).len(), 2);
}

fn any_decision() -> impl Strategy<Value = PersonDecision> {
    (
        "[a-zA-Z]{1,8}@[a-z]{1,5}\\.com",
        -1i32..5,
        prop_oneof![Just(0i64), 1i64..1000],
        any::<i64>(),
    )
        .prop_map(|(email, kind, evidence, version)| PersonDecision {
            email,
            decision: kind,
            version,
            opt_in_evidence_id: evidence,
            rule: String::new(),
            ..PersonDecision::default()
        })
}

proptest! {
    #[test]
    fn never_targets_an_unchecked_box_without_evidence(decisions in proptest::collection::vec(any_decision(), 0..40),
                                                       opted_out in proptest::collection::vec(any::<bool>(), 40)) {
        let wanted = targets(&decisions, false);
        for target in wanted.values() {
            if !target.opted_out {
                prop_assert!(target.evidence_id != 0);
                prop_assert!(decisions.iter().any(|d| plan::normalize_email(&d.email) == *target.email
                    && d.decision == Decision::OptIn as i32 && d.opt_in_evidence_id == target.evidence_id));
            }
        }
        let records: Vec<CurrentRecord> = decisions.iter().zip(&opted_out)
            .enumerate()
            .map(|(index, (d, value))| record(SfObject::Contact, &format!("003{index:015}"), &d.email.to_uppercase(), *value))
            .collect();
        for change in diff(&wanted, &records) {
            let target = &wanted[&*change.email];
            prop_assert_eq!(change.new, target.opted_out);
            prop_assert_ne!(change.old, change.new);
            if !change.new {
                prop_assert!(target.evidence_id != 0);
            }
        }
    }
}

#[test]
fn diff_matches_emails_case_insensitively() {
    let wanted = target_map(&[("ann@example.com", true, 0)]);
    let records = [record(SfObject::Contact, "003A", " ANN@Example.com", false)];
    let changes = diff(&wanted, &records);
    assert_eq!(changes.len(), 1);
    assert_eq!(&*changes[0].email, "ann@example.com");
}

#[test]
fn diff_skips_records_already_at_their_target_and_records_without_target() {
    let wanted = target_map(&[("a@x.com", true, 0), ("b@x.com", false, 9)]);
    let records = [
        record(SfObject::Contact, "003A", "a@x.com", true),
        record(SfObject::Lead, "00QA", "a@x.com", false),
        record(SfObject::Contact, "003B", "b@x.com", false),
        record(SfObject::Lead, "00QB", "b@x.com", true),
        record(SfObject::Contact, "003C", "c@x.com", false),
    ];
    let changes = diff(&wanted, &records);
    let summary: Vec<(&str, bool, bool)> = changes
        .iter()
        .map(|change| (change.id.as_str(), change.old, change.new))
        .collect();
    assert_eq!(summary, [("00QA", false, true), ("00QB", true, false)]);
}

#[test]
fn diff_writes_each_record_once_even_when_read_twice() {
    let wanted = target_map(&[("a@x.com", true, 0)]);
    let records = [
        record(SfObject::Lead, "00QA", "a@x.com", false),
        record(SfObject::Lead, "00QA", "A@X.com", false),
    ];
    assert_eq!(diff(&wanted, &records).len(), 1);
}

#[test]
fn converted_leads_are_excluded() {
    let converted =
        json!({"Id": "00QA", "Email": "a@x.com", "HasOptedOutOfEmail": false, "IsConverted": true});
    assert_eq!(parse_record(SfObject::Lead, &converted), None);
    for soql in read_queries(SfObject::Lead, &["a@x.com".to_owned()], false) {
        assert!(soql.contains("IsConverted = false"), "{soql}");
    }
    assert!(poll_query(SfObject::Lead, None, false).contains("IsConverted = false"));
}

#[test]
fn parses_rows_of_each_object() {
    let contact = json!({"attributes": {"type": "Contact"}, "Id": "003A", "Email": "A@X.com", "HasOptedOutOfEmail": true});
    assert_eq!(
        parse_record(SfObject::Contact, &contact),
        Some(record(SfObject::Contact, "003A", "a@x.com", true))
    );
    let account = json!({"Id": "001A", "PersonEmail": "p@x.com", "PersonHasOptedOutOfEmail": null});
    assert_eq!(
        parse_record(SfObject::PersonAccount, &account),
        Some(record(SfObject::PersonAccount, "001A", "p@x.com", false))
    );
    let no_email = json!({"Id": "003B", "Email": null, "HasOptedOutOfEmail": false});
    assert_eq!(parse_record(SfObject::Contact, &no_email), None);
}

#[test]
fn typed_rows_read_as_their_json_values_do() -> Result<(), serde_json::Error> {
    let rows = [
        (
            SfObject::Contact,
            json!({"attributes": {"type": "Contact", "url": "/x"}, "Id": "003A", "Email": " A@X.com", "HasOptedOutOfEmail": true}),
        ),
        (
            SfObject::Lead,
            json!({"Id": "00QA", "Email": "l@x.com", "HasOptedOutOfEmail": null}),
        ),
        (
            SfObject::Lead,
            json!({"Id": "00QB", "Email": "c@x.com", "HasOptedOutOfEmail": false, "IsConverted": true}),
        ),
        (
            SfObject::PersonAccount,
            json!({"Id": "001A", "PersonEmail": "P@x.com", "PersonHasOptedOutOfEmail": true}),
        ),
        (
            SfObject::Contact,
            json!({"Id": "003B", "Email": null, "HasOptedOutOfEmail": false}),
        ),
        (
            SfObject::Contact,
            json!({"Id": "", "Email": "e@x.com", "HasOptedOutOfEmail": false}),
        ),
    ];
    let mut parsed = 0;
    for (object, row) in rows {
        let typed = plan::parse_row(object, serde_json::from_value(row.clone())?);
        assert_eq!(typed, parse_record(object, &row), "{row}");
        parsed += usize::from(typed.is_some());
    }
    assert_eq!(parsed, 3);
    Ok(())
}

#[test]
fn contact_queries_leave_person_contacts_to_their_account() {
    let emails = ["a@x.com".to_owned()];
    let with = read_queries(SfObject::Contact, &emails, true);
    assert!(
        with.iter().all(|soql| soql
            .starts_with("SELECT Id, Email, HasOptedOutOfEmail FROM Contact WHERE Email IN (")
            && soql.ends_with(" AND IsPersonAccount = false")),
        "{with:?}"
    );
    let without = read_queries(SfObject::Contact, &emails, false);
    assert!(
        without.iter().all(|soql| !soql.contains("IsPersonAccount")),
        "{without:?}"
    );
    let accounts = read_queries(SfObject::PersonAccount, &emails, true);
    assert!(accounts.iter().all(|soql| soql.starts_with(
        "SELECT Id, PersonEmail, PersonHasOptedOutOfEmail FROM Account WHERE IsPersonAccount = true AND PersonEmail IN ("
    )), "{accounts:?}");
}

#[test]
fn read_queries_cover_every_email_once_and_fit_the_url_limit() {
    let emails: Vec<String> = (0..1200)
        .map(|index| format!("o'brien+{index}.someone-with-a-long-name@sub.example-domain.com"))
        .collect();
    for object in SfObject::ALL {
        let queries = read_queries(object, &emails, true);
        assert!(queries.len() > 1, "1200 addresses need several statements");
        for soql in &queries {
            assert!(
                soql.len() <= MAX_SOQL_LEN,
                "statement of {} characters",
                soql.len()
            );
            let encoded: String = url::form_urlencoded::byte_serialize(soql.as_bytes()).collect();
            let uri = format!("/services/data/v59.0/query?q={encoded}");
            assert!(uri.len() < 16_384, "uri of {} bytes", uri.len());
        }
        for email in &emails {
            let quoted = optout_salesforce::soql::quote(email);
            let hits = queries.iter().filter(|soql| soql.contains(&quoted)).count();
            assert_eq!(hits, 1, "{email} appears in {hits} statements");
        }
    }
}

#[test]
fn targets_packed_as_they_come_make_the_fewest_reads_each_naming_its_own_targets() {
    // Pushed one at a time, in reverse order: a read sorts its targets for `Read::diff`.
    let targets: Vec<Arc<Target>> = (0..3000)
        .rev()
        .map(|index| {
            Arc::new(Target {
                email: format!("person{index:05}.o'brien@example.com").into(),
                opted_out: true,
                rule: "rule".into(),
                version: 1,
                evidence_id: 0,
                opted_out_at: None,
                // Every other email came with a message's trace.
                trace_id: (index % 2 == 0).then(|| Arc::from(format!("trace{index:05}"))),
            })
        })
        .collect();
    let objects = [SfObject::Contact, SfObject::Lead];
    let mut packers = objects.map(|object| ReadPacker::new(object, false));
    let mut reads = Vec::new();
    let mut most_held = [0; 2];
    for target in &targets {
        for (packer, most) in packers.iter_mut().zip(&mut most_held) {
            reads.extend(packer.push(target));
            *most = (*most).max(packer.pending());
        }
    }
    for packer in &mut packers {
        reads.extend(packer.finish());
        assert_eq!(packer.pending(), 0);
        assert!(
            packer.finish().is_none(),
            "a packer hands each read out once"
        );
    }
    let emails: Vec<String> = targets
        .iter()
        .map(|target| target.email.to_string())
        .collect();
    for (object, most_held) in objects.into_iter().zip(most_held) {
        let of_object: Vec<&Read> = reads.iter().filter(|read| read.object == object).collect();
        let at_once = read_queries(object, &emails, false);
        assert!(at_once.len() > 2, "3000 addresses need several statements");
        // As full as packing every email at once: the same statements.
        assert_eq!(
            of_object
                .iter()
                .map(|read| read.soql.as_str())
                .collect::<Vec<_>>(),
            at_once
        );
        for read in &of_object {
            let mut named = optout_salesforce::soql::literals(&read.soql).expect("lexes");
            named.sort();
            let held: Vec<&str> = read.targets.iter().map(|target| &*target.email).collect();
            assert_eq!(
                named, held,
                "a read holds exactly the targets it names, sorted"
            );
            // Every record of a read's emails is compared with its own target.
            let records: Vec<CurrentRecord> = held
                .iter()
                .enumerate()
                .map(|(index, email)| record(object, &format!("003{index:05}"), email, false))
                .collect();
            let changes = read.diff(&records);
            assert_eq!(changes.len(), records.len());
            for change in &changes {
                let target = read
                    .targets
                    .iter()
                    .find(|target| target.email == change.email)
                    .expect("the change's target");
                assert_eq!(change.trace_id, target.trace_id, "{}", change.email);
            }
            assert!(
                read.diff(&[record(object, "003X", "someone@else.com", false)])
                    .is_empty()
            );
        }
        // Held between reads: never more than one statement's worth per object.
        let largest = of_object.iter().map(|read| read.targets.len()).max();
        assert!(
            Some(most_held) <= largest,
            "held {most_held}, largest read {largest:?}"
        );
    }
}

#[test]
fn poll_query_reads_unchecked_records_since_the_watermark_minus_one_second() {
    let watermark = Utc
        .with_ymd_and_hms(2024, 5, 1, 10, 0, 0)
        .single()
        .expect("valid time");
    assert_eq!(
        poll_query(SfObject::Contact, Some(watermark), false),
        "SELECT Id, Email, HasOptedOutOfEmail, SystemModstamp FROM Contact WHERE SystemModstamp > 2024-05-01T09:59:59Z \
         AND HasOptedOutOfEmail = false ORDER BY SystemModstamp"
    );
    assert_eq!(
        poll_query(SfObject::PersonAccount, Some(watermark), true),
        "SELECT Id, PersonEmail, PersonHasOptedOutOfEmail, SystemModstamp FROM Account WHERE IsPersonAccount = true \
         AND SystemModstamp > 2024-05-01T09:59:59Z AND PersonHasOptedOutOfEmail = false ORDER BY SystemModstamp"
    );
    assert!(!poll_query(SfObject::Contact, None, false).contains("SystemModstamp >"));
}

#[test]
fn parses_salesforce_datetimes() {
    let expected = Utc
        .with_ymd_and_hms(2024, 5, 1, 10, 0, 0)
        .single()
        .expect("valid time");
    assert_eq!(
        plan::parse_sf_datetime("2024-05-01T10:00:00.000+0000"),
        Some(expected)
    );
    assert_eq!(
        plan::parse_sf_datetime("2024-05-01T12:00:00.000+0200"),
        Some(expected)
    );
    assert_eq!(
        plan::parse_sf_datetime("2024-05-01T10:00:00Z"),
        Some(expected)
    );
    assert_eq!(plan::parse_sf_datetime("yesterday"), None);
}

#[test]
fn a_bulk_csv_is_written_into_the_room_made_for_its_rows() {
    let rows = 1_000;
    let mut csv = plan::bulk_csv_header(SfObject::Contact, rows);
    let start = csv.as_ptr();
    for index in 0..rows {
        // 18-character ids, the longest Salesforce gives, and the longer of the two values.
        plan::push_bulk_row(&mut csv, &format!("003{index:015}"), false);
    }
    assert_eq!(csv.lines().count(), rows + 1);
    assert!(
        csv.ends_with("003000000000000999,false\n"),
        "{}",
        &csv[csv.len() - 40..]
    );
    // Never reallocated: no copy of the CSV, no doubling past what it needs.
    assert_eq!(csv.as_ptr(), start);
    assert_eq!(csv.capacity(), csv.len());
}

#[test]
fn bulk_csv_and_errors_use_the_object_field() {
    let change = Change {
        object: SfObject::PersonAccount,
        id: "001A".to_owned(),
        email: "a@x.com".into(),
        old: false,
        new: true,
        reason: "r".into(),
        version: 1,
        opted_out_at: None,
        trace_id: None,
    };
    assert_eq!(
        plan::bulk_csv(SfObject::PersonAccount, &[&change]),
        "Id,PersonHasOptedOutOfEmail\n001A,true\n"
    );
    assert_eq!(
        plan::parse_bulk_error(
            "UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record:--"
        ),
        (
            "UNABLE_TO_LOCK_ROW".to_owned(),
            "unable to obtain exclusive access to this record".to_owned()
        )
    );
    assert!(plan::is_retryable_status("UNABLE_TO_LOCK_ROW"));
    assert!(!plan::is_retryable_status(
        "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    ));
}

#[test]
fn objects_parse_from_configuration_names() {
    assert_eq!("contact".parse::<SfObject>(), Ok(SfObject::Contact));
    assert_eq!(
        " PersonAccount".parse::<SfObject>(),
        Ok(SfObject::PersonAccount)
    );
    assert!("Opportunity".parse::<SfObject>().is_err());
}

#[test]
fn trace_ids_come_from_traceparent() {
    assert_eq!(
        plan::trace_id_from_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
    );
    assert_eq!(plan::trace_id_from_traceparent("garbage"), None);
}
