//! Fault injection. While a sync of many members runs and webhook traffic flows, at least 50
//! faults hit the system: SIGKILL and restart of each service, a RabbitMQ restart, a PostgreSQL
//! restart, 429 and 503 bursts from both APIs, `UNABLE_TO_LOCK_ROW` on a share of records,
//! Salesforce token expiry, and responses slower than the clients' timeouts. Services that exit
//! on their own (a lost broker connection) are started again, as Kubernetes would. Then, with the
//! faults cleared and a full sync run, the promises are checked:
//!
//! - every person unsubscribed in every audience at the end has every record checked (no opt-out
//!   lost);
//! - every box a person checked by hand is still checked (nothing undone without resubscribe
//!   evidence; those people never resubscribe);
//! - every person never unsubscribed everywhere during the run is still unchecked (no opt-out
//!   invented); the others, whose outcome depends on which transitions the system saw, have
//!   every record agreeing;
//! - the dead-letter queues hold exactly the messages that were bad on purpose.
//!
//! The stack runs on a RabbitMQ node and a PostgreSQL cluster of its own (see
//! `optout_e2e::servers`), so restarting them disturbs nothing else on the machine.
//!
//! Fixed seeds: `OPTOUT_FAULTS_SEED` replays a run. `OPTOUT_FAULTS_MEMBERS` (default 20,000; the
//! full run is 100,000) and `OPTOUT_FAULTS` (default 50) size it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use optout_cli::sync::SyncOptions;
use optout_e2e::servers::{PrivatePostgres, PrivateRabbit};
use optout_e2e::{Role, Stack, StackConfig, eventually, opted_out, record_label};
use optout_mailchimp::{MemberStatus, MembersQuery};
use serde_json::{Value, json};

use crate::support::{create_people, email, writable_records};

const PEOPLE: usize = 60;
/// The last of the people are left alone during the faults and unsubscribe everywhere after the
/// last one: their opt-outs show that every service works again once the faults stop.
const LATE: usize = 4;
const PINNED: usize = 6;
const AUDIENCES: usize = 2;
const BAD_MESSAGES: u64 = 3;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill(Role),
    RabbitRestart,
    PostgresRestart,
    MailchimpBurst(u16),
    SalesforceBurst(u16),
    LockRows,
    ExpireTokens,
    SlowMailchimp,
    SlowSalesforce,
}

/// Every kind at least once (the broker and database restarts exactly once: each takes seconds),
/// the rest drawn at random, in a seeded order, with the broker restart last.
fn schedule(rng: &mut fastrand::Rng, count: usize) -> Vec<Fault> {
    let light = [
        Fault::Kill(Role::Fetcher),
        Fault::Kill(Role::Evaluator),
        Fault::Kill(Role::Writer),
        Fault::MailchimpBurst(429),
        Fault::MailchimpBurst(503),
        Fault::SalesforceBurst(429),
        Fault::SalesforceBurst(503),
        Fault::LockRows,
        Fault::ExpireTokens,
        Fault::SlowMailchimp,
        Fault::SlowSalesforce,
    ];
    let mut faults = light.to_vec();
    faults.push(Fault::PostgresRestart);
    while faults.len() + 1 < count {
        faults.push(light[rng.usize(0..light.len())]);
    }
    rng.shuffle(&mut faults);
    // The broker restart comes last, so no later kill can restart a service that survived it
    // in a broken state: whatever it left must be repaired by the services themselves.
    faults.push(Fault::RabbitRestart);
    faults
}

/// What the test knows of its people's Mailchimp statuses.
#[derive(Debug)]
struct Tracker {
    emails: Vec<String>,
    /// `true` for subscribed, per person and audience; `None` for other non-unsubscribed states.
    statuses: Vec<Vec<Option<bool>>>,
    ever_opted_out: Vec<bool>,
}

impl Tracker {
    fn all_unsubscribed(&self, person: usize) -> bool {
        self.statuses[person]
            .iter()
            .all(|status| *status == Some(false))
    }

    /// A few member actions through the sandbox's control endpoints; each emits a webhook.
    async fn act(&mut self, stack: &Stack, rng: &mut fastrand::Rng, count: usize) {
        for _ in 0..count {
            let person = rng.usize(0..self.emails.len() - LATE);
            let audience = rng.usize(0..AUDIENCES);
            let action = match rng.u32(0..100) {
                0..55 => "unsubscribe",
                55..90 => "resubscribe",
                _ => "bounce",
            };
            self.apply(stack, person, audience, action).await;
        }
    }

    /// One member action; a refused transition (from cleaned, say) leaves the status as it was.
    async fn apply(&mut self, stack: &Stack, person: usize, audience: usize, action: &str) {
        let list = &stack.audiences()[audience];
        if let Ok(member) = stack
            .member_action(list, &self.emails[person], action)
            .await
        {
            self.statuses[person][audience] = match member.get("status").and_then(Value::as_str) {
                Some("subscribed") => Some(true),
                Some("unsubscribed") => Some(false),
                _ => None,
            };
            if self.all_unsubscribed(person) {
                self.ever_opted_out[person] = true;
            }
        }
    }
}

/// The stack's own broker and database, which the faults restart.
#[derive(Debug)]
struct Servers {
    rabbit: PrivateRabbit,
    postgres: PrivatePostgres,
}

/// Sandbox faults with one API's setting replaced.
fn api_faults(api: &str, setting: Value) -> Value {
    let mut faults = json!({});
    faults[api] = setting;
    faults
}

/// Applies a fault, holds it for `hold`, then lifts it. Returns what happened, for the log.
async fn inject(
    stack: &mut Stack,
    servers: &mut Servers,
    fault: Fault,
    hold: Duration,
) -> Result<String> {
    let note = match fault {
        Fault::Kill(role) => {
            stack.kill(role, 0).await?;
            tokio::time::sleep(hold).await;
            stack.restart(role, 0).await?;
            "killed and restarted".to_owned()
        }
        Fault::RabbitRestart => {
            let started = Instant::now();
            tokio::task::block_in_place(|| servers.rabbit.restart())?;
            format!("broker back after {:?}", started.elapsed())
        }
        Fault::PostgresRestart => {
            let started = Instant::now();
            tokio::task::block_in_place(|| servers.postgres.restart())?;
            format!("database back after {:?}", started.elapsed())
        }
        Fault::MailchimpBurst(status) | Fault::SalesforceBurst(status) => {
            let api = if matches!(fault, Fault::MailchimpBurst(_)) {
                "mailchimp"
            } else {
                "salesforce"
            };
            let key = if status == 429 {
                "rate_429"
            } else {
                "rate_503"
            };
            stack
                .set_faults(api_faults(api, json!({ key: 0.6 })))
                .await?;
            tokio::time::sleep(hold).await;
            stack.set_faults(json!({})).await?;
            format!("60% of {api} calls answered {status}")
        }
        Fault::LockRows => {
            stack
                .set_faults(json!({ "unable_to_lock_row_rate": 0.4 }))
                .await?;
            tokio::time::sleep(hold).await;
            stack.set_faults(json!({})).await?;
            "40% of records UNABLE_TO_LOCK_ROW".to_owned()
        }
        Fault::ExpireTokens => {
            stack.expire_salesforce_tokens().await?;
            "salesforce tokens expired".to_owned()
        }
        Fault::SlowMailchimp | Fault::SlowSalesforce => {
            let api = if fault == Fault::SlowMailchimp {
                "mailchimp"
            } else {
                "salesforce"
            };
            // Past the 2 s client timeout the test configures: every call in the window is
            // abandoned and retried.
            stack
                .set_faults(api_faults(api, json!({ "latency_ms": 2_500 })))
                .await?;
            tokio::time::sleep(hold).await;
            stack.set_faults(json!({})).await?;
            format!("{api} answers after 2.5 s")
        }
    };
    Ok(note)
}

/// Every person of the generated org (normalised email) with the statuses of their members.
async fn org_statuses(stack: &Stack) -> Result<BTreeMap<String, Vec<MemberStatus>>> {
    use futures::TryStreamExt as _;
    let mut people: BTreeMap<String, Vec<MemberStatus>> = BTreeMap::new();
    for list in stack.audiences() {
        let mut pages = std::pin::pin!(stack.mailchimp().members(list, MembersQuery::default()));
        while let Some(page) = pages.try_next().await? {
            for member in page.members {
                people
                    .entry(member.email_address.trim().to_lowercase())
                    .or_default()
                    .push(member.status);
            }
        }
    }
    Ok(people)
}

/// The opt-out box of every writable record of `emails`, by record id, with the email asked.
async fn boxes(
    stack: &Stack,
    emails: &[&String],
) -> Result<BTreeMap<String, (String, Option<bool>)>> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let records: Vec<(String, Vec<Value>)> = futures::stream::iter(emails)
        .map(|email| async move {
            Ok::<_, anyhow::Error>(((*email).clone(), writable_records(stack, email).await?))
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    Ok(records
        .iter()
        .flat_map(|(email, records)| records.iter().map(move |record| (email, record)))
        .map(|(email, record)| {
            let id = record.get("Id").and_then(Value::as_str).unwrap_or_default();
            (id.to_owned(), (email.clone(), opted_out(record)))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_opt_out_is_lost_or_undone_under_fifty_faults() -> Result<()> {
    let seed = knob("OPTOUT_FAULTS_SEED", 20_261_127);
    let members = knob("OPTOUT_FAULTS_MEMBERS", 20_000);
    let count = usize::try_from(knob("OPTOUT_FAULTS", 50))?.max(13);
    let mut rng = fastrand::Rng::with_seed(seed);
    let faults = schedule(&mut rng, count);
    println!("seed {seed}, {members} members, {} faults", faults.len());

    let secret = format!("faults{}", optout_cli::up::random_hex(12));
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let logs = std::env::temp_dir().join(format!(
        "optout-e2e-faults-{}",
        optout_cli::up::random_hex(6)
    ));
    std::fs::create_dir_all(&logs)?;
    let env = [
        ("OPTOUT_WEBHOOK_SECRET", secret),
        ("OPTOUT_HTTP_LISTEN", format!("127.0.0.1:{http_port}")),
        (
            "OPTOUT_WEBHOOK_PUBLIC_URL",
            format!("http://127.0.0.1:{http_port}"),
        ),
        ("OPTOUT_MAILCHIMP_TIMEOUT_SECS", "2".to_owned()),
        ("OPTOUT_SALESFORCE_TIMEOUT_SECS", "2".to_owned()),
        ("OPTOUT_SHUTDOWN_GRACE_SECS", "5".to_owned()),
    ]
    .map(|(key, value)| (key.to_owned(), value))
    .to_vec();
    let mut servers = tokio::task::block_in_place(|| -> Result<Servers> {
        Ok(Servers {
            rabbit: PrivateRabbit::start()?,
            postgres: PrivatePostgres::start()?,
        })
    })
    .context("starting the stack's own RabbitMQ and PostgreSQL")?;
    let mut stack = Stack::start(StackConfig {
        amqp_url: Some(servers.rabbit.url()),
        database_url: Some(servers.postgres.url()),
        seed,
        audiences: u32::try_from(AUDIENCES)?,
        members,
        extra_env: env,
        log_dir: Some(logs.clone()),
        ..StackConfig::default()
    })
    .await?;
    println!("service logs in {}", logs.display());

    // The generated org, as it stands before any sync: its people never change during the run,
    // so at the end their boxes must follow the rule on these statuses (checked where every
    // member is unsubscribed, untouched otherwise: a first sync is no opt-in evidence).
    let generated = org_statuses(&stack).await?;
    let generated_emails: Vec<&String> = generated.keys().collect();
    let generated_before = boxes(&stack, &generated_emails).await?;

    // The people the test follows: subscribed everywhere with unchecked records, and the pinned
    // ones, who check their own box in Salesforce and never touch Mailchimp.
    let emails: Vec<String> = (0..PEOPLE).map(|_| email("fault")).collect();
    create_people(&stack, &emails).await?;
    let pinned: Vec<String> = (0..PINNED).map(|_| email("pinned")).collect();
    for address in &pinned {
        for audience in stack.audiences() {
            stack.add_subscriber(audience, address).await?;
        }
        stack.create_contact(address, true).await?;
    }
    let mut tracker = Tracker {
        emails: emails.clone(),
        statuses: vec![vec![Some(true); AUDIENCES]; PEOPLE],
        ever_opted_out: vec![false; PEOPLE],
    };
    for _ in 0..BAD_MESSAGES {
        stack
            .publish_raw("members.changed", b"\x0a\xff\xff\xff\xff\x0fgarbage")
            .await?;
    }

    // The first sync of every member starts, and the faults come while it runs.
    let started = Instant::now();
    stack.trigger_sync().await?;
    let mut revived = Vec::new();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for (index, fault) in faults.iter().enumerate() {
        tracker.act(&stack, &mut rng, 3).await;
        if index % 5 == 4 {
            // A refused trigger (a run under way, a service restarting) is fine: the next one
            // or the final sync covers it.
            drop(stack.trigger_sync().await);
        }
        let hold = Duration::from_millis(rng.u64(300..1_500));
        let note = inject(&mut stack, &mut servers, *fault, hold)
            .await
            .with_context(|| format!("injecting {fault:?}"))?;
        tokio::time::sleep(Duration::from_millis(rng.u64(100..800))).await;
        let back = stack.revive().await?;
        println!(
            "[{index:>2}] {:>6.1}s {fault:?}: {note}{}",
            started.elapsed().as_secs_f64(),
            if back.is_empty() {
                String::new()
            } else {
                format!("; exited and restarted: {back:?}")
            }
        );
        revived.extend(back);
        *by_kind
            .entry(
                format!("{fault:?}")
                    .split('(')
                    .next()
                    .unwrap_or("?")
                    .to_owned(),
            )
            .or_default() += 1;
    }
    let chaos = started.elapsed();

    // Calm: faults off, every service up, a full sync revisits every person, then a plain one
    // (webhooks may have been refused while the fetcher was down; the poll is the net).
    stack.set_faults(json!({})).await?;
    revived.extend(stack.revive().await?);
    stack
        .fleet()
        .await?
        .wait_ready(Duration::from_secs(120))
        .await?;
    for person in PEOPLE - LATE..PEOPLE {
        for audience in 0..AUDIENCES {
            tracker.apply(&stack, person, audience, "unsubscribe").await;
        }
        ensure!(
            tracker.all_unsubscribed(person),
            "the late person {person} is unsubscribed everywhere"
        );
    }
    // Before any sync: the webhooks alone must carry these through fetcher, evaluator and writer,
    // which shows each consumer works again (a full sync would reach Salesforce without them).
    for address in &emails[PEOPLE - LATE..] {
        eventually(
            Duration::from_secs(90),
            "a late opt-out by webhook",
            || async {
                let records = writable_records(&stack, address).await?;
                Ok(
                    if records.iter().all(|record| opted_out(record) == Some(true)) {
                        Ok(())
                    } else {
                        Err(format!("{address}: {records:?}"))
                    },
                )
            },
        )
        .await?;
    }
    stack
        .sync_with(&SyncOptions {
            full: true,
            timeout: Duration::from_secs(600),
            ..SyncOptions::default()
        })
        .await
        .context("the full sync after the faults")?;
    stack.sync_and_wait().await?;

    let mut failures = Vec::new();
    let mut counts = BTreeMap::<&str, usize>::new();
    for (person, address) in emails.iter().enumerate() {
        let records = writable_records(&stack, address).await?;
        let values: Vec<Option<bool>> = records.iter().map(opted_out).collect();
        let labels: Vec<String> = records.iter().map(record_label).collect();
        let (kind, expected) = if tracker.all_unsubscribed(person) {
            ("unsubscribed everywhere at the end", Some(true))
        } else if !tracker.ever_opted_out[person] {
            ("never unsubscribed everywhere", Some(false))
        } else {
            ("opted out, then changed", None)
        };
        *counts.entry(kind).or_default() += 1;
        let agree = values.windows(2).all(|pair| pair[0] == pair[1]);
        match expected {
            Some(value) if values.iter().any(|found| *found != Some(value)) => failures.push(
                format!("{address} ({kind}): expected {value}, found {values:?} on {labels:?}"),
            ),
            None if !agree => {
                failures.push(format!("{address} ({kind}): records disagree: {values:?}"));
            }
            _ => {}
        }
    }
    for address in &pinned {
        let records = writable_records(&stack, address).await?;
        if records.iter().any(|record| opted_out(record) != Some(true)) {
            failures.push(format!(
                "{address} (checked by hand): unchecked: {records:?}"
            ));
        }
    }
    // The whole generated org equals the rule.
    let mut generated_wrong = 0;
    for (id, (email, value)) in boxes(&stack, &generated_emails).await? {
        let statuses = &generated[&email];
        let expected = if statuses
            .iter()
            .all(|status| *status == MemberStatus::Unsubscribed)
        {
            Some(true)
        } else {
            generated_before.get(&id).and_then(|(_, before)| *before)
        };
        if value != expected {
            generated_wrong += 1;
            if generated_wrong <= 10 {
                failures.push(format!(
                    "{email} (generated, statuses {statuses:?}): record {id} is {value:?}, \
                     expected {expected:?}"
                ));
            }
        }
    }
    if generated_wrong > 10 {
        failures.push(format!(
            "... {generated_wrong} generated records wrong in all"
        ));
    }

    let depths = stack.queue_depths().await?;
    let dead_letters: BTreeMap<&String, &u64> = depths
        .iter()
        .filter(|(name, depth)| name.ends_with(".dlq") && **depth > 0)
        .collect();
    let members_changed_dlq = stack
        .topology()
        .dead_letter_queue(&stack.topology().members_changed_queue());
    let expected_dead: BTreeMap<&String, &u64> =
        std::iter::once((&members_changed_dlq, &BAD_MESSAGES)).collect();
    if dead_letters != expected_dead {
        failures.push(format!(
            "dead letters {dead_letters:?}, expected only the {BAD_MESSAGES} bad messages"
        ));
    }
    println!(
        "{} faults in {:.1}s ({by_kind:?}); {} service exits restarted; people: {counts:?}, \
         {PINNED} pinned; generated org: {} people, {} records, {generated_wrong} wrong; \
         dead letters {dead_letters:?}",
        faults.len(),
        chaos.as_secs_f64(),
        revived.len(),
        generated.len(),
        generated_before.len()
    );
    ensure!(
        failures.is_empty(),
        "{} broken promises (seed {seed}; logs in {}):\n  {}",
        failures.len(),
        logs.display(),
        failures.join("\n  ")
    );
    stack.shutdown().await?;
    drop(std::fs::remove_dir_all(&logs));
    Ok(())
}
