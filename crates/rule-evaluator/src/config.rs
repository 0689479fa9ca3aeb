//! Command-line and environment configuration (`OPTOUT_*`), validated before any work starts.

use std::{net::SocketAddr, time::Duration};

use secrecy::{ExposeSecret, SecretString};

use crate::{Error, Result, rule::Scope};

/// Everything the rule-evaluator needs; every flag can also come from its `OPTOUT_*` variable.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "optout-rule-evaluator",
    version,
    about = "Keeps member state, applies the Email Opt Out rule and serves decisions"
)]
pub struct Config {
    /// RabbitMQ URL (may carry a password, so it is kept secret).
    #[arg(
        long,
        env = "OPTOUT_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: SecretString,
    /// Topic exchange the services share (the queue prefix is prepended to it).
    #[arg(long, env = "OPTOUT_EXCHANGE", default_value = "optout")]
    pub exchange: String,
    /// Prefix of every queue and exchange name (tests use a unique one).
    #[arg(long, env = "OPTOUT_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
    /// Number of `persons.dirty` partitions.
    #[arg(long, env = "OPTOUT_PERSONS_PARTITIONS", default_value_t = 4)]
    pub persons_partitions: u16,
    /// PostgreSQL URL (may carry a password, so it is kept secret).
    #[arg(
        long,
        env = "OPTOUT_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: SecretString,
    /// Schema prefix; the evaluator owns `{schema}_evaluator`.
    #[arg(long, env = "OPTOUT_DATABASE_SCHEMA", default_value = "optout")]
    pub database_schema: String,
    /// Most pooled database connections.
    #[arg(long, env = "OPTOUT_DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
    /// Audience ids in scope, comma separated; empty means every audience.
    #[arg(long, env = "OPTOUT_AUDIENCES", value_delimiter = ',')]
    pub audiences: Vec<String>,
    /// Address of the gRPC server (health, reflection, Admin, Decisions).
    #[arg(long, env = "OPTOUT_GRPC_LISTEN", default_value = "127.0.0.1:0")]
    pub grpc_listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "OPTOUT_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    pub metrics_listen: SocketAddr,
    /// Bearer token the Admin and Decisions services require.
    #[arg(
        long,
        env = "OPTOUT_ADMIN_TOKEN",
        hide_env_values = true,
        required = false,
        required_unless_present = "migrate_only",
        default_value_if("migrate_only", "true", "")
    )]
    pub admin_token: SecretString,
    /// Create the schema, run the migrations and exit; needs only the database settings.
    #[arg(long)]
    pub migrate_only: bool,
    /// Unacknowledged `members.changed` deliveries held at once.
    #[arg(long, env = "OPTOUT_PREFETCH", default_value_t = 20)]
    pub prefetch: u16,
    /// Most `members.changed` messages applied in one database transaction.
    #[arg(long, env = "OPTOUT_MAX_BATCH", default_value_t = 10)]
    pub max_batch: usize,
    /// Milliseconds to wait for a batch to fill once its first message arrived.
    #[arg(long, env = "OPTOUT_MAX_WAIT_MS", default_value_t = 50)]
    pub max_wait_ms: u64,
    /// Seconds after which a held opt-out is published even while a first sync is still busy (opt-outs
    /// decided from a first sync are otherwise held until the fetcher's markers say every first-syncing
    /// audience was read): a first sync that never ends must not hold an opt-out forever. A pending
    /// audience without a marker or page for this long no longer holds anything.
    #[arg(long, env = "OPTOUT_FIRST_SYNC_MAX_HOLD_SECS", default_value_t = 600)]
    pub first_sync_max_hold_secs: u64,
    /// Longest time, in seconds, shutdown waits for the batch in hand before the process exits anyway.
    #[arg(long, env = "OPTOUT_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// Optional TLS on the gRPC port.
    #[command(flatten)]
    pub grpc_tls: optout_service::GrpcTls,
}

impl Config {
    /// Checks what clap cannot: ranges and the schema name that is spliced into SQL.
    pub fn validate(&self) -> Result<()> {
        if self.migrate_only {
            return self.validate_database();
        }
        optout_service::config::check_url(
            "OPTOUT_AMQP_URL",
            self.amqp_url.expose_secret(),
            &["amqp", "amqps"],
        )
        .map_err(|error| Error::Config(error.to_string()))?;
        optout_service::config::check_url(
            "OPTOUT_DATABASE_URL",
            self.database_url.expose_secret(),
            &["postgres", "postgresql"],
        )
        .map_err(|error| Error::Config(error.to_string()))?;
        if self.persons_partitions == 0 {
            return Err(Error::Config(
                "persons partitions must be at least 1".to_owned(),
            ));
        }
        if !is_identifier(&self.database_schema) || self.database_schema.len() > 50 {
            return Err(Error::Config(format!(
                "database schema must match [a-z_][a-z0-9_]* (at most 50 characters), got {:?}",
                self.database_schema
            )));
        }
        if self.admin_token.expose_secret().trim().is_empty() {
            return Err(Error::Config("admin token must not be empty".to_owned()));
        }
        if self.max_batch == 0 || self.prefetch == 0 || self.database_max_connections == 0 {
            return Err(Error::Config(
                "prefetch, max batch and database max connections must be at least 1".to_owned(),
            ));
        }
        if self
            .audiences
            .iter()
            .any(|audience| audience.trim().is_empty())
        {
            return Err(Error::Config("audience ids must not be empty".to_owned()));
        }
        Ok(())
    }

    /// The checks `--migrate-only` needs: the database URL and the schema name.
    fn validate_database(&self) -> Result<()> {
        optout_service::config::check_url(
            "OPTOUT_DATABASE_URL",
            self.database_url.expose_secret(),
            &["postgres", "postgresql"],
        )
        .map_err(|error| Error::Config(error.to_string()))?;
        if !is_identifier(&self.database_schema) || self.database_schema.len() > 50 {
            return Err(Error::Config(format!(
                "database schema must match [a-z_][a-z0-9_]* (at most 50 characters), got {:?}",
                self.database_schema
            )));
        }
        Ok(())
    }

    /// The schema this service owns: `{database_schema}_evaluator`.
    pub fn evaluator_schema(&self) -> String {
        format!("{}_evaluator", self.database_schema)
    }

    /// The audiences whose members count.
    pub fn scope(&self) -> Scope {
        Scope::from_audiences(
            self.audiences
                .iter()
                .map(|audience| audience.trim().to_owned()),
        )
    }

    /// The longest wait for a batch to fill.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

pub(crate) fn is_identifier(name: &str) -> bool {
    let mut characters = name.chars();
    matches!(characters.next(), Some('a'..='z' | '_'))
        && characters.all(|character| matches!(character, 'a'..='z' | '0'..='9' | '_'))
}
