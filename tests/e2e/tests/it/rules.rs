//! The rule, end to end: people spread over three audiences, their Salesforce records, and
//! what each sync does to Email Opt Out.

use anyhow::{Result, ensure};
use optout_e2e::{Stack, StackConfig};

use crate::support::{
    Records, call_diff, email, expect_opt_out, expect_record, is_write_call, person,
    unsubscribe_everywhere, unsubscribe_in,
};

/// Opt-outs, mixes that change nothing, case-insensitive matching, converted Leads, Person
/// Accounts, the first sync, and a second sync without Mailchimp changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_outs_reach_salesforce_and_mixes_change_nothing() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        person_accounts: true,
        ..StackConfig::default()
    })
    .await?;

    let everywhere = person(
        &stack,
        &email("everywhere"),
        &Records {
            contacts: vec![false, false],
            leads: vec![false],
            ..Records::default()
        },
    )
    .await?;
    let two_and_subscribed = person(
        &stack,
        &email("two-and-subscribed"),
        &Records {
            contacts: vec![false],
            leads: vec![true],
            ..Records::default()
        },
    )
    .await?;
    let two_and_cleaned =
        person(&stack, &email("two-and-cleaned"), &Records::contact(false)).await?;
    let checked_before_first_sync =
        person(&stack, &email("checked-before"), &Records::contact(true)).await?;
    let subscribed_unchecked =
        person(&stack, &email("subscribed"), &Records::contact(false)).await?;
    let converted = person(
        &stack,
        &email("converted"),
        &Records {
            leads: vec![false],
            ..Records::default()
        },
    )
    .await?;
    let converted_lead_id = converted.records[0].1.clone();
    stack.convert_lead(&converted_lead_id).await?;
    let person_account = person(
        &stack,
        &email("person-account"),
        &Records {
            person_accounts: vec![false],
            ..Records::default()
        },
    )
    .await?;
    // Mailchimp holds the address in mixed case, Salesforce in other cases.
    let mixed_case = format!(
        "Case.Mixed.{:06x}@E2E.Example.COM",
        fastrand::u32(..0x00ff_ffff)
    );
    for audience in stack.audiences() {
        stack.add_subscriber(audience, &mixed_case).await?;
    }
    let lower_case = mixed_case.to_lowercase();
    stack.create_contact(&lower_case, false).await?;
    stack.create_lead(&mixed_case.to_uppercase(), false).await?;

    let first = stack.sync_and_wait().await?;
    expect_opt_out(
        &stack,
        &checked_before_first_sync.email,
        true,
        "the first sync unchecks nothing",
    )
    .await?;
    expect_opt_out(
        &stack,
        &subscribed_unchecked.email,
        false,
        "subscribed everywhere stays unchecked",
    )
    .await?;
    expect_record(
        &stack,
        &two_and_subscribed.email,
        &two_and_subscribed.records[1].1,
        true,
        "the first sync unchecks nothing",
    )
    .await?;
    ensure!(
        first.write_failures == 0,
        "first sync had write failures: {first}"
    );

    unsubscribe_everywhere(&stack, &everywhere.email).await?;
    unsubscribe_in(&stack, &two_and_subscribed.email, &[0, 1]).await?;
    unsubscribe_in(&stack, &two_and_cleaned.email, &[0, 1]).await?;
    stack
        .bounce(&stack.audiences()[2], &two_and_cleaned.email)
        .await?;
    unsubscribe_everywhere(&stack, &converted.email).await?;
    unsubscribe_everywhere(&stack, &person_account.email).await?;
    unsubscribe_everywhere(&stack, &mixed_case).await?;

    let second = stack.sync_and_wait().await?;
    expect_opt_out(
        &stack,
        &everywhere.email,
        true,
        "unsubscribed everywhere: every Contact and Lead is checked",
    )
    .await?;
    expect_record(
        &stack,
        &two_and_subscribed.email,
        &two_and_subscribed.records[0].1,
        false,
        "unsubscribed in two, subscribed in one: unchanged",
    )
    .await?;
    expect_record(
        &stack,
        &two_and_subscribed.email,
        &two_and_subscribed.records[1].1,
        true,
        "unsubscribed in two, subscribed in one: unchanged",
    )
    .await?;
    expect_opt_out(
        &stack,
        &two_and_cleaned.email,
        false,
        "unsubscribed in two, cleaned in one: unchanged",
    )
    .await?;
    expect_opt_out(
        &stack,
        &checked_before_first_sync.email,
        true,
        "a checked box stays checked",
    )
    .await?;
    expect_record(
        &stack,
        &converted.email,
        &converted_lead_id,
        false,
        "a converted Lead is skipped",
    )
    .await?;
    expect_opt_out(
        &stack,
        &converted.email,
        true,
        "the Contact of a converted Lead is checked",
    )
    .await?;
    ensure!(
        second.write_failures == 0,
        "a converted Lead must be skipped without an error, but the sync had write failures: {second}"
    );
    ensure!(
        second.total_dead_letters() == 0,
        "no dead letters expected: {second}"
    );
    expect_opt_out(
        &stack,
        &person_account.email,
        true,
        "a Person Account is updated where enabled",
    )
    .await?;
    expect_opt_out(
        &stack,
        &lower_case,
        true,
        "addresses differing only in case match",
    )
    .await?;

    // Nothing changed in Mailchimp: the next sync must not write to Salesforce at all.
    let before = stack.salesforce_calls().await?;
    let third = stack.sync_and_wait().await?;
    let after = stack.salesforce_calls().await?;
    let writes: Vec<_> = call_diff(&before, &after)
        .into_iter()
        .filter(|(label, _)| is_write_call(label))
        .collect();
    ensure!(
        writes.is_empty(),
        "a sync without Mailchimp changes wrote to Salesforce: {writes:?}"
    );
    ensure!(
        third.total_written() == 0,
        "a sync without Mailchimp changes reported writes: {third}"
    );

    stack.shutdown().await
}

/// Opt-ins are edge-triggered and opt-outs level-triggered: a resubscribe unchecks, a manual
/// uncheck is undone while still unsubscribed, a manual check while subscribed is never undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_uncheck_and_manual_edits_follow_the_asymmetry() -> Result<()> {
    let mut stack = Stack::start(StackConfig::default()).await?;
    let resubscribed = person(
        &stack,
        &email("resubscribed"),
        &Records {
            contacts: vec![false],
            leads: vec![false],
            ..Records::default()
        },
    )
    .await?;
    let drifted = person(&stack, &email("drifted"), &Records::contact(false)).await?;
    let checked_by_hand =
        person(&stack, &email("checked-by-hand"), &Records::contact(false)).await?;
    stack.sync_and_wait().await?;

    unsubscribe_everywhere(&stack, &resubscribed.email).await?;
    unsubscribe_everywhere(&stack, &drifted.email).await?;
    let (object, id) = &checked_by_hand.records[0];
    stack
        .edit_record(
            object,
            id,
            serde_json::json!({ "HasOptedOutOfEmail": true }),
        )
        .await?;
    stack.sync_and_wait().await?;
    expect_opt_out(
        &stack,
        &resubscribed.email,
        true,
        "unsubscribed everywhere is checked",
    )
    .await?;
    expect_opt_out(
        &stack,
        &drifted.email,
        true,
        "unsubscribed everywhere is checked",
    )
    .await?;
    expect_opt_out(
        &stack,
        &checked_by_hand.email,
        true,
        "checked by hand while subscribed stays checked",
    )
    .await?;

    stack
        .resubscribe(&stack.audiences()[1], &resubscribed.email)
        .await?;
    let (object, id) = &drifted.records[0];
    stack
        .edit_record(
            object,
            id,
            serde_json::json!({ "HasOptedOutOfEmail": false }),
        )
        .await?;
    stack.sync_and_wait().await?;
    expect_opt_out(
        &stack,
        &resubscribed.email,
        false,
        "set back to subscribed after unsubscribed everywhere: unchecked",
    )
    .await?;
    expect_opt_out(
        &stack,
        &drifted.email,
        true,
        "unchecked by hand while still unsubscribed: checked again",
    )
    .await?;
    expect_opt_out(
        &stack,
        &checked_by_hand.email,
        true,
        "checked by hand while subscribed: never unchecked",
    )
    .await?;

    // A full reconcile revisits everyone and still must not undo the manual check.
    stack
        .sync_with(&optout_cli::sync::SyncOptions {
            full: true,
            timeout: std::time::Duration::from_secs(180),
            ..optout_cli::sync::SyncOptions::default()
        })
        .await?;
    expect_opt_out(
        &stack,
        &checked_by_hand.email,
        true,
        "checked by hand while subscribed: never unchecked, even by a full sync",
    )
    .await?;
    expect_opt_out(
        &stack,
        &resubscribed.email,
        false,
        "a full sync does not re-check a resubscribed person",
    )
    .await?;
    expect_opt_out(
        &stack,
        &drifted.email,
        true,
        "a full sync keeps the opt-out",
    )
    .await?;

    stack.shutdown().await
}
