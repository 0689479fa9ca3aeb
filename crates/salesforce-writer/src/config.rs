//! Command-line and environment configuration (`OPTOUT_*`), validated before any work starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use secrecy::{ExposeSecret, SecretString};

use crate::plan::SfObject;
use crate::{Error, Result};

/// Configuration of the salesforce-writer.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "optout-salesforce-writer",
    version,
    about = "Writes Email Opt Out to Salesforce"
)]
pub struct Config {
    /// Salesforce token endpoint host (`https://login.salesforce.com`, a My Domain, or the sandbox);
    /// the instance URL comes from the token response.
    #[arg(
        long,
        env = "OPTOUT_SALESFORCE_LOGIN_URL",
        required = false,
        required_unless_present = "migrate_only",
        default_value_if("migrate_only", "true", "")
    )]
    pub salesforce_login_url: String,
    /// Connected app consumer key.
    #[arg(
        long,
        env = "OPTOUT_SALESFORCE_CLIENT_ID",
        required = false,
        required_unless_present = "migrate_only",
        default_value_if("migrate_only", "true", "")
    )]
    pub salesforce_client_id: String,
    /// Consumer secret for the client-credentials flow.
    #[arg(long, env = "OPTOUT_SALESFORCE_CLIENT_SECRET", hide_env_values = true)]
    pub salesforce_client_secret: Option<SecretString>,
    /// Username for the JWT bearer flow (with `--salesforce-jwt-key-file`).
    #[arg(long, env = "OPTOUT_SALESFORCE_JWT_USERNAME")]
    pub salesforce_jwt_username: Option<String>,
    /// PEM RSA private key for the JWT bearer flow.
    #[arg(long, env = "OPTOUT_SALESFORCE_JWT_KEY_FILE")]
    pub salesforce_jwt_key_file: Option<PathBuf>,
    /// JWT `aud` claim; defaults to the login URL.
    #[arg(long, env = "OPTOUT_SALESFORCE_JWT_AUDIENCE")]
    pub salesforce_jwt_audience: Option<String>,
    /// REST API version.
    #[arg(long, env = "OPTOUT_SALESFORCE_API_VERSION", default_value = "59.0")]
    pub salesforce_api_version: String,
    /// Seconds one Salesforce request may take before it is abandoned and retried.
    #[arg(long, env = "OPTOUT_SALESFORCE_TIMEOUT_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub salesforce_timeout_secs: u64,
    /// Extra trusted root certificate (PEM), e.g. the sandbox's.
    #[arg(long, env = "OPTOUT_SALESFORCE_CA_FILE")]
    pub salesforce_ca_file: Option<PathBuf>,
    /// Objects written; PersonAccount only takes effect where the org has person accounts.
    #[arg(
        long,
        env = "OPTOUT_OBJECTS",
        value_delimiter = ',',
        default_value = "Contact,Lead,PersonAccount"
    )]
    pub objects: Vec<SfObject>,

    /// The rule-evaluator's gRPC endpoint (`http://127.0.0.1:PORT`).
    #[arg(
        long,
        env = "OPTOUT_EVALUATOR_URL",
        required = false,
        required_unless_present = "migrate_only",
        default_value_if("migrate_only", "true", "")
    )]
    pub evaluator_url: String,
    /// Bearer token for the evaluator; defaults to `--admin-token`.
    #[arg(long, env = "OPTOUT_EVALUATOR_TOKEN", hide_env_values = true)]
    pub evaluator_token: Option<SecretString>,

    /// RabbitMQ URL.
    #[arg(
        long,
        env = "OPTOUT_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: SecretString,
    /// Topic exchange.
    #[arg(long, env = "OPTOUT_EXCHANGE", default_value = "optout")]
    pub exchange: String,
    /// Prefix of every queue name (tests use a unique one).
    #[arg(long, env = "OPTOUT_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
    /// Number of `persons.dirty.{p}` partitions.
    #[arg(long, env = "OPTOUT_PERSONS_PARTITIONS", default_value_t = 4)]
    pub persons_partitions: u16,

    /// Most messages handled as one batch.
    #[arg(long, env = "OPTOUT_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Longest wait for a batch to fill, in milliseconds, once it holds an urgent message (a
    /// webhook's consequence); the only wait when sync batching is off.
    #[arg(long, env = "OPTOUT_BATCH_WAIT_MS", default_value_t = 200)]
    pub batch_wait_ms: u64,
    /// A batch of a sync's (not urgent) messages keeps filling until none has come for this
    /// long, in milliseconds; 0 turns sync batching off. A sync's opt-outs arrive as a stream
    /// over seconds, and every batch pays its own partly filled Salesforce calls.
    #[arg(long, env = "OPTOUT_SYNC_BATCH_IDLE_MS", default_value_t = 500)]
    pub sync_batch_idle_ms: u64,
    /// Longest a batch of a sync's messages fills, in milliseconds.
    #[arg(long, env = "OPTOUT_SYNC_BATCH_MAX_MS", default_value_t = 10_000)]
    pub sync_batch_max_ms: u64,
    /// Records of one object in one write above which a Bulk API 2.0 job is used.
    #[arg(long, env = "OPTOUT_BULK_THRESHOLD", default_value_t = 2000)]
    pub bulk_threshold: usize,
    /// Seconds between Salesforce poll cycles; 0 polls only on TriggerSync.
    #[arg(long, env = "OPTOUT_POLL_INTERVAL_SECS", default_value_t = 60)]
    pub poll_interval_secs: u64,

    /// PostgreSQL URL.
    #[arg(
        long,
        env = "OPTOUT_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: SecretString,
    /// Schema prefix; this service owns `{schema}_writer`.
    #[arg(long, env = "OPTOUT_DATABASE_SCHEMA", default_value = "optout")]
    pub database_schema: String,

    /// gRPC listen address (health, reflection, Admin).
    #[arg(long, env = "OPTOUT_GRPC_LISTEN", default_value = "127.0.0.1:0")]
    pub grpc_listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "OPTOUT_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    pub metrics_listen: SocketAddr,
    /// Bearer token required by the Admin service.
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
    /// Longest time shutdown waits for the batch in hand, in seconds.
    #[arg(long, env = "OPTOUT_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// Optional TLS on the gRPC port.
    #[command(flatten)]
    pub grpc_tls: optout_service::GrpcTls,
    /// Automated opt-out (off by default).
    #[command(flatten)]
    pub auto_optout: crate::auto_optout::AutoOptOutConfig,
}

impl Config {
    /// Checks what clap cannot: one complete Salesforce credential, sane sizes, a safe schema name.
    pub fn validate(&self) -> Result<()> {
        if self.migrate_only {
            return self.validate_database();
        }
        self.auto_optout.validate()?;
        let jwt = self.salesforce_jwt_username.is_some() || self.salesforce_jwt_key_file.is_some();
        if jwt && (self.salesforce_jwt_username.is_none() || self.salesforce_jwt_key_file.is_none())
        {
            return Err(Error::Config(
                "the JWT flow needs both --salesforce-jwt-username and --salesforce-jwt-key-file"
                    .into(),
            ));
        }
        if !jwt && self.salesforce_client_secret.is_none() {
            return Err(Error::Config(
                "set --salesforce-client-secret, or --salesforce-jwt-username with --salesforce-jwt-key-file".into(),
            ));
        }
        if self.admin_token.expose_secret().is_empty() {
            return Err(Error::Config("--admin-token must not be empty".into()));
        }
        let urls = [
            (
                "OPTOUT_AMQP_URL",
                self.amqp_url.expose_secret(),
                &["amqp", "amqps"][..],
            ),
            (
                "OPTOUT_DATABASE_URL",
                self.database_url.expose_secret(),
                &["postgres", "postgresql"][..],
            ),
            (
                "OPTOUT_SALESFORCE_LOGIN_URL",
                self.salesforce_login_url.as_str(),
                &["https", "http"][..],
            ),
            (
                "OPTOUT_EVALUATOR_URL",
                self.evaluator_url.as_str(),
                &["http", "https"][..],
            ),
        ];
        for (setting, value, schemes) in urls {
            optout_service::config::check_url(setting, value, schemes)
                .map_err(|error| Error::Config(error.to_string()))?;
        }
        if self.objects.is_empty() {
            return Err(Error::Config(
                "--objects must name at least one object".into(),
            ));
        }
        if self.batch_size == 0 || self.bulk_threshold == 0 || self.persons_partitions == 0 {
            return Err(Error::Config(
                "batch size, bulk threshold and partitions must be positive".into(),
            ));
        }
        if !self.evaluator_url.starts_with("http://") && !self.evaluator_url.starts_with("https://")
        {
            return Err(Error::Config(
                "--evaluator-url must start with http:// or https://".into(),
            ));
        }
        self.validate_database()
    }

    /// The checks `--migrate-only` needs: the database URL and the schema name.
    fn validate_database(&self) -> Result<()> {
        optout_service::config::check_url(
            "OPTOUT_DATABASE_URL",
            self.database_url.expose_secret(),
            &["postgres", "postgresql"],
        )
        .map_err(|error| Error::Config(error.to_string()))?;
        let schema = self.writer_schema();
        // The schema name is interpolated into DDL and `SET search_path`, so only plain identifiers.
        if !schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || schema.starts_with(|c: char| c.is_ascii_digit())
            || schema.len() > 63
        {
            return Err(Error::Config(format!(
                "invalid database schema {schema:?}: use lower-case letters, digits and _"
            )));
        }
        Ok(())
    }

    /// The schema this service owns.
    pub fn writer_schema(&self) -> String {
        format!("{}_writer", self.database_schema)
    }

    /// The longest wait for a batch to fill once it holds an urgent message.
    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }

    /// How batches of a sync's messages fill; `None` when sync batching is off.
    pub fn sync_batching(&self) -> Option<optout_amqp::BulkBatching> {
        (self.sync_batch_idle_ms > 0).then(|| optout_amqp::BulkBatching {
            idle: Duration::from_millis(self.sync_batch_idle_ms),
            max_wait: Duration::from_millis(self.sync_batch_max_ms.max(self.sync_batch_idle_ms)),
        })
    }

    /// The longest a consumer batch can take to fill.
    pub fn longest_batch_wait(&self) -> Duration {
        self.sync_batching().map_or(self.batch_wait(), |bulk| {
            bulk.max_wait.max(self.batch_wait())
        })
    }

    /// The poll interval; `None` when polling happens only on TriggerSync.
    pub fn poll_interval(&self) -> Option<Duration> {
        (self.poll_interval_secs > 0).then(|| Duration::from_secs(self.poll_interval_secs))
    }

    /// The Salesforce client configuration; reads the JWT key file.
    pub fn salesforce_config(&self) -> Result<optout_salesforce::SalesforceConfig> {
        let auth = match (&self.salesforce_jwt_username, &self.salesforce_jwt_key_file) {
            (Some(username), Some(key_file)) => {
                let pem = std::fs::read_to_string(key_file).map_err(|error| {
                    Error::Config(format!(
                        "cannot read JWT key file {}: {error}",
                        key_file.display()
                    ))
                })?;
                optout_salesforce::Auth::JwtBearer {
                    client_id: self.salesforce_client_id.clone(),
                    username: username.clone(),
                    private_key_pem: SecretString::from(pem),
                    audience: self
                        .salesforce_jwt_audience
                        .clone()
                        .unwrap_or_else(|| self.salesforce_login_url.clone()),
                }
            }
            _ => optout_salesforce::Auth::ClientCredentials {
                client_id: self.salesforce_client_id.clone(),
                client_secret: self
                    .salesforce_client_secret
                    .clone()
                    .ok_or_else(|| Error::Config("missing --salesforce-client-secret".into()))?,
            },
        };
        Ok(optout_salesforce::SalesforceConfig {
            login_url: self.salesforce_login_url.clone(),
            auth,
            api_version: self.salesforce_api_version.clone(),
            ca_file: self.salesforce_ca_file.clone(),
            timeout: Duration::from_secs(self.salesforce_timeout_secs),
            max_retries: 3,
            max_connections: 4,
        })
    }

    /// The AMQP topology this writer consumes from and publishes to (the prefix applies to the
    /// exchange too).
    pub fn topology(&self) -> optout_amqp::Topology {
        optout_amqp::Topology::new(&self.exchange, &self.queue_prefix, self.persons_partitions)
    }
}
