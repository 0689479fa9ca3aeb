//! Bearer tokens on gRPC: checked on the Admin service, attached to calls to the evaluator.

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::{Error, Result};

/// Server side: rejects calls without `authorization: Bearer <admin token>`.
#[derive(Clone)]
pub(crate) struct RequireBearer {
    expected: Arc<SecretString>,
}

impl RequireBearer {
    pub(crate) fn new(token: SecretString) -> Self {
        Self {
            expected: Arc::new(token),
        }
    }
}

impl fmt::Debug for RequireBearer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RequireBearer")
            .finish_non_exhaustive()
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Constant-time, so response timing does not reveal how much of a guess was right.
        let matches: bool = presented
            .as_bytes()
            .ct_eq(self.expected.expose_secret().as_bytes())
            .into();
        if matches && !presented.is_empty() {
            Ok(request)
        } else {
            Err(Status::unauthenticated("missing or invalid bearer token"))
        }
    }
}

/// Client side: adds the bearer token to every call.
#[derive(Clone)]
pub(crate) struct AttachBearer {
    value: AsciiMetadataValue,
}

impl AttachBearer {
    pub(crate) fn new(token: &SecretString) -> Result<Self> {
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", token.expose_secret()))
                .map_err(|_| Error::Config("the evaluator token must be printable ASCII".into()))?;
        // Keeps the header out of any debug output of the request.
        value.set_sensitive(true);
        Ok(Self { value })
    }
}

impl fmt::Debug for AttachBearer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("AttachBearer")
            .finish_non_exhaustive()
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
