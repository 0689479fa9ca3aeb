//! W3C trace context over gRPC: an interceptor that puts the current span's context into the request
//! metadata, and the server span that continues it (`Server::builder().trace_fn(grpc::server_span)`).
//! Span names and attributes follow the OpenTelemetry RPC conventions (`rpc.system`, `rpc.service`,
//! `rpc.method`).

use opentelemetry::propagation::Injector;
use tonic::{
    Request, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    service::Interceptor,
};
use tracing::Span;

use crate::http::HeaderExtractor;

/// Writes into gRPC request metadata.
#[derive(Debug)]
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) else {
            return;
        };
        self.0.insert(key, value);
    }
}

/// Puts the current span's trace context into `metadata`.
pub fn inject_metadata(metadata: &mut MetadataMap) {
    crate::inject(&mut MetadataInjector(metadata));
}

/// A client interceptor adding `traceparent` (and `tracestate`) from the current span.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceInterceptor;

impl Interceptor for TraceInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject_metadata(request.metadata_mut());
        Ok(request)
    }
}

/// Another interceptor (e.g. one attaching a bearer token) with the trace context added in front.
#[derive(Clone, Debug)]
pub struct WithTrace<I>(pub I);

impl<I: Interceptor> Interceptor for WithTrace<I> {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        inject_metadata(request.metadata_mut());
        self.0.call(request)
    }
}

/// Splits `/package.Service/Method` into service and method.
fn service_and_method(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// The server span of one gRPC request, a child of the caller's span when the request carries
/// `traceparent`. Health checks and reflection get no span: probes would drown the traces.
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    let (service, method) = service_and_method(path);
    if service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.") {
        return Span::none();
    }
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    crate::set_remote_parent(&span, crate::extract(&HeaderExtractor(request.headers())));
    span
}

/// The client span of one gRPC call to `service` (`package.Service`) and `method`; the interceptor then
/// propagates it when the call runs inside it (`.instrument(span)`).
pub fn client_span(service: &str, method: &str) -> Span {
    tracing::info_span!(
        "grpc.client",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            service_and_method("/optout.evaluator.v1.Decisions/Decide"),
            ("optout.evaluator.v1.Decisions", "Decide")
        );
        assert_eq!(service_and_method("/odd"), ("odd", ""));
    }
}
