"""Tenants and API keys."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from store import Conflict, NotFound, Store
from store.models import ApiKey


def test_key_is_shown_once_and_only_its_hash_is_stored(store: Store, tenant_id: str) -> None:
    key, plaintext = store.keys.create_key(tenant_id, name="ci")
    assert plaintext.startswith("tm-") and len(plaintext) > 40
    with store.db.read() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.id == key.id))
    assert row is not None
    assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
    assert not any(plaintext in value for value in stored)
    assert plaintext.startswith(row.prefix)

    found = store.keys.authenticate(plaintext)
    assert found is not None and found.id == key.id and found.tenant_id == tenant_id


def test_unknown_and_malformed_keys_do_not_authenticate(store: Store, tenant_id: str) -> None:
    _, plaintext = store.keys.create_key(tenant_id)
    assert store.keys.authenticate(plaintext + "x") is None
    assert store.keys.authenticate("") is None
    assert store.keys.authenticate("Bearer " + plaintext) is None


def test_revoked_key_no_longer_authenticates(store: Store, tenant_id: str) -> None:
    key, plaintext = store.keys.create_key(tenant_id)
    kept, kept_plain = store.keys.create_key(tenant_id)
    assert store.keys.revoke_key(tenant_id, key.id) is True
    assert store.keys.revoke_key(tenant_id, key.id) is False
    assert store.keys.authenticate(plaintext) is None
    assert store.keys.authenticate(kept_plain) is not None
    assert [k.id for k in store.keys.list_keys(tenant_id)] == [kept.id]
    assert {k.id for k in store.keys.list_keys(tenant_id, include_revoked=True)} == {key.id, kept.id}


def test_a_tenant_cannot_revoke_or_list_another_tenants_key(store: Store, tenant_id: str, other_tenant_id: str) -> None:
    key, plaintext = store.keys.create_key(tenant_id)
    assert store.keys.revoke_key(other_tenant_id, key.id) is False
    assert store.keys.list_keys(other_tenant_id) == []
    assert store.keys.authenticate(plaintext) is not None


def test_tenant_names_are_unique(store: Store, tenant_id: str) -> None:
    with pytest.raises(Conflict, match="already exists"):
        store.keys.create_tenant("acme")
    assert store.keys.tenant_by_name("acme").id == tenant_id  # type: ignore[union-attr]
    assert store.keys.get_tenant(tenant_id).name == "acme"  # type: ignore[union-attr]


def test_a_key_needs_an_existing_tenant(store: Store) -> None:
    with pytest.raises(NotFound, match="create it first"):
        store.keys.create_key("ten_missing")
