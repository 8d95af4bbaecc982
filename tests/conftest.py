import pytest


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh directory so runs/ lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
