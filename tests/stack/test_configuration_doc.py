"""docs/configuration.md names every setting of tokenmill/settings.py, by its variable."""

from __future__ import annotations

from dataclasses import fields

from stack_helpers import REPO
from tokenmill.settings import Settings


def test_configuration_doc_names_every_setting():
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [f"TOKENMILL_{f.name.upper()}" for f in fields(Settings) if f"`TOKENMILL_{f.name.upper()}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"
