"""Turning tracing on in a process: an OpenTelemetry tracer provider that sends spans to an OTLP/HTTP
collector, when `TOKENMILL_OTEL_ENDPOINT` (or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`) is set.
Needs the `otel` extra (`pip install 'tokenmill[otel]'`); without an endpoint nothing is loaded and
every span call is OpenTelemetry's no-op (docs/observability.md)."""

from __future__ import annotations


def traces_url(endpoint: str) -> str:
    """The traces URL of an OTLP/HTTP endpoint given as a base (``http://collector:4318``), as the
    OpenTelemetry variable is; a URL already ending in ``/v1/traces`` is kept."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def configure_tracing(endpoint: str, service_name: str) -> None:
    """Sends this process's spans to ``endpoint`` in batches, as ``service_name``."""
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise RuntimeError(f"an OpenTelemetry endpoint is set ({endpoint}) but the OpenTelemetry SDK is not "
                           f"installed ({e.name}): pip install 'tokenmill[otel]', or unset "
                           "TOKENMILL_OTEL_ENDPOINT and OTEL_EXPORTER_OTLP_ENDPOINT") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    trace.set_tracer_provider(provider)  # flushed at exit (the provider's own atexit hook)
