//! A message nobody can parse goes to its dead-letter queue with the reason, and the pipeline
//! goes on.

use std::time::Duration;

use anyhow::{Result, ensure};
use optout_e2e::{Stack, StackConfig, eventually};

use crate::support::{Records, email, expect_opt_out, person, unsubscribe_everywhere};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_lands_in_its_dead_letter_queue_with_the_reason() -> Result<()> {
    let mut stack = Stack::start(StackConfig::default()).await?;
    let someone = person(&stack, &email("after-garbage"), &Records::contact(false)).await?;
    stack.sync_and_wait().await?;

    // Not protobuf: a field tag with a truncated length-delimited value.
    stack
        .publish_raw("members.changed", b"\x0a\xff\xff\xff\xff\x0fgarbage")
        .await?;
    let dead_letter_queue = stack
        .topology()
        .dead_letter_queue(&stack.topology().members_changed_queue());
    eventually(
        Duration::from_secs(30),
        "the garbage message reaching the dead-letter queue",
        || async {
            let depths = stack.queue_depths().await?;
            let depth = depths.get(&dead_letter_queue).copied().unwrap_or(0);
            Ok(if depth >= 1 {
                Ok(())
            } else {
                Err(format!(
                    "{dead_letter_queue} has {depth} messages: {depths:?}"
                ))
            })
        },
    )
    .await?;
    let (body, headers) = stack
        .get_message(&dead_letter_queue)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the dead-letter queue emptied itself"))?;
    ensure!(
        body.ends_with(b"garbage"),
        "the dead letter is not the message published: {body:?}"
    );
    let reason = headers
        .get(optout_amqp::REASON_HEADER)
        .cloned()
        .unwrap_or_default();
    ensure!(
        !reason.is_empty(),
        "the dead letter carries no {} header: {headers:?}",
        optout_amqp::REASON_HEADER
    );

    // The pipeline goes on.
    unsubscribe_everywhere(&stack, &someone.email).await?;
    let summary = stack.sync_and_wait().await?;
    expect_opt_out(
        &stack,
        &someone.email,
        true,
        "the pipeline goes on after a malformed message",
    )
    .await?;
    ensure!(
        summary.total_dead_letters() == 0,
        "only the garbage message (now taken) was to be dead-lettered: {summary}"
    );
    stack.shutdown().await
}
