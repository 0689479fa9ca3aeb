//! Helpers shared by the tests: people with known memberships and records, and assertions
//! on their Salesforce opt-out fields that say which record disagreed.

use anyhow::{Result, ensure};
use optout_e2e::{Stack, is_converted_lead, opted_out, record_label};
use serde_json::Value;

/// A person the test created: subscribed in every audience, with Salesforce records.
#[derive(Debug, Clone)]
pub(crate) struct Person {
    pub(crate) email: String,
    pub(crate) records: Vec<(String, String)>,
}

/// Which records to create for a person, each with its initial opt-out value.
#[derive(Debug, Clone, Default)]
pub(crate) struct Records {
    pub(crate) contacts: Vec<bool>,
    pub(crate) leads: Vec<bool>,
    pub(crate) person_accounts: Vec<bool>,
}

impl Records {
    pub(crate) fn contact(opted_out: bool) -> Self {
        Self {
            contacts: vec![opted_out],
            ..Self::default()
        }
    }
}

/// A unique address for a test person.
pub(crate) fn email(label: &str) -> String {
    format!(
        "{label}.{:06x}@e2e.example.com",
        fastrand::u32(..0x00ff_ffff)
    )
}

/// Subscribes `email` in every audience and creates its records.
pub(crate) async fn person(stack: &Stack, email: &str, records: &Records) -> Result<Person> {
    for audience in stack.audiences() {
        stack.add_subscriber(audience, email).await?;
    }
    let mut created = Vec::new();
    for opted_out in &records.contacts {
        created.push((
            "Contact".to_owned(),
            stack.create_contact(email, *opted_out).await?,
        ));
    }
    for opted_out in &records.leads {
        created.push((
            "Lead".to_owned(),
            stack.create_lead(email, *opted_out).await?,
        ));
    }
    for opted_out in &records.person_accounts {
        created.push((
            "Account".to_owned(),
            stack.create_person_account(email, *opted_out).await?,
        ));
    }
    Ok(Person {
        email: email.to_owned(),
        records: created,
    })
}

/// The records of an email that the writer may update (converted Leads left out).
pub(crate) async fn writable_records(stack: &Stack, email: &str) -> Result<Vec<Value>> {
    let records = stack.salesforce_records(email).await?;
    Ok(records
        .into_iter()
        .filter(|record| !is_converted_lead(record))
        .collect())
}

/// The evaluator's explanation of an email, for failure messages.
pub(crate) async fn explain(stack: &Stack, email: &str) -> String {
    let explanation = async {
        let fleet = stack.fleet().await?;
        let evaluator = fleet
            .first(optout_e2e::Role::Evaluator)
            .ok_or_else(|| anyhow::anyhow!("no evaluator"))?;
        let response = evaluator.explain(email).await?;
        Ok::<_, anyhow::Error>(optout_cli::cli::render_explain(email, &response))
    };
    match explanation.await {
        Ok(text) => text,
        Err(error) => format!("(no explanation: {error:#})"),
    }
}

/// Fails unless every writable record of `email` has the opt-out field equal to `expected`.
pub(crate) async fn expect_opt_out(
    stack: &Stack,
    email: &str,
    expected: bool,
    rule: &str,
) -> Result<()> {
    let records = writable_records(stack, email).await?;
    ensure!(
        !records.is_empty(),
        "{rule}: {email} has no Salesforce records"
    );
    let wrong: Vec<String> = records
        .iter()
        .filter(|record| opted_out(record) != Some(expected))
        .map(|record| format!("{} = {:?}", record_label(record), opted_out(record)))
        .collect();
    if !wrong.is_empty() {
        anyhow::bail!(
            "{rule}: expected Email Opt Out = {expected} on every record of {email}, but {}\n{}",
            wrong.join(", "),
            explain(stack, email).await
        );
    }
    Ok(())
}

/// Fails unless the record `object/id` of `email` has the opt-out field equal to `expected`.
pub(crate) async fn expect_record(
    stack: &Stack,
    email: &str,
    id: &str,
    expected: bool,
    rule: &str,
) -> Result<()> {
    let records = stack.salesforce_records(email).await?;
    let record = records
        .iter()
        .find(|record| record.get("Id").and_then(Value::as_str) == Some(id));
    let Some(record) = record else {
        anyhow::bail!("{rule}: record {id} of {email} not found");
    };
    if opted_out(record) != Some(expected) {
        anyhow::bail!(
            "{rule}: expected Email Opt Out = {expected} on {}, found {:?}\n{}",
            record_label(record),
            opted_out(record),
            explain(stack, email).await
        );
    }
    Ok(())
}

/// Unsubscribes `email` in the audiences at `indexes`.
pub(crate) async fn unsubscribe_in(stack: &Stack, email: &str, indexes: &[usize]) -> Result<()> {
    for index in indexes {
        stack.unsubscribe(&stack.audiences()[*index], email).await?;
    }
    Ok(())
}

/// Unsubscribes `email` in every audience.
pub(crate) async fn unsubscribe_everywhere(stack: &Stack, email: &str) -> Result<()> {
    let all: Vec<usize> = (0..stack.audiences().len()).collect();
    unsubscribe_in(stack, email, &all).await
}

/// Calls per label whose count changed between two stats readings.
pub(crate) fn call_diff(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(label, count)| {
            let earlier = before.get(label).copied().unwrap_or(0);
            (*count > earlier).then(|| (label.clone(), count - earlier))
        })
        .collect()
}

/// Whether an endpoint label is a Salesforce write (sObject collections, single-record
/// updates, or a Bulk API ingest job).
pub(crate) fn is_write_call(label: &str) -> bool {
    let upper = label.to_ascii_uppercase();
    upper.starts_with("PATCH ")
        || upper.starts_with("PUT ")
        || (upper.starts_with("POST ") && label.contains("/jobs/ingest"))
        || (upper.starts_with("POST ") && label.contains("/composite"))
}

/// A Mailchimp member status as the model needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Subscribed,
    Unsubscribed,
    Other,
}

impl Status {
    fn parse(text: &str) -> Self {
        match text {
            "subscribed" => Status::Subscribed,
            "unsubscribed" => Status::Unsubscribed,
            _ => Status::Other,
        }
    }
}

/// What a member does between syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Unsubscribe,
    Resubscribe,
    Bounce,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Unsubscribe => "unsubscribe",
            Action::Resubscribe => "resubscribe",
            Action::Bounce => "bounce",
        }
    }
}

/// `(person, audience)` indexes.
type Member = (usize, usize);
/// An action and the status Mailchimp reported after it (None when refused).
type Outcome = (Action, Option<Status>);

#[derive(Debug, Clone)]
struct ModelPerson {
    email: String,
    now: Vec<Status>,
    /// What the system saw at the last sync (polls see the state at sync time).
    seen: Vec<Status>,
    field: bool,
    history: Vec<String>,
}

/// The rule plus opt-in evidence, applied to the statuses the test set: what every Salesforce
/// record of each person must hold after each sync.
#[derive(Debug, Clone)]
pub(crate) struct Model {
    people: Vec<ModelPerson>,
    syncs: usize,
}

impl Model {
    /// People subscribed in every audience, with every record unchecked, before the first sync.
    pub(crate) fn new(emails: &[String], audiences: usize) -> Self {
        let people = emails
            .iter()
            .map(|email| ModelPerson {
                email: email.clone(),
                now: vec![Status::Subscribed; audiences],
                seen: vec![Status::Subscribed; audiences],
                field: false,
                history: Vec::new(),
            })
            .collect();
        Self { people, syncs: 0 }
    }

    /// Number of people.
    pub(crate) fn len(&self) -> usize {
        self.people.len()
    }

    /// Applies actions through the sandbox (per member in order, members concurrently) and
    /// records the statuses Mailchimp reports back. Returns how many changed a status.
    pub(crate) async fn apply(
        &mut self,
        stack: &Stack,
        actions: &[(usize, usize, Action)],
    ) -> Result<usize> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let mut groups: std::collections::BTreeMap<(usize, usize), Vec<Action>> =
            std::collections::BTreeMap::new();
        for (person, audience, action) in actions {
            groups
                .entry((*person, *audience))
                .or_default()
                .push(*action);
        }
        let people = &self.people;
        let results: Vec<(Member, Vec<Outcome>)> = futures::stream::iter(groups)
            .map(|((person, audience), actions)| async move {
                let email = &people[person].email;
                let list = &stack.audiences()[audience];
                let mut outcomes = Vec::new();
                for action in actions {
                    // Mailchimp may refuse a transition (e.g. from cleaned): the model keeps the status.
                    let outcome = match stack.member_action(list, email, action.path()).await {
                        Ok(member) => member
                            .get("status")
                            .and_then(Value::as_str)
                            .map(Status::parse),
                        Err(_) => None,
                    };
                    outcomes.push((action, outcome));
                }
                Ok::<_, anyhow::Error>(((person, audience), outcomes))
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        let mut changes = 0;
        for ((person, audience), outcomes) in results {
            let model = &mut self.people[person];
            for (action, outcome) in outcomes {
                if let Some(status) = outcome {
                    if model.now[audience] != status {
                        changes += 1;
                    }
                    model.now[audience] = status;
                }
                model.history.push(format!(
                    "before sync {}: audience {audience} {action:?} -> {outcome:?}",
                    self.syncs + 1
                ));
            }
        }
        Ok(changes)
    }

    /// Advances the model by one completed sync.
    pub(crate) fn synced(&mut self) {
        self.syncs += 1;
        for person in &mut self.people {
            let any_subscribed = person.now.contains(&Status::Subscribed);
            let all_unsubscribed = person
                .now
                .iter()
                .all(|status| *status == Status::Unsubscribed);
            // Evidence: a member seen in another status at the last sync is subscribed now.
            let set_back = person
                .seen
                .iter()
                .zip(&person.now)
                .any(|(seen, now)| *seen != Status::Subscribed && *now == Status::Subscribed);
            if all_unsubscribed {
                person.field = true;
            } else if any_subscribed && set_back {
                person.field = false;
            }
            person.seen.clone_from(&person.now);
            person.history.push(format!(
                "sync {}: {:?} -> expect {}",
                self.syncs, person.now, person.field
            ));
        }
    }

    /// Checks every person's records and their Mailchimp statuses against the model.
    pub(crate) async fn verify(&self, stack: &Stack) -> Result<()> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let checks: Vec<Option<String>> = futures::stream::iter(&self.people)
            .map(|person| async move {
                let records = writable_records(stack, &person.email).await?;
                let wrong: Vec<String> = records
                    .iter()
                    .filter(|record| opted_out(record) != Some(person.field))
                    .map(|record| format!("{} = {:?}", record_label(record), opted_out(record)))
                    .collect();
                let members = stack.mailchimp_members(&person.email).await?;
                let mut statuses = vec![Status::Other; stack.audiences().len()];
                for member in &members {
                    let list = member
                        .get("list_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if let Some(index) = stack.audiences().iter().position(|id| id == list) {
                        statuses[index] = Status::parse(
                            member
                                .get("status")
                                .and_then(Value::as_str)
                                .unwrap_or_default(),
                        );
                    }
                }
                let mut problems = Vec::new();
                if records.is_empty() {
                    problems.push("no records".to_owned());
                }
                if !wrong.is_empty() {
                    problems.push(format!(
                        "expected {} but {}",
                        person.field,
                        wrong.join(", ")
                    ));
                }
                if statuses != person.now {
                    problems.push(format!(
                        "model statuses {:?} differ from Mailchimp's {statuses:?}",
                        person.now
                    ));
                }
                Ok::<_, anyhow::Error>((!problems.is_empty()).then(|| {
                    format!(
                        "{}: {}\n    history: {}",
                        person.email,
                        problems.join("; "),
                        person.history.join(" | ")
                    )
                }))
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        let failures: Vec<String> = checks.into_iter().flatten().collect();
        ensure!(
            failures.is_empty(),
            "{} of {} people disagree with the rule (first 10):\n  {}",
            failures.len(),
            self.people.len(),
            failures
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        Ok(())
    }
}

/// Creates the model's people: subscribed in every audience, a Contact each and a Lead for
/// every fifth, all unchecked.
pub(crate) async fn create_people(stack: &Stack, emails: &[String]) -> Result<()> {
    use futures::{StreamExt as _, TryStreamExt as _};
    futures::stream::iter(emails.iter().enumerate())
        .map(|(index, address)| async move {
            for audience in stack.audiences() {
                stack.add_subscriber(audience, address).await?;
            }
            stack.create_contact(address, false).await?;
            if index % 5 == 0 {
                stack.create_lead(address, false).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Random actions from a seeded generator: mostly unsubscribes and resubscribes, some bounces.
pub(crate) fn random_actions(
    rng: &mut fastrand::Rng,
    people: usize,
    audiences: usize,
    count: usize,
) -> Vec<(usize, usize, Action)> {
    (0..count)
        .map(|_| {
            let action = match rng.u32(0..100) {
                0..50 => Action::Unsubscribe,
                50..88 => Action::Resubscribe,
                _ => Action::Bounce,
            };
            (rng.usize(0..people), rng.usize(0..audiences), action)
        })
        .collect()
}
