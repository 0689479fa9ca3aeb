//! Two evaluators and two writers, randomized status changes interleaved with syncs: every
//! Salesforce record ends as the rule (with opt-in evidence) says.

use anyhow::{Result, ensure};
use optout_e2e::{Stack, StackConfig};

use crate::support::{Model, create_people, random_actions};

const PEOPLE: usize = 500;
/// Status changes the run must reach (refused and no-op actions do not count).
const CHANGES: usize = 2_000;
/// Rounds of random actions, each followed by a sync, until `CHANGES` are reached.
const MAX_ROUNDS: usize = 12;
const ACTIONS_PER_ROUND: usize = 420;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_on_the_rule_under_randomized_changes() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        members: 30,
        evaluators: 2,
        writers: 2,
        ..StackConfig::default()
    })
    .await?;
    let emails: Vec<String> = (0..PEOPLE)
        .map(|index| format!("random{index:04}.{:x}@e2e.example.com", fastrand::u32(..)))
        .collect();
    create_people(&stack, &emails).await?;
    let mut model = Model::new(&emails, stack.audiences().len());
    stack.sync_and_wait().await?;
    model.synced();

    let mut rng = fastrand::Rng::with_seed(20_241_126);
    let mut applied = 0;
    let mut rounds = 0;
    while applied < CHANGES && rounds < MAX_ROUNDS {
        rounds += 1;
        let actions = random_actions(
            &mut rng,
            model.len(),
            stack.audiences().len(),
            ACTIONS_PER_ROUND,
        );
        // Only actions that changed a member's status count: an unsubscribe of an unsubscribed
        // member, or a resubscribe Mailchimp refuses, changes nothing.
        applied += model.apply(&stack, &actions).await?;
        let summary = stack.sync_and_wait().await?;
        ensure!(
            summary.total_dead_letters() == 0,
            "dead letters during the randomized run: {summary}"
        );
        model.synced();
    }
    ensure!(
        applied >= CHANGES,
        "only {applied} status changes in {rounds} rounds"
    );
    model.verify(&stack).await?;
    let depths = stack.queue_depths().await?;
    ensure!(
        depths.values().all(|depth| *depth == 0),
        "queues not empty at the end: {depths:?}"
    );
    stack.shutdown().await
}
