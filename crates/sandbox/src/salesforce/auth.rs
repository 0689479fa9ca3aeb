//! `POST /services/oauth2/token`: the client-credentials flow (form fields or HTTP Basic) and
//! the JWT bearer flow (RS256 assertion checked against the connected app's certificate key).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use super::api::AppState;
use crate::shared::Api;

const JWT_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The connected app the org trusts.
pub(crate) struct AuthConfig {
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) jwt_username: String,
    pub(crate) decoding_key: jsonwebtoken::DecodingKey,
    pub(crate) login_url: String,
    pub(crate) instance_url: String,
}

fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Constant-time comparison, so the emulator does not teach timing attacks by example.
fn same(left: &str, right: &str) -> bool {
    left.len() == right.len()
        && left
            .bytes()
            .zip(right.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub(crate) async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state
        .shared
        .stats
        .record_call(Api::Salesforce, "POST /services/oauth2/token");
    let form: HashMap<String, String> = match serde_urlencoded::from_bytes(&body) {
        Ok(form) => form,
        Err(_) => return oauth_error("invalid_request", "invalid request body"),
    };
    let auth = &state.auth;
    let grant = form
        .get("grant_type")
        .map(String::as_str)
        .unwrap_or_default();
    let token = match grant {
        "client_credentials" => {
            let credentials = basic_credentials(&headers).or_else(|| {
                Some((
                    form.get("client_id")?.clone(),
                    form.get("client_secret")?.clone(),
                ))
            });
            let Some((client_id, client_secret)) = credentials else {
                return oauth_error("invalid_client_id", "client identifier invalid");
            };
            if !same(&client_id, &auth.client_id) {
                return oauth_error("invalid_client_id", "client identifier invalid");
            }
            if !same(&client_secret, &auth.client_secret) {
                return oauth_error("invalid_client", "invalid client credentials");
            }
            let token = state.org.issue_token();
            let issued_at = chrono::Utc::now().timestamp_millis().to_string();
            json!({
                "access_token": token,
                "signature": base64::engine::general_purpose::STANDARD.encode(issued_at.as_bytes()),
                "scope": "api",
                "instance_url": auth.instance_url,
                "id": format!("{}/id/{}/{}", auth.login_url, state.org.org_id(), state.org.user_id()),
                "token_type": "Bearer",
                "issued_at": issued_at,
                "api_instance_url": auth.instance_url,
            })
        }
        JWT_GRANT => {
            let Some(assertion) = form.get("assertion") else {
                return oauth_error("invalid_grant", "invalid assertion");
            };
            let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            validation.set_audience(&[
                auth.login_url.as_str(),
                "https://login.salesforce.com",
                "https://test.salesforce.com",
            ]);
            validation.set_issuer(&[auth.client_id.as_str()]);
            validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validation.leeway = 5;
            let claims =
                match jsonwebtoken::decode::<Claims>(assertion, &auth.decoding_key, &validation) {
                    Ok(data) => data.claims,
                    Err(error) => {
                        use jsonwebtoken::errors::ErrorKind;
                        return match error.kind() {
                            ErrorKind::InvalidIssuer => {
                                oauth_error("invalid_client_id", "client identifier invalid")
                            }
                            ErrorKind::InvalidAudience => {
                                oauth_error("invalid_grant", "audience is invalid")
                            }
                            ErrorKind::ExpiredSignature => {
                                oauth_error("invalid_grant", "expired authorization code")
                            }
                            _ => oauth_error("invalid_grant", "invalid assertion"),
                        };
                    }
                };
            if claims.sub != auth.jwt_username {
                return oauth_error("invalid_grant", "user hasn't approved this consumer");
            }
            let token = state.org.issue_token();
            json!({
                "access_token": token,
                "scope": "api",
                "instance_url": auth.instance_url,
                "id": format!("{}/id/{}/{}", auth.login_url, state.org.org_id(), state.org.user_id()),
                "token_type": "Bearer",
            })
        }
        _ => return oauth_error("unsupported_grant_type", "grant type not supported"),
    };
    axum::Json(token).into_response()
}
