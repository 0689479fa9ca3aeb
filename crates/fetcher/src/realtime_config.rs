//! Configuration of the real-time paths: the HTTP port, webhooks, the Memberships API token and the
//! optional Salesforce connection that imports read from. Flattened into [`crate::Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use secrecy::{ExposeSecret, SecretString};

use crate::{Error, Result};

/// HTTP port, webhooks, API token and Salesforce (for imports).
#[derive(Clone, Debug, clap::Args)]
pub struct RealtimeConfig {
    /// Address of the HTTP server (Mailchimp webhooks, the Memberships API as JSON).
    #[arg(long, env = "OPTOUT_HTTP_LISTEN", default_value = "127.0.0.1:0")]
    pub http_listen: SocketAddr,
    /// Secret path segment of the webhook URL (`/webhooks/mailchimp/{secret}`); webhooks are off
    /// (404) without it.
    #[arg(long, env = "OPTOUT_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<SecretString>,
    /// Public base URL of this HTTP server (e.g. `https://optout.example.com`): when set, the webhook
    /// is registered on every audience in scope at start-up (sources user and admin, not api).
    #[arg(long, env = "OPTOUT_WEBHOOK_PUBLIC_URL")]
    pub webhook_public_url: Option<String>,
    /// Webhook requests per second the HTTP port takes, in bursts of as many (0: no limit); more
    /// get 429 with `Retry-After`, and Mailchimp delivers them again later.
    #[arg(long, env = "OPTOUT_WEBHOOK_RATE_LIMIT", default_value_t = 1000)]
    pub webhook_rate_limit: u32,
    /// Memberships API requests per second over HTTP, in bursts of as many (0: no limit).
    #[arg(long, env = "OPTOUT_API_RATE_LIMIT", default_value_t = 100)]
    pub api_rate_limit: u32,
    /// Bearer token of the Memberships API (gRPC and HTTP); the admin token is accepted too.
    #[arg(long, env = "OPTOUT_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<SecretString>,
    /// Salesforce token endpoint host; imports are refused (FAILED_PRECONDITION) without it.
    #[arg(long, env = "OPTOUT_SALESFORCE_LOGIN_URL")]
    pub salesforce_login_url: Option<String>,
    /// Connected app consumer key (client-credentials flow).
    #[arg(long, env = "OPTOUT_SALESFORCE_CLIENT_ID")]
    pub salesforce_client_id: Option<String>,
    /// Connected app consumer secret.
    #[arg(long, env = "OPTOUT_SALESFORCE_CLIENT_SECRET", hide_env_values = true)]
    pub salesforce_client_secret: Option<SecretString>,
    /// Extra trusted root certificate (PEM), e.g. the sandbox's.
    #[arg(long, env = "OPTOUT_SALESFORCE_CA_FILE")]
    pub salesforce_ca_file: Option<PathBuf>,
    /// Salesforce REST API version.
    #[arg(long, env = "OPTOUT_SALESFORCE_API_VERSION", default_value = "59.0")]
    pub salesforce_api_version: String,
}

impl RealtimeConfig {
    /// Checks the combinations clap cannot.
    pub fn validate(&self) -> Result<()> {
        if self.webhook_public_url.is_some() && self.webhook_secret.is_none() {
            return Err(Error::Config(
                "--webhook-public-url needs --webhook-secret".to_owned(),
            ));
        }
        if let Some(secret) = &self.webhook_secret {
            let secret = secret.expose_secret();
            if secret.len() < 16
                || !secret
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(Error::Config(
                    "the webhook secret must be at least 16 characters of [A-Za-z0-9_-]".to_owned(),
                ));
            }
        }
        let salesforce = [
            self.salesforce_login_url.is_some(),
            self.salesforce_client_id.is_some(),
            self.salesforce_client_secret.is_some(),
        ];
        if salesforce.iter().any(|set| *set) && !salesforce.iter().all(|set| *set) {
            return Err(Error::Config(
                "Salesforce needs --salesforce-login-url, --salesforce-client-id and --salesforce-client-secret together".to_owned(),
            ));
        }
        Ok(())
    }

    /// The Salesforce client settings, `None` when Salesforce is not configured.
    pub fn salesforce_config(&self) -> Option<optout_salesforce::SalesforceConfig> {
        let (Some(login_url), Some(client_id), Some(client_secret)) = (
            &self.salesforce_login_url,
            &self.salesforce_client_id,
            &self.salesforce_client_secret,
        ) else {
            return None;
        };
        let mut config = optout_salesforce::SalesforceConfig::new(
            login_url.clone(),
            optout_salesforce::Auth::ClientCredentials {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
            },
        );
        config.api_version.clone_from(&self.salesforce_api_version);
        config.ca_file.clone_from(&self.salesforce_ca_file);
        config.timeout = Duration::from_secs(60);
        config.max_connections = 4;
        Some(config)
    }
}
