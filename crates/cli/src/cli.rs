//! The command line: argument definitions and what each subcommand does.

use std::{fmt::Write as _, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use optout_proto::evaluator::v1::{Decision, ExplainResponse};
use secrecy::SecretString;

use crate::{
    Error, Result,
    admin::{Fleet, FleetEndpoints, Role, ServiceHandle},
    dlq, explain, health, import, status,
    sync::{SyncOptions, sync},
    up::{SandboxOptions, UpOptions, run_up},
};

/// optoutctl: run and operate optout-sync.
#[derive(Debug, Parser)]
#[command(name = "optoutctl", version, about)]
pub struct Cli {
    /// Where the services listen and the token to use.
    #[command(flatten)]
    pub connection: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Endpoints and credentials, from flags or the environment.
#[derive(Debug, Args)]
pub struct Connection {
    /// Fetcher gRPC address(es), comma separated.
    #[arg(
        long,
        global = true,
        env = "OPTOUT_FETCHER_ADDR",
        value_delimiter = ','
    )]
    pub fetcher: Vec<String>,
    /// Rule-evaluator gRPC address(es), comma separated.
    #[arg(
        long,
        global = true,
        env = "OPTOUT_EVALUATOR_ADDR",
        value_delimiter = ','
    )]
    pub evaluator: Vec<String>,
    /// Salesforce-writer gRPC address(es), comma separated.
    #[arg(long, global = true, env = "OPTOUT_WRITER_ADDR", value_delimiter = ',')]
    pub writer: Vec<String>,
    /// Admin bearer token.
    #[arg(
        long,
        global = true,
        env = "OPTOUT_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<SecretString>,
}

impl Connection {
    fn endpoints(&self) -> FleetEndpoints {
        FleetEndpoints {
            fetcher: self.fetcher.clone(),
            evaluator: self.evaluator.clone(),
            writer: self.writer.clone(),
        }
    }

    fn token(&self) -> Result<&SecretString> {
        self.token.as_ref().ok_or(Error::MissingToken)
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the sandbox and the three services locally; print one JSON line; run until SIGTERM/SIGINT.
    ///
    /// Each run gets a fresh PostgreSQL schema (`up_<id>_*`) and RabbitMQ queues (`up<id>.*`), which
    /// are kept after the stack stops so the run can be inspected; drop them by hand. Children
    /// inherit the environment, so `OTEL_*` and `RUST_LOG` settings reach them.
    Up {
        /// Seed of the sandbox's data generator.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Number of Mailchimp audiences.
        #[arg(long, default_value_t = 3)]
        audiences: u32,
        /// Members per audience.
        #[arg(long, default_value_t = 1000)]
        members: u64,
        /// Give the Salesforce org Person Accounts.
        #[arg(long)]
        person_accounts: bool,
        /// Seconds each process may take to start.
        #[arg(long, default_value_t = 60)]
        startup_timeout: u64,
    },
    /// Show every service's status.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Trigger a sync (and the writer's Salesforce poll cycle) and summarise it.
    Sync {
        /// Wait until the whole pipeline is idle.
        #[arg(long)]
        wait: bool,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Revisit every person, not only what changed.
        #[arg(long)]
        full: bool,
        /// Compute and report, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds to wait for idle.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Stop a service taking new work (fetcher, rule-evaluator, salesforce-writer or all).
    Pause {
        /// The service.
        service: String,
    },
    /// Let a paused service take work again.
    Resume {
        /// The service.
        service: String,
    },
    /// List, replay or purge the evaluator's and writer's dead letters.
    Dlq {
        /// list, replay or purge.
        #[arg(value_enum)]
        action: DlqActionArg,
        /// Only this service: evaluator or writer (default both).
        #[arg(long)]
        service: Option<String>,
        /// Message id to replay (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// Replay or purge every dead letter.
        #[arg(long)]
        all: bool,
        /// Most dead letters listed per service (0: the service's default).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check one service's gRPC health (exit 0 only when SERVING); needs no token.
    Health {
        /// The service's gRPC address, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        addr: String,
        /// Seconds the check may take.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Create subscribers in one audience from Salesforce records (through the fetcher): existing
    /// members keep their status, records with Email Opt Out checked are skipped. Needs --fetcher.
    Import {
        /// The Mailchimp audience (list id).
        #[arg(long = "audience", value_name = "ID")]
        audience_id: String,
        /// SOQL over Contact, Lead or Account selecting Email (or PersonEmail) and
        /// HasOptedOutOfEmail (or PersonHasOptedOutOfEmail); FirstName and LastName become merge fields.
        #[arg(long)]
        soql: String,
        /// Import records with Email Opt Out checked too (as subscribers).
        #[arg(long)]
        include_opted_out: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Seconds the import may take.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Why the evaluator decides what it decides for an email, and what Salesforce holds and the
    /// writer wrote for it (when a writer address is given).
    Explain {
        /// The email address.
        email: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The `dlq` actions as typed.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DlqActionArg {
    /// Show the dead letters.
    List,
    /// Put dead letters back on their queue.
    Replay,
    /// Drop every dead letter.
    Purge,
}

impl From<DlqActionArg> for dlq::DlqAction {
    fn from(action: DlqActionArg) -> Self {
        match action {
            DlqActionArg::List => Self::List,
            DlqActionArg::Replay => Self::Replay,
            DlqActionArg::Purge => Self::Purge,
        }
    }
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let endpoints = cli.connection.endpoints();
    match cli.command {
        Command::Up {
            seed,
            audiences,
            members,
            person_accounts,
            startup_timeout,
        } => {
            let options = UpOptions {
                sandbox: SandboxOptions {
                    seed,
                    audiences,
                    members,
                    person_accounts,
                },
                startup_timeout: Duration::from_secs(startup_timeout),
                ..UpOptions::default()
            };
            run_up(&options).await?;
        }
        Command::Status { json } => {
            endpoints.require_all()?;
            let views = status::collect(&endpoints, cli.connection.token()?).await;
            if json {
                println!("{}", to_json(&views)?);
            } else {
                print!("{}", status::render(&views));
            }
            if views.iter().any(|view| !view.up) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Sync {
            wait,
            json,
            full,
            dry_run,
            timeout,
        } => {
            endpoints.require_all()?;
            let fleet = Fleet::connect(&endpoints, cli.connection.token()?).await?;
            let options = SyncOptions {
                full,
                dry_run,
                wait,
                timeout: Duration::from_secs(timeout),
                ..SyncOptions::default()
            };
            let summary = sync(&fleet, &options).await?;
            if json {
                println!("{}", to_json(&summary)?);
            } else {
                println!("{summary}");
            }
        }
        Command::Pause { service } => {
            for handle in targets(&endpoints, cli.connection.token()?, &service).await? {
                let paused = handle.pause().await?;
                println!(
                    "{}: {}",
                    handle.name,
                    if paused { "paused" } else { "running" }
                );
            }
        }
        Command::Resume { service } => {
            for handle in targets(&endpoints, cli.connection.token()?, &service).await? {
                let paused = handle.resume().await?;
                println!(
                    "{}: {}",
                    handle.name,
                    if paused { "paused" } else { "running" }
                );
            }
        }
        Command::Dlq {
            action,
            service,
            ids,
            all,
            limit,
            json,
        } => {
            let request = dlq::DlqRequest::new(action.into(), service.as_deref(), ids, all, limit)?;
            let results = dlq::run(&endpoints, cli.connection.token()?, &request).await?;
            if json {
                println!("{}", to_json(&results)?);
            } else {
                print!("{}", dlq::render(&results));
            }
        }
        Command::Health { addr, timeout } => {
            health::check(&addr, Duration::from_secs(timeout)).await?;
        }
        Command::Import {
            audience_id,
            soql,
            include_opted_out,
            json,
            timeout,
        } => {
            let Some(endpoint) = endpoints.fetcher.first() else {
                return Err(Error::MissingEndpoint {
                    service: "fetcher",
                    flag: "--fetcher",
                    env: "OPTOUT_FETCHER_ADDR",
                });
            };
            let options = import::ImportOptions {
                audience_id,
                soql,
                include_opted_out,
                timeout: Duration::from_secs(timeout),
            };
            let summary = import::run(endpoint, cli.connection.token()?, &options).await?;
            if json {
                println!("{}", to_json(&summary)?);
            } else {
                println!("{summary}");
            }
        }
        Command::Explain { email, json } => {
            let Some(endpoint) = endpoints.evaluator.first() else {
                return Err(Error::MissingEndpoint {
                    service: "rule-evaluator",
                    flag: "--evaluator",
                    env: "OPTOUT_EVALUATOR_ADDR",
                });
            };
            let token = cli.connection.token()?;
            let evaluator =
                ServiceHandle::connect("rule-evaluator", Role::Evaluator, endpoint, token).await?;
            let writer = match endpoints.writer.first() {
                Some(address) => Some(
                    ServiceHandle::connect("salesforce-writer", Role::Writer, address, token)
                        .await?,
                ),
                None => None,
            };
            let report = explain::collect(&email, &evaluator, writer.as_ref()).await?;
            if json {
                println!("{}", to_json(&explain::to_json(&report))?);
            } else {
                print!("{}", explain::render(&report));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|source| Error::Json {
        context: "cannot encode the output".to_owned(),
        source,
    })
}

async fn targets(
    endpoints: &FleetEndpoints,
    token: &SecretString,
    service: &str,
) -> Result<Vec<ServiceHandle>> {
    let roles = if service.eq_ignore_ascii_case("all") {
        Role::ALL.to_vec()
    } else {
        vec![Role::parse(service)?]
    };
    let mut selected = FleetEndpoints::default();
    for role in roles {
        if endpoints.of(role).is_empty() {
            // Reuse the message that names the flag and the variable.
            endpoints.require_all()?;
        }
        let addresses = endpoints.of(role).to_vec();
        match role {
            Role::Fetcher => selected.fetcher = addresses,
            Role::Evaluator => selected.evaluator = addresses,
            Role::Writer => selected.writer = addresses,
        }
    }
    Ok(Fleet::connect(&selected, token).await?.services)
}

fn decision_name(decision: i32) -> &'static str {
    match Decision::try_from(decision) {
        Ok(Decision::OptOut) => "opt-out",
        Ok(Decision::OptIn) => "opt-in",
        Ok(Decision::NoChange) => "no change",
        _ => "unspecified",
    }
}

pub(crate) fn timestamp(value: Option<&prost_types::Timestamp>) -> String {
    value
        .and_then(|stamp| {
            chrono::DateTime::from_timestamp(stamp.seconds, u32::try_from(stamp.nanos).unwrap_or(0))
        })
        .map(|time| time.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

/// The explanation as readable text.
pub fn render_explain(email: &str, explanation: &ExplainResponse) -> String {
    let mut out = String::new();
    match &explanation.decision {
        Some(decision) => {
            let _ = writeln!(
                out,
                "{}: {} (version {}) — {}",
                if decision.email.is_empty() {
                    email
                } else {
                    &decision.email
                },
                decision_name(decision.decision),
                decision.version,
                decision.rule
            );
            if decision.opt_in_evidence_id != 0 {
                let _ = writeln!(
                    out,
                    "pending opt-in evidence #{}",
                    decision.opt_in_evidence_id
                );
            }
        }
        None => {
            let _ = writeln!(out, "{email}: no decision");
        }
    }
    let _ = writeln!(out, "members:");
    if explanation.members.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for member in &explanation.members {
        let _ = writeln!(
            out,
            "  {}  {:<13} last changed {}  via {}",
            member.audience_id,
            member.status,
            timestamp(member.last_changed.as_ref()),
            member.learned_from
        );
    }
    if !explanation.transitions.is_empty() {
        let _ = writeln!(out, "transitions:");
        for transition in &explanation.transitions {
            let _ = writeln!(
                out,
                "  {}  {} -> {}  changed {}  seen {}  via {}",
                transition.audience_id,
                if transition.from_status.is_empty() {
                    "(new)"
                } else {
                    &transition.from_status
                },
                transition.to_status,
                timestamp(transition.last_changed.as_ref()),
                timestamp(transition.seen_at.as_ref()),
                transition.learned_from
            );
        }
    }
    out
}

pub(crate) fn explain_json(explanation: &ExplainResponse) -> serde_json::Value {
    let decision = explanation.decision.as_ref().map(|decision| {
        serde_json::json!({
            "email": decision.email,
            "decision": decision_name(decision.decision),
            "version": decision.version,
            "opt_in_evidence_id": decision.opt_in_evidence_id,
            "rule": decision.rule,
        })
    });
    serde_json::json!({
        "decision": decision,
        "members": explanation.members.iter().map(|member| serde_json::json!({
            "audience_id": member.audience_id,
            "status": member.status,
            "last_changed": timestamp(member.last_changed.as_ref()),
            "learned_from": member.learned_from,
        })).collect::<Vec<_>>(),
        "transitions": explanation.transitions.iter().map(|transition| serde_json::json!({
            "audience_id": transition.audience_id,
            "from_status": transition.from_status,
            "to_status": transition.to_status,
            "last_changed": timestamp(transition.last_changed.as_ref()),
            "seen_at": timestamp(transition.seen_at.as_ref()),
            "learned_from": transition.learned_from,
        })).collect::<Vec<_>>(),
    })
}
