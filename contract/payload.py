"""The ``request`` a job stores: what the worker reads back from the store to run it."""

from __future__ import annotations

from typing import Any


def job_payload(*, prompt: str | list[int] | None = None, messages: list[dict[str, Any]] | None = None,
                params: dict[str, Any] | None = None, stream: bool = False) -> dict[str, Any]:
    """The `request` a job stores: exactly one of prompt / messages, sampling params (fields of
    `contract.sampling.SamplingFields`, already validated by the sender), and whether to stream
    its text."""
    if (prompt is None) == (messages is None):
        raise ValueError("a job needs exactly one of prompt or messages")
    body: dict[str, Any] = {"params": dict(params or {}), "stream": bool(stream)}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = messages
    return body
