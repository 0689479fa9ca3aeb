//! Salesforce writes go out in collections of up to 200 records and reads are batched.

use anyhow::{Result, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use optout_e2e::{Stack, StackConfig};

use crate::support::{call_diff, is_write_call};

const PEOPLE: usize = 450;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_out_in_collections_of_200_and_reads_are_batched() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        audiences: 1,
        members: 20,
        ..StackConfig::default()
    })
    .await?;
    let audience = stack.audiences()[0].clone();
    let emails: Vec<String> = (0..PEOPLE)
        .map(|index| format!("batch{index:04}.{:x}@e2e.example.com", fastrand::u32(..)))
        .collect();
    futures::stream::iter(emails.iter())
        .map(|address| {
            let stack = &stack;
            let audience = &audience;
            async move {
                stack.add_subscriber(audience, address).await?;
                stack.create_contact(address, false).await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    stack.sync_and_wait().await?;

    futures::stream::iter(emails.iter())
        .map(|address| stack.unsubscribe(&audience, address))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    let before = stack.salesforce_calls().await?;
    let summary = stack.sync_and_wait().await?;
    let calls = call_diff(&before, &stack.salesforce_calls().await?);

    // The generated people of the audience may add a few writes of their own.
    let written = summary.written.get("Contact").copied().unwrap_or(0);
    ensure!(
        written >= PEOPLE as i64,
        "expected at least {PEOPLE} Contacts written, the writer reports {written}: {summary}"
    );
    let written = usize::try_from(written)?;
    let write_calls: u64 = calls
        .iter()
        .filter(|(label, _)| is_write_call(label))
        .map(|(_, count)| count)
        .sum();
    let reads: u64 = calls
        .iter()
        .filter(|(label, _)| label.contains("/query"))
        .map(|(_, count)| count)
        .sum();
    // One collection per 200 records, plus a few for the partitions the work is spread over.
    let write_ceiling = written.div_ceil(200) as u64 + 5;
    ensure!(
        write_calls <= write_ceiling,
        "{write_calls} write calls for {written} records (at most {write_ceiling}): {calls:?}"
    );
    // Reads: SOQL `Email IN (...)` chunks per object (Contact, Lead, Account) plus the poll cycle.
    let read_ceiling = 3 * (written.div_ceil(100) as u64 + 4);
    ensure!(
        reads <= read_ceiling,
        "{reads} query calls for {written} emails (at most {read_ceiling}): {calls:?}"
    );
    stack.shutdown().await
}
