"""A job's trace across processes: the API's submit span, the W3C trace context in the Celery task
headers, the worker's spans under it (docs/observability.md).

Only the OpenTelemetry API is used here (light, and a FastAPI dependency anyway). Until a process
installs a tracer provider (`tokenmill/tracing.py`, when an OTLP endpoint is set) every call is the
API's no-op: `enabled()` is False and callers skip the work of building spans.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager

from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import ProxyTracerProvider, Span, SpanKind

TRACER = "tokenmill"
__all__ = ["SpanKind", "carrier", "child", "current", "enabled", "end", "flush", "in_trace", "past_span", "start_span"]


def enabled() -> bool:
    """Whether this process exports traces (a tracer provider was installed)."""
    return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider)


def start_span(name: str, parent: Mapping[str, str] | None = None, *, kind: SpanKind = SpanKind.INTERNAL,
               start_s: float | None = None, attributes: dict[str, Any] | None = None) -> Span:
    """A span under the trace context ``parent`` carries (a task's headers, an HTTP request's
    headers; None: the current span), started at ``start_s`` (wall clock) or now."""
    context = extract(dict(parent)) if parent is not None else None
    start = int(start_s * 1e9) if start_s is not None else None
    return trace.get_tracer(TRACER).start_span(name, context=context, kind=kind, start_time=start,
                                               attributes=attributes)


def carrier(span: Span) -> dict[str, str]:
    """The W3C headers (``traceparent``) that make a span the parent of work elsewhere."""
    out: dict[str, str] = {}
    inject(out, context=trace.set_span_in_context(span))
    return out


def end(span: Span, end_s: float | None = None) -> None:
    """Ends a span at ``end_s`` (wall clock) or now."""
    span.end(end_time=int(end_s * 1e9) if end_s is not None else None)


def in_trace() -> bool:
    """Whether the current context has a span that records (work under a traced job)."""
    return trace.get_current_span().is_recording()


def child(name: str, **attributes: Any) -> ContextManager[Any]:
    """A child span of the current one for the body; nothing when the current context is not
    traced (an untraced task makes no root spans of its own)."""
    if not in_trace():
        return nullcontext()
    return trace.get_tracer(TRACER).start_as_current_span(name, attributes=attributes or None)


def past_span(name: str, start_s: float, end_s: float, parent: Span | None = None, **attributes: Any) -> Span | None:
    """A child of ``parent`` (default: the current span) that ran from ``start_s`` to ``end_s``
    (wall clock), recorded after the fact; None when the current context is not traced."""
    if not in_trace():
        return None
    context = trace.set_span_in_context(parent) if parent is not None else None
    span = trace.get_tracer(TRACER).start_span(name, context=context, start_time=int(start_s * 1e9),
                                               attributes=attributes or None)
    span.end(end_time=int(max(end_s, start_s) * 1e9))
    return span


@contextmanager
def current(span: Span) -> Iterator[Span]:
    """Makes ``span`` the current one for the body, and ends it after."""
    with trace.use_span(span, end_on_exit=True):
        yield span


def flush(timeout_s: float = 5.0) -> None:
    """Sends the spans still batched (a process on its way out: uvicorn ends by re-raising the
    signal it caught, so exit hooks never run)."""
    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        force_flush(int(timeout_s * 1000))
