//! The one error type of the client, classified once into retryable and permanent.

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to Salesforce.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token endpoint refused the credentials (`{"error","error_description"}`).
    #[error("salesforce authentication failed: {error}: {description}")]
    Auth {
        /// OAuth error code, e.g. `invalid_client`.
        error: String,
        /// Salesforce's description.
        description: String,
    },
    /// 401 `INVALID_SESSION_ID` even after getting a fresh token.
    #[error("salesforce session expired or invalid")]
    InvalidSession,
    /// 403 `REQUEST_LIMIT_EXCEEDED`: the org's API allocation (or concurrency limit) is used up.
    /// Not retried within a call: the caller decides when to come back.
    #[error("salesforce api request limit exceeded: {message}")]
    RequestLimitExceeded {
        /// Salesforce's message.
        message: String,
    },
    /// `UNABLE_TO_LOCK_ROW`: another transaction holds the record; retry later.
    #[error("unable to obtain exclusive access to the record")]
    UnableToLockRow,
    /// `CANNOT_UPDATE_CONVERTED_LEAD`.
    #[error("cannot update a converted lead")]
    ConvertedLead,
    /// `INVALID_FIELD`: a field the org does not have (e.g. Person Account fields).
    #[error("invalid field: {message}")]
    InvalidField {
        /// Salesforce's message.
        message: String,
    },
    /// `MALFORMED_QUERY`.
    #[error("malformed query: {message}")]
    MalformedQuery {
        /// Salesforce's message.
        message: String,
    },
    /// Any other error answer.
    #[error("salesforce api error {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// `errorCode`.
        code: String,
        /// `message`.
        message: String,
    },
    /// 5xx: Salesforce is unavailable or overloaded.
    #[error("salesforce server error {status}")]
    Server {
        /// HTTP status.
        status: u16,
    },
    /// Connecting, sending or receiving failed, or the request timed out.
    #[error("salesforce transport error: {0}")]
    Transport(#[source] reqwest::Error),
    /// A response that does not have the expected shape.
    #[error("failed to decode salesforce response: {0}")]
    Decode(String),
    /// The configuration cannot work (unreadable CA file, bad private key).
    #[error("invalid salesforce client configuration: {0}")]
    Config(String),
    /// A Bulk API job ended `Failed` or `Aborted`, or did not finish in time.
    #[error("bulk job {job_id} ended in state {state}: {message}")]
    BulkJob {
        /// The job id.
        job_id: String,
        /// The last state seen.
        state: String,
        /// `errorMessage` of the job.
        message: String,
    },
}

impl Error {
    /// Whether trying again later may succeed: 5xx, `UNABLE_TO_LOCK_ROW`, transport errors and
    /// timeouts. `REQUEST_LIMIT_EXCEEDED` is not: waiting seconds does not restore a daily budget.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Server { .. } | Error::UnableToLockRow | Error::Transport(_) => true,
            Error::Api { status, .. } => *status == 408 || *status == 429,
            _ => false,
        }
    }

    /// Builds the error for a non-success REST answer. Total: any bytes give an error value
    /// (fuzzed in `crates/fuzz-targets`).
    pub fn from_response(status: u16, body: &[u8]) -> Error {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Body {
            #[serde(default)]
            message: String,
            #[serde(default)]
            error_code: String,
        }
        let first = serde_json::from_slice::<Vec<Body>>(body)
            .ok()
            .and_then(|errors| errors.into_iter().next());
        let (code, message) = match first {
            Some(first) => (first.error_code, first.message),
            None => (
                String::new(),
                String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
            ),
        };
        match code.as_str() {
            _ if status == 401 => Error::InvalidSession,
            "REQUEST_LIMIT_EXCEEDED" => Error::RequestLimitExceeded { message },
            "UNABLE_TO_LOCK_ROW" => Error::UnableToLockRow,
            "CANNOT_UPDATE_CONVERTED_LEAD" => Error::ConvertedLead,
            "INVALID_FIELD" => Error::InvalidField { message },
            "MALFORMED_QUERY" => Error::MalformedQuery { message },
            _ if status >= 500 => Error::Server { status },
            _ => Error::Api {
                status,
                code,
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_error_bodies() {
        let limit = Error::from_response(403, br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#);
        assert!(matches!(limit, Error::RequestLimitExceeded { .. }));
        assert!(!limit.is_retryable());
        assert!(Error::from_response(503, b"<html>down</html>").is_retryable());
        assert!(matches!(
            Error::from_response(401, b"[]"),
            Error::InvalidSession
        ));
        let field = Error::from_response(
            400,
            br#"[{"message":"No such column","errorCode":"INVALID_FIELD"}]"#,
        );
        assert!(matches!(field, Error::InvalidField { .. }));
        assert!(!field.is_retryable());
    }
}
