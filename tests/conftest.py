"""Test-wide settings: no on-disk concept cache unless a test asks for one (the CLI would default to ~/.cache)."""
import pytest


@pytest.fixture(autouse=True)
def _no_user_concept_cache(monkeypatch):
    monkeypatch.setenv("T2C_CACHE_DIR", "")
