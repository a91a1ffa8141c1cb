//! W3C trace context that travels with each event, from the producer's span to the consumer's.
//!
//! An event carries its trace context in two headers, `traceparent` and `tracestate`
//! ([W3C Trace Context](https://www.w3.org/TR/trace-context/)). Every publisher copies the event's
//! headers into the broker's message headers or attributes, so the context reaches consumers on
//! every kind without anything specific to tracing in the publishers.
//!
//! With the `otel` feature (OpenTelemetry through `tracing-opentelemetry`):
//! - [`Outbox::enqueue`](crate::Outbox::enqueue) stores the context of the span active when it runs
//!   ([`capture`]), unless the producer set a `traceparent` header itself;
//! - the relay's `publish` span is a `producer` span that links to the context of every event it
//!   publishes (the OpenTelemetry messaging conventions for batch sends);
//! - consumers continue the trace with [`continue_trace`] (the SQS consumer of `outbox-consumer`
//!   does it for each message).
//!
//! Without the feature the headers still travel; nothing is captured automatically.

use crate::event::Headers;

/// The header holding the W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// The header holding the W3C `tracestate` (vendor-specific entries), when there is one.
pub const TRACESTATE: &str = "tracestate";

/// Adds the trace context of the current `tracing` span to `headers`, unless they already carry a
/// `traceparent` (the producer's own choice wins). Returns whether a context was added.
///
/// A no-op without the `otel` feature, or when no OpenTelemetry layer records the current span.
pub fn capture(headers: &mut Headers) -> bool {
    if headers.contains_key(TRACEPARENT) {
        return false;
    }
    #[cfg(feature = "otel")]
    {
        if let Some((parent, state)) = otel::current() {
            headers.insert(TRACEPARENT.to_owned(), parent);
            if let Some(state) = state {
                headers.insert(TRACESTATE.to_owned(), state);
            }
            return true;
        }
    }
    false
}

/// Makes `span` a child of the trace that a message's headers carry, as a consumer's processing
/// span continues the producer's trace. Returns whether there was a context to continue (always
/// `false` without the `otel` feature).
///
/// `header` looks a header up by name in whatever the broker's client hands over, e.g.
/// `|name| headers.get(name).map(String::as_str)`.
pub fn continue_trace<'a>(
    span: &tracing::Span,
    header: impl FnMut(&str) -> Option<&'a str>,
) -> bool {
    #[cfg(feature = "otel")]
    return otel::continue_trace(span, header);
    #[cfg(not(feature = "otel"))]
    {
        let _ = (span, header);
        false
    }
}

/// Links `span` (the relay's publish span) to the trace of each event that carries one, up to a
/// bound per span. A no-op without the `otel` feature.
pub fn link_events(span: &tracing::Span, events: &[crate::event::OutboxEvent]) {
    #[cfg(feature = "otel")]
    otel::link_events(span, events);
    #[cfg(not(feature = "otel"))]
    let _ = (span, events);
}

#[cfg(feature = "otel")]
pub use otel::span_context;

#[cfg(feature = "otel")]
mod otel {
    use std::str::FromStr;

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TRACEPARENT, TRACESTATE};
    use crate::event::OutboxEvent;

    /// The most links one publish span carries: a batch of thousands of events would make one span
    /// of thousands of links, which exporters truncate anyway.
    const MAX_LINKS: usize = 128;

    /// `traceparent` and `tracestate` of the current span, when it is recorded by OpenTelemetry.
    pub(super) fn current() -> Option<(String, Option<String>)> {
        let context = tracing::Span::current().context();
        let span = context.span();
        let span_context = span.span_context();
        if !span_context.is_valid() {
            return None;
        }
        let parent = format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        );
        let state = span_context.trace_state().header();
        Some((parent, (!state.is_empty()).then_some(state)))
    }

    /// The remote span context that an event's (or a message's) headers carry; `None` when there is
    /// no `traceparent` or it is malformed (a bad header never fails a delivery).
    pub fn span_context<'a>(
        mut header: impl FnMut(&str) -> Option<&'a str>,
    ) -> Option<SpanContext> {
        let parent = header(TRACEPARENT)?;
        let mut parts = parent.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may append fields after them.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if trace_id.len() != 32 || span_id.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let state = header(TRACESTATE)
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags) & TraceFlags::SAMPLED,
            true,
            state,
        );
        context.is_valid().then_some(context)
    }

    pub(super) fn continue_trace<'a>(
        span: &tracing::Span,
        header: impl FnMut(&str) -> Option<&'a str>,
    ) -> bool {
        match span_context(header) {
            Some(remote) => {
                let parent = opentelemetry::Context::new().with_remote_span_context(remote);
                span.set_parent(parent).is_ok()
            }
            None => false,
        }
    }

    pub(super) fn link_events(span: &tracing::Span, events: &[OutboxEvent]) {
        if span.is_disabled() {
            return;
        }
        let contexts = events
            .iter()
            .filter_map(|e| span_context(|name| e.headers.get(name).map(String::as_str)));
        for context in contexts.take(MAX_LINKS) {
            span.add_link(context);
        }
    }
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_valid_traceparent_is_read_and_a_malformed_one_is_ignored() {
        let good = headers(&[
            (
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            (TRACESTATE, "vendor=x"),
        ]);
        let context = span_context(|n| good.get(n).map(String::as_str)).expect("valid");
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(context.is_sampled() && context.is_remote());
        assert_eq!(context.trace_state().get("vendor"), Some("x"));
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            let h = headers(&[(TRACEPARENT, bad)]);
            assert!(
                span_context(|n| h.get(n).map(String::as_str)).is_none(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn capture_keeps_a_producers_own_traceparent() {
        let mut own = headers(&[(TRACEPARENT, "00-abc-def-01")]);
        assert!(!capture(&mut own));
        assert_eq!(own[TRACEPARENT], "00-abc-def-01");
    }
}
