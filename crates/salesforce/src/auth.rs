//! Getting an access token: OAuth 2.0 client credentials or JWT bearer against
//! `{login_url}/services/oauth2/token`.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::{Auth, Error, Result, SalesforceConfig};

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
) -> Result<(SecretString, String)> {
    let url = format!(
        "{}/services/oauth2/token",
        config.login_url.trim_end_matches('/')
    );
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
    let response = http
        .post(&url)
        .form(&form)
        .send()
        .await
        .map_err(|error| Error::Transport(error.without_url()))?;
    let status = response.status();
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
