"""A cancelled call's queries end promptly in the server even when the server drops its
first cancel request: PostgreSQL ignores a cancel that arrives before the backend has
read the query. Stopping the backend process (SIGSTOP) while the query waits in its
socket, cancelling, then resuming it (SIGCONT) reproduces that race every time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

import async_prefetch
from async_prefetch.execution import pool as executor
from async_prefetch.runtime import bridge
from tests.factories import seed_bookstore
from tests.run_state import discarded_connections, settle_pool, sleepers
from tests.server_time import SLEEPING
from tests.testapp.models import Book


def stop_idle_backends() -> list[int]:
    """SIGSTOP every idle client backend of the test database but this thread's own:
    the engine's pooled connections among them."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND state = 'idle'"
            " AND pid <> pg_backend_pid()"
        )
        pids = [pid for (pid,) in cursor.fetchall()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def resume(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # a terminated backend has exited
            os.kill(pid, signal.SIGCONT)


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that are still server processes."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)])
        return [pid for (pid,) in cursor.fetchall()]


async def warm_books() -> list[Any]:
    """Books, after a prefetch that leaves the engine's pool with idle connections."""
    await sync_to_async(seed_bookstore)()
    books: list[Any] = await sync_to_async(lambda: list(Book.objects.order_by("pk")))()
    await async_prefetch.aprefetch_related_objects(books, "pages")
    assert await bridge.run_async(settle_pool) == 0
    return books


@pytest.fixture
async def stopped() -> AsyncIterator[list[int]]:
    """Pids of backends stopped by the test; resumed at the end whatever happens."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        resume(pids)
        await async_prefetch.aclose()


async def cancel_while_stopped(books: list[Any], pids: list[int]) -> asyncio.Task[None]:
    """Start a prefetch whose query reaches a stopped backend, then cancel it."""
    pids += await sync_to_async(stop_idle_backends)()
    assert pids
    task = asyncio.ensure_future(async_prefetch.aprefetch_related_objects(books, SLEEPING))
    await asyncio.sleep(0.2)  # the query is in the stopped backend's socket
    assert not task.done()
    task.cancel()
    await asyncio.sleep(0.2)  # the first cancel request reached it (and is pending)
    assert not task.done()
    return task


async def wait_for_sleepers_gone() -> int:
    for _ in range(50):
        if not await sync_to_async(sleepers)():
            break
        await asyncio.sleep(0.02)
    return await sync_to_async(sleepers)()


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_cancel_dropped_by_the_server_is_sent_again(stopped: list[int]) -> None:
    """The backend handles the pending cancel before reading the query, so ignores it;
    a cancel re-sent once it runs the query ends it: the caller goes on promptly, nothing
    keeps sleeping in the server, the connection is back in the pool and kept."""
    books = await warm_books()
    discarded = await bridge.run_async(discarded_connections)
    task = await cancel_while_stopped(books, stopped)
    resume(stopped)
    resumed_at = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        await task
    waited = time.perf_counter() - resumed_at
    assert waited < 1.0, f"the caller went on {waited:.2f} s after the backend resumed"
    assert await sync_to_async(sleepers)() == 0
    assert await bridge.run_async(settle_pool) == 0
    assert await bridge.run_async(discarded_connections) == discarded


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_query_that_outlives_its_cancels_is_terminated(
    stopped: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that stays stopped past the cancel timeout: the caller goes on after
    the timeout, the connection is discarded, and the server process is terminated
    (it would otherwise run the query from its socket once resumed)."""
    monkeypatch.setattr(executor, "CANCEL_TIMEOUT", 0.5)
    books = await warm_books()
    discarded = await bridge.run_async(discarded_connections)
    task = await cancel_while_stopped(books, stopped)
    cancelled_at = time.perf_counter() - 0.2
    with pytest.raises(asyncio.CancelledError):
        await task
    waited = time.perf_counter() - cancelled_at
    assert waited < 0.5 + 1.5, f"the caller went on {waited:.2f} s after cancelling"
    assert await bridge.run_async(settle_pool) == 0
    assert await bridge.run_async(discarded_connections) == discarded + 1
    resume(stopped)
    for _ in range(50):  # the terminated backend exits once it runs again
        if len(await sync_to_async(alive)(stopped)) < len(stopped):
            break
        await asyncio.sleep(0.02)
    assert len(await sync_to_async(alive)(stopped)) == len(stopped) - 1
    assert await wait_for_sleepers_gone() == 0
