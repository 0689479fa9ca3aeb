//! Getting an access token: OAuth 2.0 client credentials or JWT bearer against
//! `{login_url}/services/oauth2/token`.

use optout_telemetry::metrics::ApiCalls;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::{Auth, Error, Result, SalesforceConfig};

/// The OAuth 2.0 token endpoint under the login URL.
const TOKEN_PATH: &str = "/services/oauth2/token";

/// How long a JWT assertion is valid; Salesforce allows at most 3 minutes.
const ASSERTION_LIFETIME_SECS: i64 = 180;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
}

#[derive(Deserialize)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// Runs the configured flow; returns the access token and the instance URL.
pub(crate) async fn fetch_token(
    http: &reqwest::Client,
    config: &SalesforceConfig,
    api_calls: &ApiCalls,
) -> Result<(SecretString, String)> {
    let url = format!("{}{TOKEN_PATH}", config.login_url.trim_end_matches('/'));
    let form: Vec<(&str, String)> = match &config.auth {
        Auth::ClientCredentials {
            client_id,
            client_secret,
        } => vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", client_id.clone()),
            ("client_secret", client_secret.expose_secret().to_owned()),
        ],
        Auth::JwtBearer {
            client_id,
            username,
            private_key_pem,
            audience,
        } => {
            let key =
                jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem.expose_secret().as_bytes())
                    .map_err(|error| Error::Config(format!("invalid jwt private key: {error}")))?;
            let claims = Claims {
                iss: client_id,
                sub: username,
                aud: audience,
                exp: chrono::Utc::now().timestamp() + ASSERTION_LIFETIME_SECS,
            };
            let assertion = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
                &claims,
                &key,
            )
            .map_err(|error| Error::Config(format!("cannot sign jwt assertion: {error}")))?;
            vec![
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned(),
                ),
                ("assertion", assertion),
            ]
        }
    };
    let span = optout_telemetry::http::client_span("POST", &url, TOKEN_PATH);
    let endpoint = format!("POST {TOKEN_PATH}");
    let response = match http
        .post(&url)
        .headers(span.in_scope(optout_telemetry::http::trace_headers))
        .form(&form)
        .send()
        .instrument(span.clone())
        .await
    {
        Ok(response) => response,
        Err(error) => {
            optout_telemetry::http::record_error(&span, "transport");
            api_calls.record(crate::API, &endpoint, "error");
            return Err(Error::Transport(error.without_url()));
        }
    };
    let status = response.status();
    optout_telemetry::http::record_status(&span, status.as_u16());
    api_calls.record(crate::API, &endpoint, status.as_str());
    let bytes = response
        .bytes()
        .await
        .map_err(|error| Error::Transport(error.without_url()))?;
    if status.is_success() {
        let token: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|error| Error::Decode(format!("token response: {error}")))?;
        return Ok((
            SecretString::from(token.access_token),
            token.instance_url.trim_end_matches('/').to_owned(),
        ));
    }
    if status.is_server_error() {
        return Err(Error::Server {
            status: status.as_u16(),
        });
    }
    match serde_json::from_slice::<OAuthError>(&bytes) {
        Ok(refusal) if !refusal.error.is_empty() => Err(Error::Auth {
            error: refusal.error,
            description: refusal.error_description,
        }),
        _ => Err(Error::Auth {
            error: format!("http {}", status.as_u16()),
            description: String::new(),
        }),
    }
}
