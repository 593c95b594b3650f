"""Stored jobs as API answers: the job object, and OpenAI's completion, chat completion, stream
chunk and batch output line shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from api.registry import ModelRegistry
from store.models import Job as JobRow
from store.models import WebhookDelivery
from store.models import Result as ResultRow
from store.models import Usage as UsageRow


def unix(when: datetime | None) -> int | None:
    """Seconds since the epoch (OpenAI's timestamps)."""
    return None if when is None else int(when.timestamp())


def finish_reason(reason: str | None) -> str:
    """The engine's finish reason in OpenAI's terms (stop or length)."""
    return "length" if reason == "length" else "stop"


def job_summary(job: JobRow) -> dict[str, Any]:
    """The fields of a job every answer shows."""
    error = None
    if job.error_code or job.status in ("failed", "expired", "cancelled"):
        default = {"cancelled": "the job was cancelled", "expired": "the job expired before it finished"}
        error = {"code": job.error_code or job.status,
                 "message": job.error_message or default.get(job.status, "the job failed")}
    return {
        "id": job.id, "object": "job", "model": job.model, "status": job.status, "kind": job.kind,
        "priority": job.priority, "attempts": job.attempts, "created_at": job.created_at,
        "started_at": job.started_at, "finished_at": job.finished_at, "expires_at": job.expires_at,
        "batch_id": job.batch_id, "custom_id": job.custom_id, "idempotency_key": job.idempotency_key,
        "error": error,
    }


def webhook_view(delivery: WebhookDelivery | None, url: str | None, status: str | None) -> dict[str, Any] | None:
    """The ``webhook`` field of a job or batch: where it goes and how its delivery stands."""
    if url is None:
        return None
    return {"url": url, "status": status,
            "attempts": delivery.attempts if delivery else 0,
            "last_status_code": delivery.last_status_code if delivery else None,
            "last_error": delivery.last_error if delivery else None,
            "delivered_at": delivery.delivered_at if delivery else None,
            "next_attempt_at": delivery.next_attempt_at if delivery and delivery.status == "pending" else None}


def usage_dict(usage: UsageRow | None) -> dict[str, int] | None:
    """A job's token counts."""
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def job_full(job: JobRow, result: ResultRow | None, usage: UsageRow | None,
             delivery: WebhookDelivery | None = None) -> dict[str, Any]:
    """A job with its request, result, usage, timings and webhook delivery."""
    out = job_summary(job)
    out["webhook"] = webhook_view(delivery, job.webhook_url, job.webhook_status)
    out["request"] = job.request
    out["result"] = None if result is None else {
        "output_text": result.output_text, "finish_reason": result.finish_reason,
        "token_ids": result.token_ids, "logprobs": result.logprobs, "choices": result.choices,
    }
    out["usage"] = usage_dict(usage)
    out["timings"] = None if usage is None else {
        "queue_ms": usage.queue_ms, "ttft_ms": usage.ttft_ms, "total_ms": usage.total_ms,
    }
    return out


def openai_usage(usage: UsageRow | None) -> dict[str, Any] | None:
    """OpenAI's usage object."""
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def _choices(result: ResultRow) -> list[dict[str, Any]]:
    """Every completion of a result: its n choices, or the one its columns hold."""
    if result.choices:
        return list(result.choices)
    return [{"index": 0, "text": result.output_text, "finish_reason": result.finish_reason,
             "token_ids": result.token_ids, "logprobs": result.logprobs}]


def _token_text(registry: ModelRegistry, model: str) -> Any:
    served = registry.get(model)
    return (lambda i: served.token_text(i)) if served is not None else (lambda i: f"<{i}>")


def _completion_logprobs(logprobs: list[Any] | None, text: Any) -> dict[str, Any] | None:
    if not logprobs:
        return None
    tokens, lps, tops, offsets, at = [], [], [], [], 0
    for lp in logprobs:
        token = text(int(lp["token_id"]))
        tokens.append(token)
        lps.append(float(lp["logprob"]))
        tops.append({text(int(t[0])): float(t[1]) for t in lp.get("top") or []})
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(logprobs: list[Any] | None, text: Any) -> dict[str, Any] | None:
    if not logprobs:
        return None
    content = []
    for lp in logprobs:
        token = text(int(lp["token_id"]))
        tops = [{"token": text(int(t[0])), "logprob": float(t[1]), "bytes": list(text(int(t[0])).encode())}
                for t in lp.get("top") or []]
        content.append({"token": token, "logprob": float(lp["logprob"]), "bytes": list(token.encode()),
                        "top_logprobs": tops})
    return {"content": content}


def completion(job: JobRow, result: ResultRow, usage: UsageRow | None, registry: ModelRegistry) -> dict[str, Any]:
    """A succeeded job as an OpenAI text completion (one choice per completion, n in all)."""
    text = _token_text(registry, job.model)
    return {
        "id": job.id, "object": "text_completion", "created": unix(job.created_at), "model": job.model,
        "choices": [{"text": c["text"], "index": c["index"], "finish_reason": finish_reason(c["finish_reason"]),
                     "logprobs": _completion_logprobs(c.get("logprobs"), text)} for c in _choices(result)],
        "usage": openai_usage(usage), "system_fingerprint": None,
    }


def chat_completion(job: JobRow, result: ResultRow, usage: UsageRow | None,
                    registry: ModelRegistry) -> dict[str, Any]:
    """A succeeded job as an OpenAI chat completion (one choice per completion, n in all)."""
    text = _token_text(registry, job.model)
    return {
        "id": job.id, "object": "chat.completion", "created": unix(job.created_at), "model": job.model,
        "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                     "finish_reason": finish_reason(c["finish_reason"]),
                     "logprobs": _chat_logprobs(c.get("logprobs"), text)} for c in _choices(result)],
        "usage": openai_usage(usage), "system_fingerprint": None,
    }


def answer_for(job: JobRow, result: ResultRow, usage: UsageRow | None, registry: ModelRegistry) -> dict[str, Any]:
    """The OpenAI object for a succeeded job, by the endpoint its request came from."""
    if (job.request or {}).get("api") == "chat" or "messages" in (job.request or {}):
        return chat_completion(job, result, usage, registry)
    return completion(job, result, usage, registry)


def chunk(job_id: str, model: str, created: int, *, chat: bool, text: str | None,
          finish: str | None = None, role: bool = False) -> dict[str, Any]:
    """One server-sent event chunk in OpenAI's streaming shape."""
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"id": job_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {"id": job_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(job_id: str, model: str, created: int, *, chat: bool, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The last chunk when the client asked for ``stream_options.include_usage``."""
    return {"id": job_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "system_fingerprint": None, "choices": [], "usage": usage}
