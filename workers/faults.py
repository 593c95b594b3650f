"""Test-only fault injection: a worker that crashes on a marked prompt, as it would on a CUDA error.

Off unless `TOKENMILL_FAULT_CRASH_MARKER` is set (read in `tokenmill.settings`, passed down as a
plain string). The reliability tests use it to make a poison job out of real components: the engine
loop raises `InjectedFault` right after the first step that a request whose prompt holds the marker
joined, and the worker goes down through its real crash path (crash evidence recorded, exit code 70,
tasks left unacknowledged for another worker).
"""

from __future__ import annotations

from typing import Any


class InjectedFault(RuntimeError):
    """The crash that the fault-injection marker asked for."""


def has_marker(prompt: Any, messages: Any, marker: str) -> bool:
    """Whether a request's text prompt, or the text of one of its messages, contains ``marker``."""
    if not marker:
        return False
    if isinstance(prompt, str):
        return marker in prompt
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else part
            if isinstance(text, str) and marker in text:
                return True
    return False
