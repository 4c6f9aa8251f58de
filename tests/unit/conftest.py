"""Unit tests never see the developer's LOGPIPE_* environment, /etc/logpipe, or a journal stream
(JOURNAL_STREAM) inherited from the session that runs them."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_logpipe_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LOGPIPE_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
