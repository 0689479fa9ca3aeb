//! The client's error type, classified once so callers can decide between retrying, giving up on
//! one member, and failing the run.

use serde::Deserialize;

/// Result of a Mailchimp call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failed Mailchimp call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The member unsubscribed, bounced or was compliance-reviewed and cannot be set to subscribed.
    #[error("member in compliance state: {detail}")]
    ComplianceState {
        /// Mailchimp's explanation.
        detail: String,
    },
    /// The address was permanently deleted and cannot be re-imported.
    #[error("forgotten email not subscribed: {detail}")]
    ForgottenEmail {
        /// Mailchimp's explanation.
        detail: String,
    },
    /// A create met an existing member.
    #[error("member exists: {detail}")]
    MemberExists {
        /// Mailchimp's explanation.
        detail: String,
    },
    /// The list or member does not exist.
    #[error("resource not found: {detail}")]
    NotFound {
        /// Mailchimp's explanation.
        detail: String,
    },
    /// Mailchimp refused the request body (fake address, bad field).
    #[error("invalid resource: {detail}")]
    InvalidResource {
        /// Mailchimp's explanation.
        detail: String,
    },
    /// Too many requests (429, or a bare 403 that Mailchimp sends under high load).
    #[error("rate limited by mailchimp")]
    RateLimited,
    /// A 5xx answer.
    #[error("mailchimp server error {status}: {detail}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Mailchimp's explanation, if any.
        detail: String,
    },
    /// Any other problem answer.
    #[error("mailchimp api error {status} {title}: {detail}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Problem title.
        title: String,
        /// Problem detail.
        detail: String,
    },
    /// The request did not complete (connect failure, timeout, reset).
    #[error("mailchimp transport error")]
    Transport(#[source] reqwest::Error),
    /// The answer was not the JSON we expected.
    #[error("failed to decode mailchimp response")]
    Decode(#[source] serde_json::Error),
    /// The configuration cannot work (no data center in the API key, bad URL).
    #[error("invalid mailchimp configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether the same request may succeed later: throttling, server errors and transport
    /// failures are; answers about the member or the request are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RateLimited | Error::Server { .. } => true,
            Error::Transport(error) => {
                error.is_timeout() || error.is_connect() || error.is_request() || error.is_body()
            }
            Error::ComplianceState { .. }
            | Error::ForgottenEmail { .. }
            | Error::MemberExists { .. }
            | Error::NotFound { .. }
            | Error::InvalidResource { .. }
            | Error::Api { .. }
            | Error::Decode(_)
            | Error::Config(_) => false,
        }
    }

    /// Classifies a non-success answer from its status and (possibly empty) body. Total: any
    /// bytes give an error value (fuzzed in `crates/fuzz-targets`).
    pub fn from_response(status: u16, body: &[u8]) -> Error {
        let problem: Option<Problem> = if body.is_empty() {
            None
        } else {
            serde_json::from_slice(body).ok()
        };
        let Some(problem) = problem else {
            // Mailchimp documents bare 429/403 answers without a JSON body under high load.
            return match status {
                429 | 403 => Error::RateLimited,
                500.. => Error::Server {
                    status,
                    detail: String::from_utf8_lossy(body).chars().take(200).collect(),
                },
                _ => Error::Api {
                    status,
                    title: String::new(),
                    detail: String::from_utf8_lossy(body).chars().take(200).collect(),
                },
            };
        };
        let detail = problem.detail;
        match (status, problem.title.as_str()) {
            (429, _) => Error::RateLimited,
            (500.., _) => Error::Server { status, detail },
            (404, _) => Error::NotFound { detail },
            (400, "Member In Compliance State") => Error::ComplianceState { detail },
            (400, "Forgotten Email Not Subscribed") => Error::ForgottenEmail { detail },
            (400, "Member Exists") => Error::MemberExists { detail },
            (400, "Invalid Resource") => Error::InvalidResource { detail },
            _ => Error::Api {
                status,
                title: problem.title,
                detail,
            },
        }
    }
}

/// Mailchimp's `application/problem+json` body; only the fields we branch on.
#[derive(Debug, Deserialize)]
struct Problem {
    #[serde(default)]
    title: String,
    #[serde(default)]
    detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_problem_titles() {
        let body = br#"{"type":"t","title":"Member In Compliance State","status":400,"detail":"x","instance":"i"}"#;
        assert!(matches!(
            Error::from_response(400, body),
            Error::ComplianceState { .. }
        ));
        let body = br#"{"type":"t","title":"Resource Not Found","status":404,"detail":"x","instance":"i"}"#;
        assert!(matches!(
            Error::from_response(404, body),
            Error::NotFound { .. }
        ));
        assert!(!Error::from_response(404, body).is_retryable());
    }

    #[test]
    fn treats_bodiless_403_and_429_as_retryable_throttling() {
        assert!(matches!(Error::from_response(403, b""), Error::RateLimited));
        assert!(Error::from_response(429, b"").is_retryable());
        assert!(Error::from_response(503, b"<html>").is_retryable());
        let body = br#"{"type":"t","title":"Forbidden","status":403,"detail":"x","instance":"i"}"#;
        assert!(!Error::from_response(403, body).is_retryable());
    }
}
