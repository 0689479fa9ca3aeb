//! Bearer tokens on gRPC: [`RequireBearer`] guards the Admin and domain services, [`AttachBearer`] adds the
//! token to outgoing calls. Health and reflection are registered without the interceptor, so probes and
//! tools like grpcurl can reach them without a token.

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::{Error, Result};

/// The one answer to a missing, malformed or wrong bearer token.
pub const UNAUTHENTICATED: &str = "missing or invalid bearer token";

/// Server side: rejects calls without `authorization: Bearer <token>` with `UNAUTHENTICATED`.
#[derive(Clone)]
pub struct RequireBearer {
    expected: Arc<SecretString>,
}

impl RequireBearer {
    /// Accepts calls that carry `token`.
    pub fn new(token: SecretString) -> Self {
        Self {
            expected: Arc::new(token),
        }
    }

    /// Whether `authorization` (the header's value) carries the expected token.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        let presented = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Constant time, so response timing does not tell how much of a guess was right.
        let matches: bool = presented
            .as_bytes()
            .ct_eq(self.expected.expose_secret().as_bytes())
            .into();
        matches && !presented.is_empty()
    }
}

impl fmt::Debug for RequireBearer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("RequireBearer([REDACTED])")
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization");
        // A missing token and a wrong one get the same answer: nothing tells a caller which.
        if self.accepts(header.and_then(|value| value.to_str().ok())) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(UNAUTHENTICATED))
        }
    }
}

/// Client side: adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct AttachBearer {
    value: AsciiMetadataValue,
}

impl AttachBearer {
    /// Fails when the token cannot be a header value.
    pub fn new(token: &SecretString) -> Result<Self> {
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", token.expose_secret()))
                .map_err(|_| Error::InvalidToken)?;
        // Keeps the header out of any debug output of the request.
        value.set_sensitive(true);
        Ok(Self { value })
    }
}

impl fmt::Debug for AttachBearer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("AttachBearer([REDACTED])")
    }
}

impl Interceptor for AttachBearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.value.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_status(auth: &mut RequireBearer, header: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().expect("ascii header"));
        }
        auth.call(request).map(drop)
    }

    fn call(auth: &mut RequireBearer, header: Option<&str>) -> Result<(), tonic::Code> {
        call_status(auth, header).map_err(|status| status.code())
    }

    #[test]
    fn a_missing_token_and_a_wrong_one_get_the_same_answer() {
        let mut auth = RequireBearer::new(SecretString::from("s3cret"));
        let answers: Vec<(tonic::Code, String)> = [None, Some("Bearer wrong"), Some("garbage")]
            .into_iter()
            .map(|header| {
                let status = call_status(&mut auth, header).expect_err("refused");
                (status.code(), status.message().to_owned())
            })
            .collect();
        assert!(
            answers.windows(2).all(|pair| pair[0] == pair[1]),
            "{answers:?}"
        );
        assert_eq!(answers[0].1, UNAUTHENTICATED);
    }

    #[test]
    fn accepts_only_the_exact_bearer_token() {
        let mut auth = RequireBearer::new(SecretString::from("s3cret"));
        assert_eq!(call(&mut auth, Some("Bearer s3cret")), Ok(()));
        for wrong in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer "),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            assert_eq!(
                call(&mut auth, wrong),
                Err(tonic::Code::Unauthenticated),
                "{wrong:?}"
            );
        }
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let token = SecretString::from("s3cret");
        let text = format!(
            "{:?} {:?}",
            RequireBearer::new(token.clone()),
            AttachBearer::new(&token).expect("ascii")
        );
        assert!(!text.contains("s3cret"), "{text}");
    }

    #[test]
    fn attached_token_is_accepted_by_the_server_side() {
        let token = SecretString::from("abc");
        let mut attach = AttachBearer::new(&token).expect("ascii");
        let request = attach.call(Request::new(())).expect("attach");
        let mut require = RequireBearer::new(token);
        assert!(require.call(request).is_ok());
    }
}
