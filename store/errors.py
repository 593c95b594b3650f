"""Errors the store raises. Each message says what was wrong and what is allowed."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class NotFound(StoreError):
    """The row does not exist, or belongs to another tenant (the two are indistinguishable)."""


class Conflict(StoreError):
    """The write would break a uniqueness rule (a tenant name taken, a duplicate custom_id)."""


class InvalidTransition(StoreError):
    """A status change that the lifecycle does not allow (e.g. a completed batch cannot start)."""
