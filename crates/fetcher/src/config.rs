//! Command-line and environment configuration (`OPTOUT_*`), validated before any work starts.

use std::{net::SocketAddr, time::Duration};

use secrecy::{ExposeSecret, SecretString};

use crate::{Error, Result};

/// Everything the fetcher needs to run; every flag can also come from its `OPTOUT_*` variable.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "optout-fetcher",
    version,
    about = "Mailchimp side of optout-sync: polls audiences and publishes member changes"
)]
pub struct Config {
    /// Mailchimp Marketing API key (`<key>-<dc>`).
    #[arg(
        long,
        env = "OPTOUT_MAILCHIMP_API_KEY",
        hide_env_values = true,
        required = false,
        required_unless_present = "migrate_only",
        default_value_if("migrate_only", "true", "")
    )]
    pub mailchimp_api_key: SecretString,
    /// Mailchimp API base URL, e.g. `http://127.0.0.1:PORT/3.0`; default derives it from the key's data center.
    #[arg(long, env = "OPTOUT_MAILCHIMP_URL")]
    pub mailchimp_url: Option<String>,
    /// Most concurrent Mailchimp requests (Mailchimp allows 10 per API key).
    #[arg(long, env = "OPTOUT_MAILCHIMP_MAX_CONNECTIONS", default_value_t = 10)]
    pub mailchimp_max_connections: usize,
    /// Seconds one Mailchimp request may take before it is abandoned and retried.
    #[arg(long, env = "OPTOUT_MAILCHIMP_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub mailchimp_timeout_secs: u64,
    /// Audience ids in scope, comma separated; empty means every audience of the account.
    #[arg(long, env = "OPTOUT_AUDIENCES", value_delimiter = ',')]
    pub audiences: Vec<String>,
    /// Seconds between scheduled syncs; 0 syncs only on demand (Admin.TriggerSync).
    #[arg(long, env = "OPTOUT_SYNC_INTERVAL_SECS", default_value_t = 3600)]
    pub sync_interval_secs: u64,
    /// Members per Mailchimp page (1..=1000).
    #[arg(long, env = "OPTOUT_PAGE_SIZE", default_value_t = 1000)]
    pub page_size: u32,
    /// Seconds subtracted from an audience's watermark, against clock skew at second granularity.
    #[arg(long, env = "OPTOUT_SYNC_OVERLAP_SECS", default_value_t = 5)]
    pub sync_overlap_secs: u64,
    /// RabbitMQ URL (may carry a password, so it is kept secret).
    #[arg(
        long,
        env = "OPTOUT_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: SecretString,
    /// Topic exchange the services share.
    #[arg(long, env = "OPTOUT_EXCHANGE", default_value = "optout")]
    pub exchange: String,
    /// Prefix of every queue name (tests use a unique one).
    #[arg(long, env = "OPTOUT_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
    /// Number of `persons.dirty` partitions, declared with the rest of the topology.
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
    /// Schema prefix; the fetcher owns `{schema}_fetcher`.
    #[arg(long, env = "OPTOUT_DATABASE_SCHEMA", default_value = "optout")]
    pub database_schema: String,
    /// Address of the gRPC server (health, reflection, Admin).
    #[arg(long, env = "OPTOUT_GRPC_LISTEN", default_value = "127.0.0.1:0")]
    pub grpc_listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "OPTOUT_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    pub metrics_listen: SocketAddr,
    /// Seconds to wait at shutdown for the page under way to be published.
    #[arg(long, env = "OPTOUT_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// Bearer token the Admin service requires.
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
    /// HTTP port, webhooks, Memberships API token, Salesforce for imports.
    #[command(flatten)]
    pub realtime: crate::realtime_config::RealtimeConfig,
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
        if !(1..=1000).contains(&self.page_size) {
            return Err(Error::Config(format!(
                "page size must be 1..=1000, got {}",
                self.page_size
            )));
        }
        if self.mailchimp_max_connections == 0 {
            return Err(Error::Config(
                "mailchimp max connections must be at least 1".to_owned(),
            ));
        }
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
        for (setting, value, schemes) in [
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
        ] {
            optout_service::config::check_url(setting, value, schemes)
                .map_err(|error| Error::Config(error.to_string()))?;
        }
        if self.admin_token.expose_secret().trim().is_empty() {
            return Err(Error::Config("admin token must not be empty".to_owned()));
        }
        if self
            .audiences
            .iter()
            .any(|audience| audience.trim().is_empty())
        {
            return Err(Error::Config("audience ids must not be empty".to_owned()));
        }
        self.realtime.validate()?;
        Ok(())
    }

    /// The checks `--migrate-only` needs: the database URL and the schema name.
    fn validate_database(&self) -> Result<()> {
        if !is_identifier(&self.database_schema) || self.database_schema.len() > 50 {
            return Err(Error::Config(format!(
                "database schema must match [a-z_][a-z0-9_]* (at most 50 characters), got {:?}",
                self.database_schema
            )));
        }
        optout_service::config::check_url(
            "OPTOUT_DATABASE_URL",
            self.database_url.expose_secret(),
            &["postgres", "postgresql"],
        )
        .map_err(|error| Error::Config(error.to_string()))
    }

    /// The schema this service owns.
    pub fn fetcher_schema(&self) -> String {
        format!("{}_fetcher", self.database_schema)
    }

    /// The scheduled sync interval, `None` when syncs run only on demand.
    pub fn sync_interval(&self) -> Option<Duration> {
        (self.sync_interval_secs > 0).then(|| Duration::from_secs(self.sync_interval_secs))
    }
}

/// Whether `name` is safe to splice into SQL as an unquoted identifier.
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_')
        && chars.all(|rest| rest.is_ascii_lowercase() || rest.is_ascii_digit() || rest == '_')
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Config, clap::Error> {
        let base = [
            "optout-fetcher",
            "--mailchimp-api-key",
            "k-us1",
            "--admin-token",
            "t",
        ];
        Config::try_parse_from(base.iter().chain(args))
    }

    #[test]
    fn applies_the_documented_defaults() {
        let config = parse(&[]).expect("parses");
        config.validate().expect("valid");
        assert_eq!(config.page_size, 1000);
        assert_eq!(config.sync_overlap_secs, 5);
        assert_eq!(config.sync_interval(), Some(Duration::from_secs(3600)));
        assert_eq!(config.mailchimp_max_connections, 10);
        assert_eq!(config.fetcher_schema(), "optout_fetcher");
        assert!(config.audiences.is_empty());
        assert_eq!(config.mailchimp_api_key.expose_secret(), "k-us1");
    }

    #[test]
    fn splits_audiences_on_commas_and_treats_zero_interval_as_on_demand() {
        let config = parse(&["--audiences", "a1,b2", "--sync-interval-secs", "0"]).expect("parses");
        assert_eq!(config.audiences, ["a1", "b2"]);
        assert_eq!(config.sync_interval(), None);
    }

    #[test]
    fn rejects_a_schema_that_is_not_a_plain_identifier() {
        let config = parse(&["--database-schema", "x; drop table y"]).expect("parses");
        assert!(config.validate().is_err());
    }

    #[test]
    fn rejects_a_page_size_above_mailchimps_maximum() {
        let config = parse(&["--page-size", "1001"]).expect("parses");
        assert!(config.validate().is_err());
    }

    #[test]
    fn keeps_secrets_out_of_debug_output() {
        let config = parse(&["--database-url", "postgres://u:hunter2@h/db"]).expect("parses");
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("k-us1") && !debug.contains("hunter2"),
            "{debug}"
        );
    }
}
