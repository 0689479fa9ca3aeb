//! Operating the pipeline under load: pausing and resuming it, and replaying what was
//! dead-lettered during a Salesforce outage. Both end with the Salesforce state the rule asks for.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use optout_cli::admin::Role;
use optout_e2e::{Stack, StackConfig, eventually};
use serde_json::Value;

use crate::support::{
    Records, email, expect_opt_out, person, unsubscribe_everywhere, writable_records,
};

/// Records Salesforce reports changed through its API, in total.
async fn records_written(stack: &Stack) -> Result<u64> {
    Ok(stack
        .stats()
        .await?
        .pointer("/records_written/salesforce")
        .and_then(Value::as_u64)
        .unwrap_or(0))
}

/// People subscribed everywhere with one unchecked Contact each, synced once.
async fn people(stack: &mut Stack, label: &str, count: usize) -> Result<Vec<String>> {
    let mut emails = Vec::with_capacity(count);
    for _ in 0..count {
        let person = person(stack, &email(label), &Records::contact(false)).await?;
        emails.push(person.email);
    }
    stack.sync_and_wait().await?;
    Ok(emails)
}

async fn dead_letters_in_persons_dirty(stack: &Stack) -> Result<u64> {
    Ok(stack
        .queue_depths()
        .await?
        .iter()
        .filter(|(name, _)| name.contains("persons.dirty.") && name.ends_with(".dlq"))
        .map(|(_, depth)| depth)
        .sum())
}

/// Sum of the depths of the queues whose name contains `part`.
async fn queued(stack: &Stack, part: &str) -> Result<u64> {
    Ok(stack
        .queue_depths()
        .await?
        .iter()
        .filter(|(name, _)| name.contains(part) && !name.ends_with(".dlq"))
        .map(|(_, depth)| depth)
        .sum())
}

/// Waits until `part`'s queues hold messages, then checks for two seconds that they stay and
/// that nothing reaches Salesforce: a paused consumer takes nothing.
async fn held(stack: &Stack, part: &str, written: u64) -> Result<()> {
    eventually(
        Duration::from_secs(60),
        &format!("messages queued in {part}"),
        || async {
            let depth = queued(stack, part).await?;
            Ok(if depth > 0 {
                Ok(())
            } else {
                Err("empty".to_owned())
            })
        },
    )
    .await?;
    let depth = queued(stack, part).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        queued(stack, part).await? >= depth,
        "a paused consumer took messages from {part}"
    );
    ensure!(
        records_written(stack).await? == written,
        "Salesforce was written while {part} was held"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_and_resuming_under_load_loses_and_repeats_nothing() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        members: 3_000,
        ..StackConfig::default()
    })
    .await?;
    let emails = people(&mut stack, "paused", 240).await?;
    let written_before = records_written(&stack).await?;
    for address in &emails {
        unsubscribe_everywhere(&stack, address).await?;
    }
    let fleet = stack.fleet().await?;
    let evaluator = fleet.first(Role::Evaluator).context("an evaluator")?;
    let writer = fleet.first(Role::Writer).context("a writer")?;
    ensure!(evaluator.pause().await? && writer.pause().await?, "paused");
    ensure!(
        writer.get_status().await?.paused,
        "the writer reports itself paused"
    );

    // A sync runs while both are paused: its pages wait in members.changed.
    stack.trigger_fetcher().await?;
    held(&stack, "members.changed", written_before).await?;
    // The evaluator resumes: its decisions wait in persons.dirty for the paused writer.
    ensure!(!evaluator.resume().await?, "evaluator resumed");
    held(&stack, "persons.dirty", written_before).await?;
    ensure!(!writer.resume().await?, "writer resumed");

    stack.wait_idle(Duration::from_secs(180)).await?;
    for address in &emails {
        expect_opt_out(&stack, address, true, "after the pause and resume").await?;
    }
    // One Contact each, each written exactly once.
    let written = records_written(&stack).await? - written_before;
    ensure!(
        written == emails.len() as u64,
        "{written} writes for {} records",
        emails.len()
    );
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_from_an_outage_are_replayed_into_the_right_state() -> Result<()> {
    let mut stack = Stack::start(StackConfig::default()).await?;
    let emails = people(&mut stack, "outage", 12).await?;

    // The daily API budget is spent: every call is refused with REQUEST_LIMIT_EXCEEDED, so the
    // writer requeues until the delivery limit sends the messages to their dead-letter queues.
    stack.set_salesforce_api_usage(15_000, 15_000).await?;
    for address in &emails {
        unsubscribe_everywhere(&stack, address).await?;
    }
    stack.trigger_sync().await?;
    eventually(
        Duration::from_secs(120),
        "persons.dirty dead letters",
        || async {
            let dead = dead_letters_in_persons_dirty(&stack).await?;
            Ok(if dead > 0 {
                Ok(())
            } else {
                Err("none yet".to_owned())
            })
        },
    )
    .await?;
    stack.wait_idle(Duration::from_secs(120)).await?;
    for address in &emails {
        let records = writable_records(&stack, address).await?;
        ensure!(
            records
                .iter()
                .all(|record| optout_e2e::opted_out(record) == Some(false)),
            "written during the outage: {records:?}"
        );
    }

    // The budget resets; an operator replays the dead letters with optoutctl.
    stack.set_salesforce_api_usage(0, 15_000).await?;
    let mut listed = stack
        .spawn_optoutctl(&["dlq", "list", "--service", "writer", "--json"])
        .await?;
    let listing = listed.announcement().to_string();
    ensure!(listed.wait().await?.success(), "dlq list failed");
    ensure!(
        listing.contains("persons.dirty"),
        "the listing shows the writer's dead letters: {listing}"
    );
    let mut replay = stack
        .spawn_optoutctl(&["dlq", "replay", "--service", "writer", "--all", "--json"])
        .await?;
    let replayed = replay.announcement().clone();
    ensure!(
        replay.wait().await?.success(),
        "dlq replay failed: {replayed}"
    );
    ensure!(
        replayed.to_string().contains("replayed"),
        "the replay reports a count: {replayed}"
    );
    stack.wait_idle(Duration::from_secs(120)).await?;
    for address in &emails {
        expect_opt_out(&stack, address, true, "after the replay").await?;
    }
    ensure!(
        dead_letters_in_persons_dirty(&stack).await? == 0,
        "the dead-letter queues are empty after the replay"
    );
    stack.shutdown().await
}
