//! A real SIGTERM to a service while it holds work: it drains within its grace period and exits
//! 0, and after a restart nothing is lost (every person ends as the rule says) and nothing is
//! repeated (no Salesforce record written twice for one decision, no Mailchimp transition
//! recorded twice).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use optout_e2e::{Role, Stack, StackConfig, eventually};
use serde_json::{Value, json};

use crate::support::{Action, Model, create_people};

/// People created by the test, each subscribed in all three audiences (3,600 memberships).
const PEOPLE: usize = 1200;

/// Longer than any grace period: the service's own `--shutdown-grace-secs` (25 s) plus its exit
/// margin (5 s) ends a stuck drain with exit code 1 well before this.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// The counter that shows `role` has started on this sync's work.
fn progress_counter(role: Role) -> &'static str {
    match role {
        Role::Fetcher => "pages_published",
        Role::Evaluator => "messages_processed",
        Role::Writer => "written_contact",
    }
}

/// Records Salesforce reports created, changed or deleted through its API, in total.
async fn records_written(stack: &Stack) -> Result<u64> {
    let stats = stack.stats().await?;
    Ok(stats
        .pointer("/records_written/salesforce")
        .and_then(Value::as_u64)
        .unwrap_or(0))
}

/// SIGTERMs `role` while it holds deliveries in the middle of a sync, restarts it, and checks the
/// outcome against the rule, the sandbox's write count, the audit trail and the transitions.
async fn sigterm_mid_sync(role: Role) -> Result<()> {
    // Small pages so the sync is a stream of deliveries, slow enough to interrupt. A writer's
    // pass takes one batch per partition: batches of one message make the sync's dozen or more
    // `persons.dirty` messages several passes however fast they come, so one pass has applied
    // its work while the next one's deliveries are held. (Larger batches let a fast evaluator's
    // whole stream fill the first pass, which leaves no such moment.)
    let mut stack = Stack::start(StackConfig {
        extra_env: vec![
            ("OPTOUT_PAGE_SIZE".to_owned(), "100".to_owned()),
            ("OPTOUT_BATCH_SIZE".to_owned(), "1".to_owned()),
        ],
        ..StackConfig::default()
    })
    .await?;
    let emails: Vec<String> = (0..PEOPLE)
        .map(|index| format!("sigterm{index:04}.{:x}@e2e.example.com", fastrand::u32(..)))
        .collect();
    create_people(&stack, &emails).await?;
    let mut model = Model::new(&emails, stack.audiences().len());
    stack.sync_and_wait().await?;
    model.synced();

    // Two people in three opt out everywhere: each of their records (a Contact, and a Lead for
    // every fifth person) must be written exactly once.
    let opting_out: Vec<usize> = (0..PEOPLE).filter(|person| person % 3 != 0).collect();
    let actions: Vec<(usize, usize, Action)> = opting_out
        .iter()
        .flat_map(|person| {
            (0..stack.audiences().len())
                .map(move |audience| (*person, audience, Action::Unsubscribe))
        })
        .collect();
    model.apply(&stack, &actions).await?;
    let expected_writes =
        opting_out.len() + opting_out.iter().filter(|person| *person % 5 == 0).count();
    let written_before = records_written(&stack).await?;
    let calls_before = stack.salesforce_calls().await?;

    stack
        .set_faults(
            json!({ "mailchimp": { "latency_ms": 100 }, "salesforce": { "latency_ms": 300 } }),
        )
        .await?;
    let fleet = stack.fleet().await?;
    let service = fleet
        .first(role)
        .with_context(|| format!("no {role}"))?
        .clone();
    let counter = progress_counter(role);
    let before = service
        .get_status()
        .await?
        .counters
        .get(counter)
        .copied()
        .unwrap_or(0);
    stack.trigger_sync().await?;
    // Work already applied and deliveries still unacked: the moment a drain that redelivered
    // too much would write twice, and one that dropped deliveries would lose opt-outs.
    let (in_flight, progress) = eventually(
        Duration::from_secs(120),
        &format!("the {role} holding deliveries after starting on the sync"),
        || async {
            let status = service.get_status().await?;
            let progress = status.counters.get(counter).copied().unwrap_or(0);
            Ok(if progress > before && status.in_flight > 0 {
                Ok((status.in_flight, progress - before))
            } else {
                Err(format!(
                    "{counter} +{}, in flight {}",
                    progress - before,
                    status.in_flight
                ))
            })
        },
    )
    .await?;
    let signalled = Instant::now();
    let (exit, stderr_tail) = stack.terminate(role, 0, EXIT_WAIT).await?;
    let drain = signalled.elapsed();
    eprintln!(
        "SIGTERM to the {role} with {in_flight} deliveries in flight after {counter} +{progress}: \
         exited with {exit} after {drain:?}"
    );
    // Exit code 0 also means the drain ended within the grace period: past it the service exits 1.
    ensure!(
        exit.success(),
        "the {role} exited with {exit} after SIGTERM ({drain:?}):\n{stderr_tail}"
    );
    stack.set_faults(json!({})).await?;
    stack.restart(role, 0).await?;

    let summary = stack.sync_and_wait().await?;
    model.synced();
    model
        .verify(&stack)
        .await
        .map_err(|error| error.context(format!("after SIGTERM to the {role}")))?;
    let depths = stack.queue_depths().await?;
    ensure!(
        depths.values().all(|depth| *depth == 0),
        "after SIGTERM to the {role}: queues not empty: {depths:?} ({summary})"
    );

    let written = records_written(&stack).await? - written_before;
    let calls = crate::support::call_diff(&calls_before, &stack.salesforce_calls().await?);
    eprintln!(
        "records written after SIGTERM to the {role}: {written} (expected {expected_writes}); Salesforce calls {calls:?}"
    );
    expect_one_write_and_transition_each(&stack, &emails, &opting_out).await?;
    ensure!(
        written == expected_writes as u64,
        "after SIGTERM to the {role}: Salesforce took {written} record writes for {expected_writes} records to check"
    );
    stack.shutdown().await
}

/// Every record of every opted-out person has exactly one audit row (`false -> true`), and the
/// evaluator saw each member's unsubscribe exactly once.
async fn expect_one_write_and_transition_each(
    stack: &Stack,
    emails: &[String],
    opting_out: &[usize],
) -> Result<()> {
    let fleet = stack.fleet().await?;
    let evaluator = fleet.first(Role::Evaluator).context("no evaluator")?;
    let writer = fleet.first(Role::Writer).context("no writer")?;
    let audiences = stack.audiences();
    let problems: Vec<Option<String>> = futures::stream::iter(opting_out)
        .map(|person| async move {
            let email = emails[*person].to_lowercase();
            let (audit, explanation) =
                tokio::try_join!(writer.audit_trail(&email, 0), evaluator.explain(&email))?;
            let mut writes_per_record: BTreeMap<&str, usize> = BTreeMap::new();
            for entry in &audit {
                *writes_per_record
                    .entry(entry.record_id.as_str())
                    .or_default() += 1;
            }
            let expected_records = if person % 5 == 0 { 2 } else { 1 };
            let audit_ok = writes_per_record.len() == expected_records
                && writes_per_record.values().all(|count| *count == 1)
                && audit
                    .iter()
                    .all(|entry| !entry.old_value && entry.new_value);
            let transitions_ok = audiences.iter().all(|audience| {
                explanation
                    .transitions
                    .iter()
                    .filter(|transition| {
                        transition.audience_id == *audience
                            && transition.from_status == "subscribed"
                            && transition.to_status == "unsubscribed"
                    })
                    .count()
                    == 1
            });
            Ok::<_, anyhow::Error>((!(audit_ok && transitions_ok)).then(|| {
                format!(
                    "{email}: audit {:?}; transitions {:?}",
                    audit
                        .iter()
                        .map(|entry| format!(
                            "{} {} -> {} ({})",
                            entry.record_id, entry.old_value, entry.new_value, entry.trigger
                        ))
                        .collect::<Vec<_>>(),
                    explanation
                        .transitions
                        .iter()
                        .map(|transition| format!(
                            "{} {} -> {}",
                            transition.audience_id, transition.from_status, transition.to_status
                        ))
                        .collect::<Vec<_>>()
                )
            }))
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    let problems: Vec<String> = problems.into_iter().flatten().collect();
    ensure!(
        problems.is_empty(),
        "{} of {} opted-out people were written or seen other than once (first 5):\n  {}",
        problems.len(),
        opting_out.len(),
        problems
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_messages_in_flight_loses_and_repeats_nothing() -> Result<()> {
    sigterm_mid_sync(Role::Writer).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_evaluator_mid_evaluation_loses_and_repeats_nothing() -> Result<()> {
    sigterm_mid_sync(Role::Evaluator).await
}
