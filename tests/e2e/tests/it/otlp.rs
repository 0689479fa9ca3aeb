//! An OTLP/gRPC trace receiver run by a test: the services export to it through the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, and the test reads every span it was sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use optout_e2e::eventually;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Request, Response, Status};

/// A span with the `service.name` of the process that sent it, and its resource attributes.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) service: String,
    pub(crate) resource: Vec<KeyValue>,
    pub(crate) span: Span,
}

/// An OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Debug, Default)]
pub(crate) struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub(crate) struct RunningReceiver {
    pub(crate) receiver: Receiver,
    pub(crate) address: SocketAddr,
    _stop: DropGuard,
}

impl Receiver {
    /// Serves a fresh receiver on an ephemeral port.
    pub(crate) async fn start() -> Result<RunningReceiver> {
        let receiver = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async move { stopped.cancelled().await },
                ),
        );
        Ok(RunningReceiver {
            receiver,
            address,
            _stop: stop.drop_guard(),
        })
    }

    /// Every span received so far.
    pub(crate) fn spans(&self) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl RunningReceiver {
    /// The environment that points a service's exporter here, flushing every 100 ms.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
                format!("http://{}", self.address),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        ]
    }
}

impl RunningReceiver {
    /// Waits (30 s at most) for a complete trace holding a span called `name` that started after
    /// `after_nanos` (Unix time), and returns its spans. Spans are exported as they end, parents
    /// after their children: a trace is complete once it has a root and every parent it names
    /// has arrived.
    pub(crate) async fn complete_trace(
        &self,
        name: &str,
        after_nanos: u64,
    ) -> Result<Vec<Received>> {
        eventually(
            Duration::from_secs(30),
            &format!("a complete trace with {name}"),
            || {
                let spans = self.receiver.spans();
                async move {
                    let anchors = spans.iter().filter(|received| {
                        received.span.name == name
                            && received.span.start_time_unix_nano > after_nanos
                    });
                    for anchor in anchors {
                        let trace: Vec<Received> = spans
                            .iter()
                            .filter(|received| received.span.trace_id == anchor.span.trace_id)
                            .cloned()
                            .collect();
                        let ids: Vec<&[u8]> = trace
                            .iter()
                            .map(|received| received.span.span_id.as_slice())
                            .collect();
                        let has_root = trace
                            .iter()
                            .any(|received| received.span.parent_span_id.is_empty());
                        let parents_arrived = trace.iter().all(|received| {
                            received.span.parent_span_id.is_empty()
                                || ids.contains(&received.span.parent_span_id.as_slice())
                        });
                        if has_root && parents_arrived {
                            return Ok(Ok(trace));
                        }
                    }
                    Ok(Err(format!("{} spans so far", spans.len())))
                }
            },
        )
        .await
    }
}

/// A string (or integer, as text) attribute.
pub(crate) fn string_value(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    match value {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(number) => Some(number.to_string()),
        _ => None,
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|resource| resource.attributes)
                .unwrap_or_default();
            let service = string_value(&resource, "service.name").unwrap_or_default();
            for scope in resource_spans.scope_spans {
                received.extend(scope.spans.into_iter().map(|span| Received {
                    service: service.clone(),
                    resource: resource.clone(),
                    span,
                }));
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(received);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}
