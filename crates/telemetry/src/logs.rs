//! The JSON log line: one object per event with the OpenTelemetry `trace_id` and `span_id` of the
//! span it happened in, so a log search jumps straight to the trace.

use std::{fmt, sync::OnceLock};

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::{
    Event, Subscriber,
    dispatcher::WeakDispatch,
    field::{Field, Visit},
};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// The dispatch [`JsonWithTrace`] formats for, set once it is installed.
pub(crate) static LOG_DISPATCH: OnceLock<WeakDispatch> = OnceLock::new();

/// Formats events as `{"timestamp","level","target","fields":{..},"span","spans","trace_id","span_id"}`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct JsonWithTrace;

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".to_owned(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".to_owned(), Value::from(metadata.level().as_str()));
        line.insert("target".to_owned(), Value::from(metadata.target()));
        let mut fields = FieldVisitor::default();
        event.record(&mut fields);
        line.insert("fields".to_owned(), Value::Object(fields.0));

        let current = event
            .parent()
            .and_then(|id| context.span(id))
            .or_else(|| context.lookup_current());
        if let Some(span) = current {
            line.insert("span".to_owned(), Value::from(span.name()));
            let names: Vec<Value> = span
                .scope()
                .from_root()
                .map(|ancestor| Value::from(ancestor.name()))
                .collect();
            line.insert("spans".to_owned(), Value::Array(names));
            // Inside event dispatch `Span::current()` is unavailable (the dispatcher is busy), so the
            // OpenTelemetry context is looked up through the dispatch that owns this span.
            let otel = LOG_DISPATCH
                .get()
                .and_then(WeakDispatch::upgrade)
                .and_then(|dispatch| {
                    tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)
                });
            if let Some(otel) = otel {
                let otel_span = otel.span();
                let span_context = otel_span.span_context();
                if span_context.is_valid() {
                    line.insert(
                        "trace_id".to_owned(),
                        Value::from(span_context.trace_id().to_string()),
                    );
                    line.insert(
                        "span_id".to_owned(),
                        Value::from(span_context.span_id().to_string()),
                    );
                }
            }
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writer.write_str(&text)?;
        writer.write_str("\n")
    }
}

/// Collects an event's fields as JSON values.
#[derive(Default)]
struct FieldVisitor(Map<String, Value>);

impl Visit for FieldVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::from(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'writer> MakeWriter<'writer> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'writer self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_their_span() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonWithTrace)
                    .with_writer(buffer.clone()),
            );
        let dispatch = tracing::Dispatch::new(subscriber);
        drop(LOG_DISPATCH.set(dispatch.downgrade()));
        tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("work");
            span.in_scope(|| tracing::info!(answer = 42, "inside"));
            tracing::info!("outside");
        });
        let text = String::from_utf8(buffer.0.lock().expect("buffer").clone()).expect("utf-8");
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["fields"]["answer"], 42);
        assert_eq!(lines[0]["span"], "work");
        assert_eq!(
            lines[0]["trace_id"].as_str().map(str::len),
            Some(32),
            "{text}"
        );
        assert_eq!(
            lines[0]["span_id"].as_str().map(str::len),
            Some(16),
            "{text}"
        );
        assert!(lines[1].get("trace_id").is_none(), "{text}");
    }
}
