"""What the pipeline executors sent, for the tests that assert how queries were grouped."""

from __future__ import annotations

from typing import Any

import pytest


def batch_sizes(monkeypatch: pytest.MonkeyPatch, executor: type, method: str) -> list[int]:
    """A list that records the number of queries of every batch ``executor.method``
    (an async ``method(self, queries)``) sends from now on, for the test's duration."""
    sizes: list[int] = []
    original = getattr(executor, method)

    async def send(self: Any, queries: list[Any]) -> Any:
        sizes.append(len(queries))
        return await original(self, queries)

    monkeypatch.setattr(executor, method, send)
    return sizes
