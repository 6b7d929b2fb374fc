"""Whether a pool can reach its server at all, and whether an idle connection is still alive.

psycopg_pool retries failed connection attempts in the background, with backoff, for
``reconnect_timeout``; meanwhile a client waits in ``getconn()`` for the whole pool
``timeout`` and gets a ``PoolTimeout`` without the cause. :class:`PoolHealth` follows the
outcome of every connection attempt of one pool (through the pool's ``connection_class``)
and fails the pool's waiting clients at once, with the server's error, when the latest
attempt failed while the pool holds no connection at all. A pool that is merely busy, or
whose server refuses only extra connections, still holds connections: its clients wait.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, Self

import anyio
import psycopg
from django.db import utils as django_db_utils
from psycopg import AsyncConnection
from psycopg.pq import ConnStatus
from psycopg_pool import AsyncConnectionPool


class PoolHealth:
    """The connection attempts of one pool (use it on the pool's event loop only)."""

    def __init__(self) -> None:
        # Connections the pool has opened: idle, checked out, or closed and not yet freed.
        self._opened: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()
        self._failure: psycopg.OperationalError | None = None
        self._connecting = 0  # attempts under way
        self._getconns: set[asyncio.Task[AsyncConnection[Any]]] = set()

    @property
    def unreachable(self) -> bool:
        """Whether the latest connection attempt failed while the pool held no connection
        and no other attempt was under way."""
        return self._failure is not None

    def connection_class(self) -> type[AsyncConnection[Any]]:
        """An ``AsyncConnection`` subclass that reports each ``connect()`` to this object."""
        health = self

        class TrackedConnection(AsyncConnection[Any]):
            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                health._connecting += 1
                conn: Self | None = None
                failure: psycopg.OperationalError | None = None
                try:
                    conn = await super().connect(conninfo, **kwargs)
                    return conn
                except psycopg.OperationalError as exc:
                    failure = exc
                    raise
                finally:
                    health._attempt_ended(conn, failure)

        return TrackedConnection

    def _attempt_ended(
        self, conn: AsyncConnection[Any] | None, failure: psycopg.OperationalError | None
    ) -> None:
        self._connecting -= 1
        if conn is not None:
            self._opened.add(conn)
            self._failure = None
        elif failure is not None:
            if self._connecting or any(not opened.closed for opened in self._opened):
                return  # busy, or only extra connections refused: clients get the others
            self._failure = failure
            for task in self._getconns:
                task.cancel()

    async def getconn(
        self, pool: AsyncConnectionPool[Any], started: Callable[[], None] | None = None
    ) -> AsyncConnection[Any]:
        """``pool.getconn()``, or Django's ``OperationalError`` (caused by the connection
        attempt's psycopg error) as soon as the pool cannot connect at all.

        ``started`` is called when ``pool.getconn()`` starts (in its own task), in the
        same scheduling step as the pool takes an idle connection or queues the request:
        from then on the pool's statistics count the request."""
        self._raise_unreachable()

        async def getconn() -> AsyncConnection[Any]:
            if started is not None:
                started()
            conn: AsyncConnection[Any] = await pool.getconn()
            return conn

        task: asyncio.Task[AsyncConnection[Any]] = asyncio.ensure_future(getconn())
        self._getconns.add(task)
        try:
            return await task
        except BaseException:
            if task.done() and not task.cancelled() and task.exception() is None:
                # The caller was cancelled after the pool handed the task a connection.
                with anyio.CancelScope(shield=True):
                    await pool.putconn(task.result())
                raise
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                self._raise_unreachable()  # cancelled by _connect_failed(), not the caller
            raise
        finally:
            self._getconns.discard(task)

    def _raise_unreachable(self) -> None:
        if (failure := self._failure) is not None:
            error = django_db_utils.OperationalError(*failure.args)
            setattr(error, _UNREACHABLE, True)
            raise error from failure


_UNREACHABLE = "_async_prefetch_unreachable"


def unreachable_error(exc: BaseException) -> bool:
    """Whether ``exc`` is :meth:`PoolHealth.getconn`'s error for a pool that cannot
    connect at all: no connection was handed out, so nothing was sent to the server."""
    return getattr(exc, _UNREACHABLE, False) is True


def closed_by_server(conn: AsyncConnection[Any]) -> bool:
    """Whether the server has closed idle ``conn`` (restarted, or the backend was
    terminated), found without a round trip: the socket is read without blocking.

    A server ending a session sends an error message and then closes the socket; libpq
    reads one of them per ``consume_input()``, hence two reads at most.
    """
    pgconn = conn.pgconn
    for _ in range(2):
        if pgconn.status == ConnStatus.BAD:
            return True
        try:
            pgconn.consume_input()
        except psycopg.OperationalError:
            return True
    return pgconn.status == ConnStatus.BAD
