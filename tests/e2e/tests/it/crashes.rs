//! SIGKILL each service in the middle of a sync, start it again: the same final state, and
//! nothing left in (or lost from) the queues.

use std::time::Duration;

use anyhow::{Result, ensure};
use optout_e2e::{Role, Stack, StackConfig, eventually};
use serde_json::json;

use crate::support::{Action, Model, create_people};

const PEOPLE: usize = 240;

/// The counter that shows `role` has started on this sync's work.
fn progress_counter(role: Role) -> &'static str {
    match role {
        Role::Fetcher => "pages_published",
        Role::Evaluator => "messages_processed",
        Role::Writer => "written_contact",
    }
}

async fn counter(stack: &Stack, role: Role) -> Result<i64> {
    let fleet = stack.fleet().await?;
    let snapshot = optout_cli::sync::snapshot(&fleet).await?;
    Ok(snapshot.counter(role, progress_counter(role)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_service_mid_sync_ends_in_the_same_state() -> Result<()> {
    // Small pages and batches so a sync takes long enough to be interrupted.
    let mut stack = Stack::start(StackConfig {
        extra_env: vec![
            ("OPTOUT_PAGE_SIZE".to_owned(), "20".to_owned()),
            ("OPTOUT_BATCH_SIZE".to_owned(), "10".to_owned()),
        ],
        ..StackConfig::default()
    })
    .await?;
    let emails: Vec<String> = (0..PEOPLE)
        .map(|index| format!("crash{index:04}.{:x}@e2e.example.com", fastrand::u32(..)))
        .collect();
    create_people(&stack, &emails).await?;
    let mut model = Model::new(&emails, stack.audiences().len());
    stack.sync_and_wait().await?;
    model.synced();

    let audiences = stack.audiences().len();
    for (round, role) in [Role::Fetcher, Role::Evaluator, Role::Writer]
        .into_iter()
        .enumerate()
    {
        // A third of the people opt out everywhere; people opted out before come back in one audience.
        let mut actions = Vec::new();
        for person in (0..PEOPLE).filter(|person| person % 3 == round) {
            for audience in 0..audiences {
                actions.push((person, audience, Action::Unsubscribe));
            }
        }
        if round > 0 {
            for person in (0..PEOPLE).filter(|person| person % 3 == round - 1 && person % 2 == 0) {
                actions.push((person, round % audiences, Action::Resubscribe));
            }
        }
        model.apply(&stack, &actions).await?;

        stack
            .set_faults(
                json!({ "mailchimp": { "latency_ms": 150 }, "salesforce": { "latency_ms": 150 } }),
            )
            .await?;
        let before = counter(&stack, role).await?;
        stack.trigger_sync().await?;
        eventually(
            Duration::from_secs(60),
            &format!("{role} starting on the sync"),
            || async {
                let now = counter(&stack, role).await?;
                Ok(if now > before {
                    Ok(())
                } else {
                    Err(format!("{} still {now}", progress_counter(role)))
                })
            },
        )
        .await?;
        let fleet = stack.fleet().await?;
        let snapshot = optout_cli::sync::snapshot(&fleet).await?;
        let in_the_middle = snapshot.busy_reasons();
        stack.kill(role, 0).await?;
        eprintln!(
            "killed the {role} while: {}",
            in_the_middle.as_deref().unwrap_or("idle")
        );
        ensure!(
            in_the_middle.is_some(),
            "the sync was over before the {role} could be killed"
        );
        stack.set_faults(json!({})).await?;
        stack.restart(role, 0).await?;

        let summary = stack.sync_and_wait().await?;
        model.synced();
        model
            .verify(&stack)
            .await
            .map_err(|error| error.context(format!("after killing the {role}")))?;
        let depths = stack.queue_depths().await?;
        ensure!(
            depths.values().all(|depth| *depth == 0),
            "after killing the {role}: queues not empty: {depths:?} ({summary})"
        );
    }
    stack.shutdown().await
}
