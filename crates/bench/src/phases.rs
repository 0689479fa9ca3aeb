//! One stack of one size and the phases measured on it: initial sync, incremental sync,
//! webhooks, and the peak memory of every service after each.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use optout_cli::sync::{FleetSnapshot, SyncOptions, SyncSummary, Triggered, snapshot, trigger};
use optout_e2e::{Role, Stack, StackConfig};
use optout_mailchimp::MemberStatus;
use optout_salesforce::SalesforceClient;
use serde::Serialize;

use crate::{
    BenchOptions,
    bounds::{self, SalesforceBound},
    org::{Decision, OBJECTS, Org, SfRecord, records_of, salesforce_client},
    stats::{Stats, calls_between},
};

/// Time between status polls while waiting for idle (the resolution of the wall times).
const POLL: Duration = Duration::from_millis(50);
/// Consecutive idle polls that count as idle; the wall time ends at the first of them.
const STABLE_POLLS: u32 = 3;
/// Control calls in flight at once while changing members.
const CONTROL_CONCURRENCY: usize = 32;

/// API calls of one phase against the lower bound.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Calls {
    /// Calls the sandbox counted.
    pub calls: u64,
    /// The lower bound of issue #8.
    pub bound: u64,
    /// `calls <= 1.05 × bound + 5`.
    pub within_bound: bool,
    /// Calls per endpoint.
    pub by_endpoint: BTreeMap<String, u64>,
}

impl Calls {
    fn new(by_endpoint: BTreeMap<String, u64>, bound: u64) -> Self {
        let calls = by_endpoint.values().sum();
        Self {
            calls,
            bound,
            within_bound: bounds::within(calls, bound),
            by_endpoint,
        }
    }
}

/// One measured sync.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseReport {
    /// `initial` or `incremental`.
    pub name: String,
    /// Members that changed in Mailchimp since the last sync (all of them for the first).
    pub changed_members: u64,
    /// People whose decision is OptOut among those: the emails that must be read.
    pub dirty_emails: u64,
    /// Salesforce records that had to change (unchecked, writable, person OptOut).
    pub records_to_change: u64,
    /// Wall time from the trigger to the first of the idle polls, ms.
    pub wall_ms: u64,
    /// Changed members per second of wall time.
    pub members_per_second: f64,
    /// Mailchimp calls.
    pub mailchimp: Calls,
    /// Salesforce calls.
    pub salesforce: Calls,
    /// The Salesforce bound by part.
    pub salesforce_bound: SalesforceBound,
    /// Records the sandbox saw written through the API.
    pub records_written: u64,
    /// Records of OptOut people still unchecked afterwards (must be 0).
    pub records_left_unchecked: u64,
    /// Records of people not opted out (`watched`) whose box was checked before and unchecked
    /// after: an opt-out undone. The initial sync carries no opt-in evidence, so must be 0.
    pub records_unchecked: u64,
    /// The services' own counters over the phase.
    pub summary: SyncSummary,
}

/// Webhook latency.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WebhookReport {
    /// Unsubscribe webhooks posted.
    pub sent: u64,
    /// Posts answered 200.
    pub accepted: u64,
    /// Posted at this rate, per second.
    pub rate_per_second: f64,
    /// People whose records were still unchecked afterwards (must be 0).
    pub not_written: u64,
    /// Latency from the POST to the Salesforce write (`SystemModstamp` of the last record of the
    /// person written), ms.
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Maximum, ms.
    pub max_ms: u64,
    /// Time the fetcher took to answer the POST (publish confirmed), p50, ms.
    pub accept_p50_ms: u64,
    /// The same, 99th percentile, ms.
    pub accept_p99_ms: u64,
    /// Salesforce calls while they were processed.
    pub salesforce_calls: u64,
}

/// Peak and current memory of one service after one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryReading {
    /// The phase just finished.
    pub after: String,
    /// fetcher, rule-evaluator or salesforce-writer.
    pub service: String,
    /// `VmHWM` (peak resident set), KiB.
    pub vm_hwm_kib: u64,
    /// `VmRSS` at the time, KiB.
    pub vm_rss_kib: u64,
}

/// Everything measured on one stack.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SizeReport {
    /// Generated memberships.
    pub members: u64,
    /// Distinct people among them.
    pub people: u64,
    /// Time to generate the org and start every process, ms.
    pub stack_start_ms: u64,
    /// Latency the sandbox added to every Mailchimp and Salesforce call while measuring, ms.
    pub api_latency_ms: u64,
    /// Measured syncs.
    pub phases: Vec<PhaseReport>,
    /// Webhook latency, when measured.
    pub webhooks: Option<WebhookReport>,
    /// Memory after each phase.
    pub memory: Vec<MemoryReading>,
}

/// The sandbox's fault settings that add `latency_ms` to every call of both APIs and nothing else.
pub(crate) fn latency_faults(latency_ms: u64) -> serde_json::Value {
    serde_json::json!({
        "mailchimp": { "latency_ms": latency_ms },
        "salesforce": { "latency_ms": latency_ms },
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

/// Starts a stack of `members`, measures the initial sync and, when `full`, the incremental
/// sync and the webhooks, with `api_latency_ms` added to every API call once the org has been
/// read; always shuts the stack down (queues and schemas removed).
pub(crate) async fn run_size(
    options: &BenchOptions,
    members: u64,
    full: bool,
    api_latency_ms: u64,
) -> Result<SizeReport> {
    let secret = format!("whsec-{:016x}", fastrand::u64(..));
    let config = StackConfig {
        seed: options.seed,
        audiences: options.audiences,
        members,
        extra_env: vec![("OPTOUT_WEBHOOK_SECRET".to_owned(), secret.clone())],
        log_dir: options.log_dir.clone(),
        ..StackConfig::default()
    };
    eprintln!("[bench] starting a stack of {members} members");
    let started = Instant::now();
    let mut stack = Stack::start(config).await?;
    let stack_start_ms = millis(started.elapsed());
    let result = measure(
        &mut stack,
        options,
        members,
        full,
        &secret,
        stack_start_ms,
        api_latency_ms,
    )
    .await;
    let shutdown = stack.shutdown().await;
    let report = result?;
    shutdown.context("shutting the stack down")?;
    Ok(report)
}

async fn measure(
    stack: &mut Stack,
    options: &BenchOptions,
    members: u64,
    full: bool,
    secret: &str,
    stack_start_ms: u64,
    api_latency_ms: u64,
) -> Result<SizeReport> {
    let salesforce = salesforce_client(stack.sandbox_info())?;
    let mut org = Org::read(stack.mailchimp(), stack.audiences()).await?;
    if api_latency_ms > 0 {
        stack.set_faults(latency_faults(api_latency_ms)).await?;
    }
    let mut report = SizeReport {
        members,
        people: org.persons.len() as u64,
        stack_start_ms,
        api_latency_ms,
        ..SizeReport::default()
    };
    eprintln!(
        "[bench] {} members, {} people; initial sync",
        org.members(),
        report.people
    );
    let changed = org.members_per_audience.clone();
    let dirty = org.opt_out_emails();
    let opted_in: Vec<String> = org
        .persons
        .keys()
        .filter(|email| org.decision(email) == Decision::OptIn)
        .cloned()
        .collect();
    let initial = measure_sync(
        stack,
        &salesforce,
        options,
        "initial",
        &changed,
        &dirty,
        &opted_in,
    )
    .await?;
    eprintln!("[bench] initial sync: {} ms", initial.wall_ms);
    report.phases.push(initial);
    report.memory.extend(memory(stack, "initial")?);
    if !full {
        return Ok(report);
    }
    let mut rng = fastrand::Rng::with_seed(options.seed.wrapping_add(1));
    if options.incremental > 0 {
        let (changed, dirty) =
            unsubscribe_members(stack, &mut org, &mut rng, options.incremental).await?;
        let phase = measure_sync(
            stack,
            &salesforce,
            options,
            "incremental",
            &changed,
            &dirty,
            &[],
        )
        .await?;
        eprintln!("[bench] incremental sync: {} ms", phase.wall_ms);
        report.phases.push(phase);
        report.memory.extend(memory(stack, "incremental")?);
    }
    if options.webhooks > 0 {
        let webhooks =
            measure_webhooks(stack, &salesforce, &mut org, &mut rng, options, secret).await?;
        eprintln!("[bench] webhooks: p99 {} ms", webhooks.p99_ms);
        report.webhooks = Some(webhooks);
        report.memory.extend(memory(stack, "webhooks")?);
    }
    Ok(report)
}

/// Triggers a sync (fetcher run and writer poll cycle) and measures it; `changed` is the
/// changed members per audience, `dirty` the people who must end up opted out.
async fn measure_sync(
    stack: &mut Stack,
    salesforce: &SalesforceClient,
    options: &BenchOptions,
    name: &str,
    changed: &[u64],
    dirty: &[String],
    watched: &[String],
) -> Result<PhaseReport> {
    let before_records = records_of(salesforce, dirty).await?;
    let watched_before = records_of(salesforce, watched).await?;
    let (to_change, bound) = salesforce_bound(dirty, &before_records);
    let stats_url = stats_url(stack)?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    wait_for_next_second().await;
    let fleet = stack.fleet().await?;
    let stats_before = Stats::read(&http, &stats_url).await?;
    let counters_before = snapshot(&fleet).await?;
    let started = Instant::now();
    let sync_options = SyncOptions::default();
    let triggered = trigger(&fleet, &sync_options).await?;
    let (idle_after, counters_after) = wait_idle(&fleet, &triggered, options.sync_timeout).await?;
    let stats_after = Stats::read(&http, &stats_url).await?;
    stack.check_alive()?;
    let wall = idle_after.saturating_duration_since(started);
    let after_records = records_of(salesforce, dirty).await?;
    let left_unchecked = after_records
        .values()
        .flatten()
        .filter(|record| record.writable() && !record.opted_out)
        .count() as u64;
    let checked_before: BTreeSet<&str> = watched_before
        .values()
        .flatten()
        .filter(|record| record.opted_out)
        .map(|record| record.id.as_str())
        .collect();
    let records_unchecked = records_of(salesforce, watched)
        .await?
        .values()
        .flatten()
        .filter(|record| !record.opted_out && checked_before.contains(record.id.as_str()))
        .count() as u64;
    let changed_members: u64 = changed.iter().sum();
    #[allow(clippy::cast_precision_loss)]
    let members_per_second = changed_members as f64 / wall.as_secs_f64().max(1e-3);
    Ok(PhaseReport {
        name: name.to_owned(),
        changed_members,
        dirty_emails: dirty.len() as u64,
        records_to_change: to_change,
        wall_ms: millis(wall),
        members_per_second,
        mailchimp: Calls::new(
            calls_between(&stats_before, &stats_after, "mailchimp"),
            bounds::mailchimp_calls(changed),
        ),
        salesforce: Calls::new(
            calls_between(&stats_before, &stats_after, "salesforce"),
            bound.total(),
        ),
        salesforce_bound: bound,
        records_written: stats_after
            .records_written("salesforce")
            .saturating_sub(stats_before.records_written("salesforce")),
        records_left_unchecked: left_unchecked,
        records_unchecked,
        summary: SyncSummary::from_snapshots(
            &counters_before,
            &counters_after,
            &triggered,
            wall,
            true,
            false,
        ),
    })
}

/// The records that must change for `dirty` people, and the Salesforce lower bound.
fn salesforce_bound(
    dirty: &[String],
    records: &HashMap<String, Vec<SfRecord>>,
) -> (u64, SalesforceBound) {
    let mut bound = SalesforceBound {
        login: 1,
        ..SalesforceBound::default()
    };
    let mut to_change = 0;
    for object in OBJECTS {
        let of_object = || {
            records
                .values()
                .flatten()
                .filter(move |record| record.object == object && record.writable())
        };
        let found = of_object().count() as u64;
        let changing = of_object().filter(|record| !record.opted_out).count() as u64;
        bound.reads += bounds::read_calls(object, dirty, found);
        bound.writes += bounds::write_calls(changing);
        to_change += changing;
    }
    (to_change, bound)
}

fn stats_url(stack: &Stack) -> Result<String> {
    stack
        .sandbox_info()
        .get("stats_url")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .context("the sandbox announced no stats_url")
}

/// Mailchimp timestamps have whole seconds and a sync reads members changed before its start:
/// the sync starts in a later second than the last change (outside the measured window).
async fn wait_for_next_second() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let to_next = Duration::from_nanos(1_000_000_000 - u64::from(now.subsec_nanos()));
    tokio::time::sleep(to_next + Duration::from_millis(5)).await;
}

fn run_pending(snapshot: &FleetSnapshot, target: Option<&(String, String)>) -> Option<String> {
    let (name, run_id) = target?;
    let (_, _, status) = snapshot
        .statuses
        .iter()
        .find(|(process, _, _)| process == name)?;
    (status.last_run_id != *run_id || !status.last_run_finished)
        .then(|| format!("{name} run {run_id} not finished"))
}

/// Polls every 50 ms until the triggered runs have finished and the pipeline has been idle on
/// three polls in a row; returns when the first of those polls answered, and the last snapshot.
async fn wait_idle(
    fleet: &optout_cli::admin::Fleet,
    triggered: &Triggered,
    timeout: Duration,
) -> Result<(Instant, FleetSnapshot)> {
    let started = Instant::now();
    let mut first_idle = None;
    let mut stable = 0;
    loop {
        let current = snapshot(fleet).await?;
        let answered = Instant::now();
        let busy = run_pending(&current, triggered.fetcher.as_ref())
            .or_else(|| run_pending(&current, triggered.writer.as_ref()))
            .or_else(|| current.busy_reasons());
        match busy {
            None => {
                let first = *first_idle.get_or_insert(answered);
                stable += 1;
                if stable >= STABLE_POLLS {
                    return Ok((first, current));
                }
            }
            Some(reason) => {
                first_idle = None;
                stable = 0;
                if started.elapsed() > timeout {
                    bail!("not idle within {timeout:?}: {reason}");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `VmHWM` and `VmRSS` of every service (replica 0) now.
fn memory(stack: &Stack, after: &str) -> Result<Vec<MemoryReading>> {
    let mut readings = Vec::new();
    for role in [Role::Fetcher, Role::Evaluator, Role::Writer] {
        let pid = stack
            .pid(role, 0)
            .with_context(|| format!("{} is not running", role.name()))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        readings.push(MemoryReading {
            after: after.to_owned(),
            service: role.name().to_owned(),
            vm_hwm_kib: field("VmHWM:"),
            vm_rss_kib: field("VmRSS:"),
        });
    }
    Ok(readings)
}

/// Unsubscribes every subscribed member of random people (as each clicking an unsubscribe
/// link) until `count` members changed. Returns the changed members per audience and the
/// changed people whose decision is now OptOut.
async fn unsubscribe_members(
    stack: &Stack,
    org: &mut Org,
    rng: &mut fastrand::Rng,
    count: u64,
) -> Result<(Vec<u64>, Vec<String>)> {
    let mut people: Vec<&String> = org.persons.keys().collect();
    rng.shuffle(&mut people);
    let mut chosen: Vec<(usize, String)> = Vec::new();
    let mut touched = BTreeSet::new();
    for email in people {
        if chosen.len() as u64 >= count {
            break;
        }
        let members = &org.persons[email];
        let subscribed: Vec<usize> = members
            .iter()
            .filter(|(_, status)| *status == MemberStatus::Subscribed)
            .map(|(audience, _)| *audience)
            .collect();
        if subscribed.is_empty() || chosen.len() + subscribed.len() > usize::try_from(count)? {
            continue;
        }
        touched.insert(email.clone());
        chosen.extend(
            subscribed
                .into_iter()
                .map(|audience| (audience, email.clone())),
        );
    }
    ensure!(
        chosen.len() as u64 == count,
        "only {} subscribed members could be chosen",
        chosen.len()
    );
    let started = Instant::now();
    let audiences = org.audiences.clone();
    futures::stream::iter(chosen.iter())
        .map(|(audience, email)| stack.unsubscribe(&audiences[*audience], email))
        .buffer_unordered(CONTROL_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    eprintln!(
        "[bench] unsubscribed {count} members in {} ms (setup, not measured)",
        started.elapsed().as_millis()
    );
    let mut changed = vec![0; audiences.len()];
    for (audience, email) in &chosen {
        org.set_status(email, *audience, MemberStatus::Unsubscribed);
        changed[*audience] += 1;
    }
    let dirty = touched
        .into_iter()
        .filter(|email| org.decision(email) == Decision::OptOut)
        .collect();
    Ok((changed, dirty))
}

fn percentile(sorted: &[u64], share: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((sorted.len() as f64 * share).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Posts unsubscribe webhooks, as Mailchimp would, for people in one audience only who have an
/// unchecked record, at a steady rate; measures from each POST to the `SystemModstamp` of the
/// person's records once written.
async fn measure_webhooks(
    stack: &mut Stack,
    salesforce: &SalesforceClient,
    org: &mut Org,
    rng: &mut fastrand::Rng,
    options: &BenchOptions,
    secret: &str,
) -> Result<WebhookReport> {
    let wanted = usize::try_from(options.webhooks)?;
    let mut candidates: Vec<(usize, String)> = org
        .persons
        .iter()
        .filter_map(|(email, members)| match members.as_slice() {
            [(audience, MemberStatus::Subscribed)] => Some((*audience, email.clone())),
            _ => None,
        })
        .collect();
    rng.shuffle(&mut candidates);
    candidates.truncate(wanted * 4);
    let emails: Vec<String> = candidates.iter().map(|(_, email)| email.clone()).collect();
    let records = records_of(salesforce, &emails).await?;
    let chosen: Vec<(usize, String, Vec<String>)> = candidates
        .into_iter()
        .filter_map(|(audience, email)| {
            let unchecked: Vec<String> = records
                .get(&email)?
                .iter()
                .filter(|record| record.writable() && !record.opted_out)
                .map(|record| record.id.clone())
                .collect();
            (!unchecked.is_empty()).then_some((audience, email, unchecked))
        })
        .take(wanted)
        .collect();
    ensure!(
        chosen.len() == wanted,
        "only {} people fit for webhooks",
        chosen.len()
    );
    let address = stack
        .announced(Role::Fetcher, 0, "http")
        .context("the fetcher announced no http address")?;
    let url = format!("http://{address}/webhooks/mailchimp/{secret}");
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let stats_url = stats_url(stack)?;
    let stats_before = Stats::read(&http, &stats_url).await?;
    let interval = Duration::from_secs_f64(1.0 / options.webhook_rate.max(0.001));
    let audiences = org.audiences.clone();
    let shared: &Stack = stack;
    let started = tokio::time::Instant::now();
    let sent: Vec<(String, i64, Option<u64>)> = futures::stream::iter(chosen.iter().enumerate())
        .map(|(index, (audience, email, _))| {
            let (http, url, audiences) = (&http, &url, &audiences);
            let start_at = started + interval * u32::try_from(index).unwrap_or(u32::MAX);
            async move {
                tokio::time::sleep_until(start_at).await;
                let list_id = &audiences[*audience];
                // Mailchimp's own state first, as it is when Mailchimp sends the webhook.
                shared.unsubscribe(list_id, email).await?;
                let fired_at = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
                let form = [
                    ("type", "unsubscribe"),
                    ("fired_at", fired_at.as_str()),
                    ("data[action]", "unsub"),
                    ("data[reason]", "manual"),
                    ("data[list_id]", list_id.as_str()),
                    ("data[email]", email.as_str()),
                    ("data[email_type]", "html"),
                    ("data[merges][EMAIL]", email.as_str()),
                ];
                let posted_at = unix_millis();
                let post_started = Instant::now();
                let response = http.post(url.as_str()).form(&form).send().await;
                let accept = millis(post_started.elapsed());
                let accepted = matches!(&response, Ok(answer) if answer.status().is_success());
                Ok::<_, anyhow::Error>((email.clone(), posted_at, accepted.then_some(accept)))
            }
        })
        .buffer_unordered(256)
        .try_collect()
        .await?;
    for (audience, email, _) in &chosen {
        org.set_status(email, *audience, MemberStatus::Unsubscribed);
    }
    let fleet = stack.fleet().await?;
    wait_idle(&fleet, &Triggered::default(), options.sync_timeout).await?;
    let stats_after = Stats::read(&http, &stats_url).await?;
    stack.check_alive()?;
    let after = records_of(salesforce, &emails_of(&chosen)).await?;
    let mut latencies = Vec::new();
    let mut not_written = 0;
    let posted: HashMap<&str, i64> = sent
        .iter()
        .map(|(email, posted_at, _)| (email.as_str(), *posted_at))
        .collect();
    for (_, email, unchecked) in &chosen {
        let records: Vec<&SfRecord> = after
            .get(email)
            .map(|records| {
                records
                    .iter()
                    .filter(|record| unchecked.contains(&record.id))
                    .collect()
            })
            .unwrap_or_default();
        if records.len() != unchecked.len() || records.iter().any(|record| !record.opted_out) {
            not_written += 1;
            continue;
        }
        let written = records
            .iter()
            .map(|record| record.modstamp_ms)
            .max()
            .unwrap_or(0);
        let latency = written - posted.get(email.as_str()).copied().unwrap_or(written);
        latencies.push(u64::try_from(latency.max(0)).unwrap_or(0));
    }
    latencies.sort_unstable();
    let mut accepts: Vec<u64> = sent.iter().filter_map(|(_, _, accept)| *accept).collect();
    accepts.sort_unstable();
    Ok(WebhookReport {
        sent: sent.len() as u64,
        accepted: accepts.len() as u64,
        rate_per_second: options.webhook_rate,
        not_written,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0),
        accept_p50_ms: percentile(&accepts, 0.50),
        accept_p99_ms: percentile(&accepts, 0.99),
        salesforce_calls: calls_between(&stats_before, &stats_after, "salesforce")
            .values()
            .sum(),
    })
}

fn emails_of(chosen: &[(usize, String, Vec<String>)]) -> Vec<String> {
    chosen.iter().map(|(_, email, _)| email.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
