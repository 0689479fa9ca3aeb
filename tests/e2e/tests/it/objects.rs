//! Objects switched off in the writer's configuration are never written.

use anyhow::Result;
use optout_e2e::{Stack, StackConfig};

use crate::support::{Records, email, expect_record, person, unsubscribe_everywhere};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_switched_off_is_never_written() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        extra_env: vec![("OPTOUT_OBJECTS".to_owned(), "Contact".to_owned())],
        ..StackConfig::default()
    })
    .await?;
    let someone = person(
        &stack,
        &email("contacts-only"),
        &Records {
            contacts: vec![false],
            leads: vec![false],
            ..Records::default()
        },
    )
    .await?;
    stack.sync_and_wait().await?;
    unsubscribe_everywhere(&stack, &someone.email).await?;
    stack.sync_and_wait().await?;
    let (_, contact_id) = &someone.records[0];
    let (_, lead_id) = &someone.records[1];
    expect_record(
        &stack,
        &someone.email,
        contact_id,
        true,
        "Contacts are in scope and get checked",
    )
    .await?;
    expect_record(
        &stack,
        &someone.email,
        lead_id,
        false,
        "Leads are switched off (OPTOUT_OBJECTS=Contact): never written",
    )
    .await?;
    stack.shutdown().await
}
