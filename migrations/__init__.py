"""Alembic migrations of tokenmill's store (configured in code by ``store.migrate``)."""
