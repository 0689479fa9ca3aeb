//! Real time, end to end: Mailchimp webhooks delivered by the sandbox to the fetcher binary, and the
//! Memberships API over HTTP JSON and gRPC, each reaching Salesforce through the evaluator and the
//! writer without a sync run or a Salesforce poll (the harness runs both on demand only).
//!
//! The webhook negative cases (wrong secret 404, malformed 400, unknown audience 2xx, nothing
//! published) are covered against the real fetcher and RabbitMQ in `crates/fetcher/tests/it/realtime.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use optout_cli::admin::BearerAuth;
use optout_e2e::{Role, Stack, StackConfig, eventually, opted_out};
use optout_mailchimp::{MemberStatus, MembersQuery, NewWebhook, WebhookEvents, WebhookSources};
use optout_proto::memberships::v1::{UnsubscribeRequest, memberships_client::MembershipsClient};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::support::{Records, email, expect_opt_out, person, writable_records};

/// A fresh webhook secret and API token, and the fetcher environment that enables both.
pub(crate) struct RealtimeKeys {
    pub(crate) secret: String,
    pub(crate) api_token: String,
}

impl RealtimeKeys {
    pub(crate) fn new() -> Self {
        Self {
            secret: format!("whsec-{:016x}", fastrand::u64(..)),
            api_token: format!("api-{:016x}", fastrand::u64(..)),
        }
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OPTOUT_WEBHOOK_SECRET".to_owned(), self.secret.clone()),
            ("OPTOUT_API_TOKEN".to_owned(), self.api_token.clone()),
        ]
    }
}

/// The fetcher's HTTP base URL (`http://host:port`), as announced.
pub(crate) fn fetcher_http(stack: &Stack) -> Result<String> {
    let address = stack
        .announced(Role::Fetcher, 0, "http")
        .context("the fetcher announced no http address")?;
    Ok(format!("http://{address}"))
}

/// Registers the fetcher's webhook on every audience through the sandbox's Mailchimp API, as an
/// admin would (or as the fetcher does at start with `OPTOUT_WEBHOOK_PUBLIC_URL`): every member
/// event, sources `user` and `admin`. Registration makes the sandbox validate the URL with a GET.
pub(crate) async fn register_webhooks(stack: &Stack, secret: &str) -> Result<()> {
    let url = format!("{}/webhooks/mailchimp/{secret}", fetcher_http(stack)?);
    for audience in stack.audiences() {
        stack
            .mailchimp()
            .create_webhook(
                audience,
                &NewWebhook {
                    url: url.clone(),
                    events: WebhookEvents {
                        subscribe: true,
                        unsubscribe: true,
                        profile: true,
                        cleaned: true,
                        upemail: true,
                        campaign: false,
                    },
                    sources: WebhookSources {
                        user: true,
                        admin: true,
                        api: false,
                    },
                },
            )
            .await
            .with_context(|| format!("registering the webhook on {audience}"))?;
    }
    Ok(())
}

/// One Contact or Lead as the Salesforce API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SfRecord {
    object: &'static str,
    email: String,
    opted_out: bool,
    converted: bool,
    modstamp: String,
}

/// SOQL against the sandbox's Salesforce API: the whole org in a few calls, rather than one
/// control-endpoint request per address.
struct Soql {
    http: reqwest::Client,
    instance: String,
    token: String,
}

impl Soql {
    async fn connect(stack: &Stack) -> Result<Self> {
        let info = stack.sandbox_info();
        let text = |key: &str| {
            info.get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("the sandbox announced no {key}"))
        };
        let pem = tokio::fs::read(text("salesforce_ca_file")?).await?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .tls_certs_merge([reqwest::Certificate::from_pem(&pem)?])
            .build()?;
        let token: Value = http
            .post(format!(
                "{}/services/oauth2/token",
                text("salesforce_login_url")?.trim_end_matches('/')
            ))
            .form(&[
                ("grant_type", "client_credentials".to_owned()),
                ("client_id", text("salesforce_client_id")?),
                ("client_secret", text("salesforce_client_secret")?),
            ])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(Self {
            instance: token["instance_url"]
                .as_str()
                .context("no instance_url")?
                .trim_end_matches('/')
                .to_owned(),
            token: token["access_token"]
                .as_str()
                .context("no access_token")?
                .to_owned(),
            http,
        })
    }

    async fn query(&self, soql: &str) -> Result<Vec<Value>> {
        let mut records = Vec::new();
        let mut request = self
            .http
            .get(format!("{}/services/data/v61.0/query", self.instance))
            .query(&[("q", soql)]);
        loop {
            let page: Value = request
                .bearer_auth(&self.token)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            records.extend(page["records"].as_array().cloned().unwrap_or_default());
            match page["nextRecordsUrl"].as_str() {
                Some(next) => request = self.http.get(format!("{}{next}", self.instance)),
                None => return Ok(records),
            }
        }
    }

    /// Every Contact and Lead by id.
    async fn snapshot(&self) -> Result<BTreeMap<String, SfRecord>> {
        let mut snapshot = BTreeMap::new();
        for (object, soql) in [
            (
                "Contact",
                "SELECT Id, Email, HasOptedOutOfEmail, SystemModstamp FROM Contact",
            ),
            (
                "Lead",
                "SELECT Id, Email, HasOptedOutOfEmail, SystemModstamp, IsConverted FROM Lead",
            ),
        ] {
            for record in self.query(soql).await? {
                let id = record["Id"].as_str().context("record without Id")?;
                snapshot.insert(
                    id.to_owned(),
                    SfRecord {
                        object,
                        email: optout_mailchimp::normalize_email(
                            record["Email"].as_str().unwrap_or_default(),
                        ),
                        opted_out: record["HasOptedOutOfEmail"].as_bool().unwrap_or(false),
                        converted: record["IsConverted"].as_bool().unwrap_or(false),
                        modstamp: record["SystemModstamp"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    },
                );
            }
        }
        Ok(snapshot)
    }
}

/// Unix milliseconds of a Salesforce datetime (`2024-01-01T00:00:00.000+0000`).
fn modstamp_millis(text: &str) -> Result<i64> {
    Ok(
        chrono::DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.3f%z")
            .with_context(|| format!("bad SystemModstamp {text:?}"))?
            .timestamp_millis(),
    )
}

fn unix_millis() -> Result<i64> {
    Ok(i64::try_from(
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis(),
    )?)
}

/// Mailchimp members of every audience: (normalised email) → [(audience, address as spelled, status)].
async fn members_by_person(
    stack: &Stack,
) -> Result<BTreeMap<String, Vec<(String, String, MemberStatus)>>> {
    let mut people: BTreeMap<String, Vec<(String, String, MemberStatus)>> = BTreeMap::new();
    for audience in stack.audiences() {
        let pages: Vec<_> = stack
            .mailchimp()
            .members(
                audience,
                MembersQuery {
                    count: 1000,
                    ..MembersQuery::default()
                },
            )
            .try_collect()
            .await?;
        for member in pages.into_iter().flat_map(|page| page.members) {
            people
                .entry(optout_mailchimp::normalize_email(&member.email_address))
                .or_default()
                .push((audience.clone(), member.email_address, member.status));
        }
    }
    Ok(people)
}

/// Generated people in exactly one audience, subscribed there, whose Salesforce records (converted
/// Leads aside) exist and are all unchecked: an unsubscribe makes each an opt-out on its own.
/// Returns (audience, address as Mailchimp spells it, normalised email).
fn single_subscribed_unchecked(
    people: &BTreeMap<String, Vec<(String, String, MemberStatus)>>,
    records: &BTreeMap<String, SfRecord>,
) -> Vec<(String, String, String)> {
    let mut by_email: BTreeMap<&str, Vec<&SfRecord>> = BTreeMap::new();
    for record in records.values().filter(|record| !record.converted) {
        by_email.entry(&record.email).or_default().push(record);
    }
    people
        .iter()
        .filter_map(|(normalised, members)| {
            let [(audience, address, MemberStatus::Subscribed)] = members.as_slice() else {
                return None;
            };
            let writable = by_email.get(normalised.as_str())?;
            writable
                .iter()
                .all(|record| !record.opted_out)
                .then(|| (audience.clone(), address.clone(), normalised.clone()))
        })
        .collect()
}

/// The fetcher's last run id and finished-run count.
async fn fetcher_runs(stack: &Stack) -> Result<(String, i64, i64)> {
    let fleet = stack.fleet().await?;
    let status = fleet
        .first(Role::Fetcher)
        .context("no fetcher")?
        .get_status()
        .await?;
    Ok((
        status.last_run_id,
        status.counters.get("runs_finished").copied().unwrap_or(0),
        status.counters.get("members_read").copied().unwrap_or(0),
    ))
}

/// `GET /lists/{list_id}/members` calls the sandbox has counted (member-list pages).
async fn member_list_reads(stack: &Stack) -> Result<u64> {
    let stats = stack.stats().await?;
    Ok(stats
        .pointer("/calls/mailchimp")
        .and_then(Value::as_object)
        .and_then(|calls| calls.get("GET /lists/{list_id}/members"))
        .and_then(Value::as_u64)
        .unwrap_or(0))
}

/// Webhook deliveries the sandbox reports (delivered, failed attempts).
async fn webhook_deliveries(stack: &Stack) -> Result<(u64, u64)> {
    let control = stack
        .sandbox_info()
        .get("control_url")
        .and_then(Value::as_str)
        .context("no control_url")?
        .trim_end_matches('/')
        .to_owned();
    let value: Value = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .get(format!("{control}/mailchimp/webhook-deliveries"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok((
        value["delivered"].as_u64().unwrap_or(0),
        value["failed_attempts"].as_u64().unwrap_or(0),
    ))
}

/// Polls until every writable record of `email` is checked.
pub(crate) async fn eventually_opted_out(
    stack: &Stack,
    email: &str,
    timeout: Duration,
) -> Result<()> {
    eventually(
        timeout,
        &format!("{email} opted out in Salesforce"),
        move || async move {
            let records = writable_records(stack, email).await?;
            let unchecked: Vec<String> = records
                .iter()
                .filter(|record| opted_out(record) != Some(true))
                .map(optout_e2e::record_label)
                .collect();
            Ok(if records.is_empty() {
                Err("no records".to_owned())
            } else if unchecked.is_empty() {
                Ok(())
            } else {
                Err(format!("still unchecked: {unchecked:?}"))
            })
        },
    )
    .await
}

/// A member clicks an unsubscribe link; the sandbox posts the webhook to the fetcher, and the
/// Contact's Email Opt Out is checked, with no sync run, no member-list read and no Salesforce poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_unsubscribe_reaches_salesforce_before_any_poll() -> Result<()> {
    let keys = RealtimeKeys::new();
    let stack = Stack::start(StackConfig {
        audiences: 2,
        members: 200,
        extra_env: keys.env(),
        ..StackConfig::default()
    })
    .await?;
    register_webhooks(&stack, &keys.secret).await?;

    // A generated person in one audience only: before any sync the evaluator knows no other
    // membership, so the rule's "all unsubscribed" must hold in Mailchimp too.
    let people = members_by_person(&stack).await?;
    let soql = Soql::connect(&stack).await?;
    let records = soql.snapshot().await?;
    let (audience, address, normalised) = single_subscribed_unchecked(&people, &records)
        .into_iter()
        .find(|(_, _, normalised)| {
            records
                .values()
                .any(|record| record.object == "Contact" && record.email == *normalised)
        })
        .context("no generated single-audience subscribed person with an unchecked Contact")?;
    let reads_before = member_list_reads(&stack).await?;
    let (run_before, _, _) = fetcher_runs(&stack).await?;
    ensure!(
        run_before.is_empty(),
        "a run happened at start: {run_before}"
    );

    stack.unsubscribe(&audience, &address).await?;
    eventually_opted_out(&stack, &normalised, Duration::from_secs(30)).await?;

    let (run_id, runs_finished, members_read) = fetcher_runs(&stack).await?;
    ensure!(
        run_id.is_empty() && runs_finished == 0 && members_read == 0,
        "the fetcher ran a sync (last run {run_id:?}, {runs_finished} finished, {members_read} members read)"
    );
    let fleet = stack.fleet().await?;
    let writer = fleet
        .first(Role::Writer)
        .context("no writer")?
        .get_status()
        .await?;
    ensure!(
        writer.last_run_id.is_empty(),
        "the writer ran a Salesforce poll cycle: {}",
        writer.last_run_id
    );
    let reads_after = member_list_reads(&stack).await?;
    ensure!(
        reads_after == reads_before,
        "member lists were read after the unsubscribe: {reads_before} -> {reads_after}"
    );
    let (delivered, _) = webhook_deliveries(&stack).await?;
    ensure!(delivered >= 1, "the sandbox delivered no webhook");
    // Only that person's records changed.
    let after = soql.snapshot().await?;
    for (id, record) in &after {
        if record.email != normalised {
            ensure!(
                records.get(id) == Some(record),
                "{} {id} of {} changed",
                record.object,
                record.email
            );
        }
    }
    stack.shutdown().await?;
    Ok(())
}

fn percentile(sorted: &[i64], percent: usize) -> i64 {
    sorted[(sorted.len() * percent / 100).min(sorted.len() - 1)]
}

/// 1,000 members unsubscribe (20 at a time) after a first sync; each becomes an opt-out in
/// Salesforce through its webhook alone. Prints the latency from the unsubscribe call to the
/// Salesforce write (the record's `SystemModstamp`, stamped by the sandbox on the same clock):
/// p50, p90, p99, max and the total. Asserts only that exactly the right records changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_webhook_unsubscribes_reach_salesforce_and_nothing_else_changes() -> Result<()> {
    const TARGETS: usize = 1000;
    let keys = RealtimeKeys::new();
    let mut stack = Stack::start(StackConfig {
        audiences: 1,
        members: 2200,
        extra_env: keys.env(),
        ..StackConfig::default()
    })
    .await?;
    // Steady state first: the evaluator knows every member and the writer holds a token.
    let first = stack.sync_and_wait().await?;
    ensure!(first.write_failures == 0, "first sync: {first}");
    register_webhooks(&stack, &keys.secret).await?;

    let people = members_by_person(&stack).await?;
    let soql = Soql::connect(&stack).await?;
    let before = soql.snapshot().await?;
    let targets: Vec<(String, String, String)> = single_subscribed_unchecked(&people, &before)
        .into_iter()
        .take(TARGETS)
        .collect();
    ensure!(
        targets.len() == TARGETS,
        "only {} eligible members; raise `members`",
        targets.len()
    );
    let target_emails: BTreeSet<&str> =
        targets.iter().map(|(_, _, email)| email.as_str()).collect();
    let expected_writes = before
        .values()
        .filter(|record| !record.converted && target_emails.contains(record.email.as_str()))
        .count();
    let written_before = stack.stats().await?["records_written"]["salesforce"]
        .as_u64()
        .unwrap_or(0);

    let started = unix_millis()?;
    let sent: BTreeMap<String, i64> = futures::stream::iter(&targets)
        .map(|(audience, address, email)| {
            let stack = &stack;
            async move {
                let at = unix_millis()?;
                stack.unsubscribe(audience, address).await?;
                Ok::<_, anyhow::Error>((email.clone(), at))
            }
        })
        .buffer_unordered(20)
        .try_collect()
        .await?;
    let sent_in = unix_millis()? - started;

    let (soql_ref, targets_ref) = (&soql, &target_emails);
    let after = eventually(
        Duration::from_secs(90),
        "every target's records checked",
        move || async move {
            let snapshot = soql_ref.snapshot().await?;
            let pending = snapshot
                .values()
                .filter(|record| {
                    !record.converted
                        && !record.opted_out
                        && targets_ref.contains(record.email.as_str())
                })
                .count();
            Ok(if pending == 0 {
                Ok(snapshot)
            } else {
                Err(format!("{pending} records still unchecked"))
            })
        },
    )
    .await?;
    // Let any stray write land before checking that nothing else changed.
    stack.wait_idle(Duration::from_secs(60)).await?;
    let after_idle = soql.snapshot().await?;
    ensure!(
        after_idle == after,
        "records changed after the targets were all checked"
    );

    let mut changed_elsewhere = Vec::new();
    let mut latest_write: BTreeMap<&str, i64> = BTreeMap::new();
    for (id, record) in &after {
        let old = before.get(id).with_context(|| format!("new record {id}"))?;
        if target_emails.contains(record.email.as_str()) {
            if !record.converted {
                let written = modstamp_millis(&record.modstamp)?;
                let latest = latest_write.entry(record.email.as_str()).or_insert(written);
                *latest = (*latest).max(written);
            } else {
                ensure!(old == record, "converted Lead {id} was written");
            }
        } else if old != record {
            changed_elsewhere.push(format!("{} {id} of {}", record.object, record.email));
        }
    }
    ensure!(
        changed_elsewhere.is_empty(),
        "records of other people changed: {changed_elsewhere:?}"
    );
    let written = stack.stats().await?["records_written"]["salesforce"]
        .as_u64()
        .unwrap_or(0)
        - written_before;
    ensure!(
        usize::try_from(written)? == expected_writes,
        "{written} records written, expected {expected_writes}"
    );
    let (delivered, failed) = webhook_deliveries(&stack).await?;
    ensure!(
        delivered >= u64::try_from(TARGETS)?,
        "{delivered} webhooks delivered"
    );
    let (_, runs_finished, _) = fetcher_runs(&stack).await?;
    ensure!(
        runs_finished == 1,
        "{runs_finished} sync runs: only the first one may run"
    );

    let mut latencies: Vec<i64> = sent
        .iter()
        .map(|(email, at)| {
            latest_write
                .get(email.as_str())
                .map_or(i64::MAX, |written| written - at)
        })
        .collect();
    latencies.sort_unstable();
    let last_write = latest_write.values().copied().max().unwrap_or(started);
    println!(
        "webhook unsubscribe -> Salesforce write over {} members ({expected_writes} records, 20 at a time): \
         p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; unsubscribes sent in {sent_in} ms, \
         first unsubscribe to last write {} ms; {failed} failed webhook attempts",
        latencies.len(),
        percentile(&latencies, 50),
        percentile(&latencies, 90),
        percentile(&latencies, 99),
        latencies[latencies.len() - 1],
        last_write - started,
    );
    stack.shutdown().await?;
    Ok(())
}

type Memberships = MembershipsClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>,
>;

async fn memberships_client(stack: &Stack, token: &str) -> Result<Memberships> {
    let address = stack
        .announced(Role::Fetcher, 0, "grpc")
        .context("no fetcher grpc address")?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let auth = BearerAuth::new(&SecretString::from(token.to_owned()))?;
    Ok(MembershipsClient::with_interceptor(channel, auth))
}

/// Mailchimp statuses of an email by audience, as the sandbox holds them.
async fn statuses(stack: &Stack, email: &str) -> Result<BTreeMap<String, String>> {
    Ok(stack
        .mailchimp_members(email)
        .await?
        .iter()
        .map(|member| {
            (
                member["list_id"].as_str().unwrap_or_default().to_owned(),
                member["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The Memberships API unsubscribes in Mailchimp at once and Salesforce follows without a poll:
/// over HTTP JSON one audience at a time (the first leaves a subscribed membership, so nothing
/// changes; the second completes the opt-out), over gRPC with `all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_api_unsubscribes_reach_mailchimp_and_salesforce_without_a_poll() -> Result<()>
{
    let keys = RealtimeKeys::new();
    let mut stack = Stack::start(StackConfig {
        audiences: 2,
        members: 40,
        extra_env: keys.env(),
        ..StackConfig::default()
    })
    .await?;
    let audiences = stack.audiences().to_vec();
    let over_http = person(&stack, &email("api-http"), &Records::contact(false)).await?;
    let over_grpc = person(&stack, &email("api-grpc"), &Records::contact(false)).await?;
    stack.sync_and_wait().await?;
    let (run_before, runs_before, _) = fetcher_runs(&stack).await?;
    let writer_poll_before = stack
        .fleet()
        .await?
        .first(Role::Writer)
        .context("no writer")?
        .get_status()
        .await?
        .last_run_id;
    let base = fetcher_http(&stack)?;
    let web = reqwest::Client::builder().no_proxy().build()?;
    let unsubscribe_over_http = |body: Value| {
        let request = web
            .post(format!("{base}/api/v1/unsubscribe"))
            .bearer_auth(&keys.api_token)
            .json(&body)
            .send();
        async move {
            let response = request.await?;
            let status = response.status();
            let body: Value = response.json().await?;
            ensure!(status.is_success(), "unsubscribe answered {status}: {body}");
            Ok::<_, anyhow::Error>(body)
        }
    };

    // HTTP, first audience: a mix of unsubscribed and subscribed changes nothing.
    let body = unsubscribe_over_http(json!({
        "email": over_http.email, "audience_ids": [audiences[0]], "reason": "e2e http"
    }))
    .await?;
    ensure!(
        body["results"][0]["status"] == "unsubscribed",
        "http answer: {body}"
    );
    let now = statuses(&stack, &over_http.email).await?;
    ensure!(
        now.get(&audiences[0]).map(String::as_str) == Some("unsubscribed")
            && now.get(&audiences[1]).map(String::as_str) == Some("subscribed"),
        "after the first http unsubscribe: {now:?}"
    );
    stack.wait_idle(Duration::from_secs(60)).await?;
    expect_opt_out(
        &stack,
        &over_http.email,
        false,
        "one audience left subscribed",
    )
    .await?;

    // HTTP, second audience: unsubscribed everywhere, so Salesforce follows.
    unsubscribe_over_http(json!({"email": over_http.email, "audience_ids": [audiences[1]]}))
        .await?;
    let now = statuses(&stack, &over_http.email).await?;
    ensure!(
        audiences
            .iter()
            .all(|audience| now.get(audience).map(String::as_str) == Some("unsubscribed")),
        "after the second http unsubscribe: {now:?}"
    );
    eventually_opted_out(&stack, &over_http.email, Duration::from_secs(30)).await?;

    // gRPC, every audience at once.
    let mut client = memberships_client(&stack, &keys.api_token).await?;
    let response = client
        .unsubscribe(UnsubscribeRequest {
            email: over_grpc.email.clone(),
            all: true,
            reason: "e2e grpc".to_owned(),
            ..UnsubscribeRequest::default()
        })
        .await?
        .into_inner();
    ensure!(
        response.results.len() == audiences.len()
            && response
                .results
                .iter()
                .all(|result| result.status == "unsubscribed" && result.error.is_empty()),
        "grpc answer: {response:?}"
    );
    let now = statuses(&stack, &over_grpc.email).await?;
    ensure!(
        audiences
            .iter()
            .all(|audience| now.get(audience).map(String::as_str) == Some("unsubscribed")),
        "after the grpc unsubscribe: {now:?}"
    );
    eventually_opted_out(&stack, &over_grpc.email, Duration::from_secs(30)).await?;

    let (run_after, runs_after, _) = fetcher_runs(&stack).await?;
    ensure!(
        run_after == run_before && runs_after == runs_before,
        "a sync ran after the first: {run_before} ({runs_before}) -> {run_after} ({runs_after})"
    );
    let fleet = stack.fleet().await?;
    let writer = fleet.first(Role::Writer).context("no writer")?;
    ensure!(
        writer.get_status().await?.last_run_id == writer_poll_before,
        "the writer ran another Salesforce poll cycle"
    );
    stack.shutdown().await?;
    Ok(())
}
