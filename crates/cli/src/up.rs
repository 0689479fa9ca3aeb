//! `optoutctl up`: the sandbox and the three services as child processes against the local
//! RabbitMQ and PostgreSQL, each run in a fresh schema and queue namespace.
//!
//! Data is kept when the stack stops (schemas `up_<id>_*` and queues `up<id>.*` stay behind), so a
//! run can be inspected afterwards; drop them by hand when no longer needed.

use std::{
    fmt,
    io::{Read, Write},
    path::Path,
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    Error, Result,
    admin::{Fleet, FleetEndpoints, Role, grpc_url},
    children::{ChildSpec, RunningChild, bin_dir, find_binary},
};

/// The RabbitMQ URL used when `OPTOUT_AMQP_URL` is unset.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The PostgreSQL URL used when `OPTOUT_DATABASE_URL` is unset.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// What every service of one stack shares: where the brokers are and its private namespace.
#[derive(Clone)]
pub struct StackSettings {
    /// RabbitMQ.
    pub amqp_url: String,
    /// PostgreSQL.
    pub database_url: String,
    /// Schema base name; each service adds its own suffix.
    pub schema: String,
    /// Queue name prefix, e.g. `up3f2a.`.
    pub queue_prefix: String,
    /// Topic exchange as configured; the services prefix it with `queue_prefix`.
    pub exchange: String,
    /// Bearer token for every admin call.
    pub admin_token: SecretString,
    /// More variables for every service (e.g. `OPTOUT_OBJECTS=Contact`).
    pub extra_env: Vec<(String, String)>,
}

impl fmt::Debug for StackSettings {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("StackSettings")
            .field("amqp_url", &self.amqp_url)
            .field("database_url", &self.database_url)
            .field("schema", &self.schema)
            .field("queue_prefix", &self.queue_prefix)
            .field("exchange", &self.exchange)
            .field("admin_token", &"[redacted]")
            .field(
                "extra_env",
                &self
                    .extra_env
                    .iter()
                    .map(|(key, _)| key)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Lower-case hex from the kernel's random source (falls back to a seeded generator).
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0_u8; bytes];
    let from_kernel = std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut buffer))
        .is_ok();
    if !from_kernel {
        buffer.iter_mut().for_each(|byte| *byte = fastrand::u8(..));
    }
    buffer.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl StackSettings {
    /// Brokers from `OPTOUT_AMQP_URL` / `OPTOUT_DATABASE_URL` (or the local defaults), a fresh
    /// namespace named `{label}_<id>` / `{label}<id>.`, and a random admin token.
    pub fn fresh(label: &str) -> Self {
        let id = random_hex(5);
        Self {
            amqp_url: std::env::var("OPTOUT_AMQP_URL")
                .unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned()),
            database_url: std::env::var("OPTOUT_DATABASE_URL")
                .unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned()),
            schema: format!("{label}_{id}"),
            queue_prefix: format!("{label}{id}."),
            // The amqp crate prefixes the exchange with the queue prefix: `{label}{id}.optout`.
            exchange: "optout".to_owned(),
            admin_token: SecretString::from(random_hex(24)),
            extra_env: Vec::new(),
        }
    }

    /// The environment of a service process, given the sandbox's announcement and, for the
    /// services that call it, the evaluator's gRPC address.
    pub fn service_env(
        &self,
        sandbox: &Value,
        evaluator_grpc: Option<&str>,
    ) -> Vec<(String, String)> {
        let field = |key: &str| {
            sandbox
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let mut env = vec![
            ("OPTOUT_AMQP_URL".to_owned(), self.amqp_url.clone()),
            ("OPTOUT_DATABASE_URL".to_owned(), self.database_url.clone()),
            ("OPTOUT_DATABASE_SCHEMA".to_owned(), self.schema.clone()),
            ("OPTOUT_QUEUE_PREFIX".to_owned(), self.queue_prefix.clone()),
            ("OPTOUT_EXCHANGE".to_owned(), self.exchange.clone()),
            (
                "OPTOUT_ADMIN_TOKEN".to_owned(),
                self.admin_token.expose_secret().to_owned(),
            ),
            ("OPTOUT_MAILCHIMP_URL".to_owned(), field("mailchimp_url")),
            (
                "OPTOUT_MAILCHIMP_API_KEY".to_owned(),
                field("mailchimp_api_key"),
            ),
            (
                "OPTOUT_SALESFORCE_LOGIN_URL".to_owned(),
                field("salesforce_login_url"),
            ),
            (
                "OPTOUT_SALESFORCE_CLIENT_ID".to_owned(),
                field("salesforce_client_id"),
            ),
            (
                "OPTOUT_SALESFORCE_CLIENT_SECRET".to_owned(),
                field("salesforce_client_secret"),
            ),
            (
                "OPTOUT_SALESFORCE_CA_FILE".to_owned(),
                field("salesforce_ca_file"),
            ),
            // Syncs and Salesforce polls run on demand only (TriggerSync), so runs are reproducible.
            ("OPTOUT_SYNC_INTERVAL_SECS".to_owned(), "0".to_owned()),
            ("OPTOUT_POLL_INTERVAL_SECS".to_owned(), "0".to_owned()),
        ];
        if let Some(grpc) = evaluator_grpc {
            env.push(("OPTOUT_EVALUATOR_URL".to_owned(), grpc_url(grpc)));
        }
        env.extend(self.extra_env.iter().cloned());
        env
    }
}

/// The sandbox's size and shape.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// Generator seed.
    pub seed: u64,
    /// Number of audiences.
    pub audiences: u32,
    /// Members per audience.
    pub members: u64,
    /// Whether the org has Person Accounts.
    pub person_accounts: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            seed: 42,
            audiences: 3,
            members: 1000,
            person_accounts: false,
        }
    }
}

/// How to start `optout-sandbox`.
pub fn sandbox_spec(
    options: &SandboxOptions,
    dir: &Path,
    forward_output: bool,
) -> Result<ChildSpec> {
    let mut args = vec![
        "--seed".to_owned(),
        options.seed.to_string(),
        "--audiences".to_owned(),
        options.audiences.to_string(),
        "--members".to_owned(),
        options.members.to_string(),
    ];
    if options.person_accounts {
        args.push("--person-accounts".to_owned());
    }
    Ok(ChildSpec {
        name: "sandbox".to_owned(),
        program: find_binary(dir, "optout-sandbox")?,
        args,
        env: Vec::new(),
        forward_output,
        log_file: None,
    })
}

/// How to start one replica of a service.
pub fn service_spec(
    role: Role,
    name: String,
    dir: &Path,
    env: Vec<(String, String)>,
    forward_output: bool,
) -> Result<ChildSpec> {
    Ok(ChildSpec {
        name,
        program: find_binary(dir, role.binary())?,
        args: Vec::new(),
        env,
        forward_output,
        log_file: None,
    })
}

/// Options of `optoutctl up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// The sandbox's shape.
    pub sandbox: SandboxOptions,
    /// How long each child may take to announce itself.
    pub startup_timeout: Duration,
    /// How long each child may take to stop after SIGTERM.
    pub stop_grace: Duration,
}

impl Default for UpOptions {
    fn default() -> Self {
        Self {
            sandbox: SandboxOptions::default(),
            startup_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// A running sandbox plus one process of each service.
#[derive(Debug)]
pub struct LocalStack {
    /// The shared settings.
    pub settings: StackSettings,
    /// The sandbox.
    pub sandbox: RunningChild,
    /// The services, in start order (evaluator, fetcher, writer).
    pub services: Vec<(Role, RunningChild)>,
}

impl LocalStack {
    /// Starts the sandbox, then the evaluator, then the fetcher and the writer (they need the
    /// evaluator's address).
    pub async fn start(options: &UpOptions, settings: StackSettings) -> Result<Self> {
        let dir = bin_dir()?;
        let sandbox_child = sandbox_spec(&options.sandbox, &dir, true)?;
        let sandbox = RunningChild::start(&sandbox_child, options.startup_timeout).await?;
        let evaluator_spec = service_spec(
            Role::Evaluator,
            Role::Evaluator.name().to_owned(),
            &dir,
            settings.service_env(sandbox.announcement(), None),
            true,
        )?;
        let evaluator = RunningChild::start(&evaluator_spec, options.startup_timeout).await?;
        let evaluator_grpc = evaluator.field("grpc");
        let env = settings.service_env(sandbox.announcement(), Some(&evaluator_grpc));
        let fetcher_spec = service_spec(
            Role::Fetcher,
            Role::Fetcher.name().to_owned(),
            &dir,
            env.clone(),
            true,
        )?;
        let writer_spec = service_spec(
            Role::Writer,
            Role::Writer.name().to_owned(),
            &dir,
            env,
            true,
        )?;
        let (fetcher, writer) = tokio::join!(
            RunningChild::start(&fetcher_spec, options.startup_timeout),
            RunningChild::start(&writer_spec, options.startup_timeout),
        );
        Ok(Self {
            settings,
            sandbox,
            services: vec![
                (Role::Evaluator, evaluator),
                (Role::Fetcher, fetcher?),
                (Role::Writer, writer?),
            ],
        })
    }

    /// The gRPC URL of a service.
    pub fn admin_url(&self, role: Role) -> String {
        self.services
            .iter()
            .find(|(service_role, _)| *service_role == role)
            .map(|(_, child)| grpc_url(&child.field("grpc")))
            .unwrap_or_default()
    }

    /// The JSON line `optoutctl up` prints: the sandbox's fields, the admin endpoints, the token,
    /// the namespace, and `env` for `env $(...) optoutctl status`.
    pub fn info(&self) -> Value {
        let mut info = match self.sandbox.announcement() {
            Value::Object(map) => map.clone(),
            _ => Map::new(),
        };
        let token = self.settings.admin_token.expose_secret();
        let fetcher = self.admin_url(Role::Fetcher);
        let evaluator = self.admin_url(Role::Evaluator);
        let writer = self.admin_url(Role::Writer);
        info.insert(
            "admin".to_owned(),
            json!({ "fetcher": fetcher, "rule_evaluator": evaluator, "salesforce_writer": writer }),
        );
        info.insert("admin_token".to_owned(), json!(token));
        info.insert("database_schema".to_owned(), json!(self.settings.schema));
        info.insert("queue_prefix".to_owned(), json!(self.settings.queue_prefix));
        info.insert(
            "exchange".to_owned(),
            json!(format!(
                "{}{}",
                self.settings.queue_prefix, self.settings.exchange
            )),
        );
        info.insert(
            "env".to_owned(),
            json!(format!(
                "OPTOUT_FETCHER_ADDR={fetcher} OPTOUT_EVALUATOR_ADDR={evaluator} OPTOUT_WRITER_ADDR={writer} OPTOUT_ADMIN_TOKEN={token}"
            )),
        );
        Value::Object(info)
    }

    /// Stops the services (in parallel), then the sandbox.
    pub async fn stop(&mut self, grace: Duration) {
        let stopping = self
            .services
            .iter_mut()
            .map(|(_, child)| child.terminate(grace));
        drop(futures::future::join_all(stopping).await);
        drop(self.sandbox.terminate(grace).await);
    }
}

/// Runs `optoutctl up` until SIGTERM or SIGINT (Ok) or until a child dies (Err).
pub async fn run_up(options: &UpOptions) -> Result<()> {
    let mut stack = LocalStack::start(options, StackSettings::fresh("up")).await?;
    let endpoints = FleetEndpoints {
        fetcher: vec![stack.admin_url(Role::Fetcher)],
        evaluator: vec![stack.admin_url(Role::Evaluator)],
        writer: vec![stack.admin_url(Role::Writer)],
    };
    // Announce only once every service answers, so the caller can use the stack at once.
    Fleet::connect(&endpoints, &stack.settings.admin_token)
        .await?
        .wait_ready(options.startup_timeout)
        .await?;
    let line = serde_json::to_string(&stack.info()).map_err(|source| Error::Json {
        context: "cannot encode the stack info".to_owned(),
        source,
    })?;
    {
        let mut stdout = std::io::stdout().lock();
        let written = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
        written.map_err(|source| Error::Io {
            context: "cannot write to stdout".to_owned(),
            source,
        })?;
    }
    let signal_error = |source| Error::Io {
        context: "cannot listen for signals".to_owned(),
        source,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let died = {
        let mut waits = Vec::new();
        waits.push(Box::pin(stack.sandbox.wait()));
        for (_, child) in &mut stack.services {
            waits.push(Box::pin(child.wait()));
        }
        tokio::select! {
            _ = terminate.recv() => { eprintln!("optoutctl: SIGTERM received, stopping the stack"); None }
            _ = interrupt.recv() => { eprintln!("optoutctl: SIGINT received, stopping the stack"); None }
            (status, index, _) = futures::future::select_all(waits) => Some((index, status)),
        }
    };
    let error = died.map(|(index, status)| {
        let child = if index == 0 {
            &stack.sandbox
        } else {
            &stack.services[index - 1].1
        };
        match status {
            Ok(status) => {
                eprintln!(
                    "optoutctl: {} exited unexpectedly ({status}), stopping the others",
                    child.name()
                );
                child.exited_error(status)
            }
            Err(error) => error,
        }
    });
    stack.stop(options.stop_grace).await;
    match error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
