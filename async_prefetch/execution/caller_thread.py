"""The thread that owns the caller's connection, reached from the engine's event loop.

Inside ``atomic`` only the caller's own Django connection sees the transaction's rows, and
a Django connection belongs to the thread that opened it. The run itself (planning,
scheduling, hydration) goes on an event loop; its queries must come back to that thread.

A synchronous caller blocks in :meth:`CallerThread.serve` while its run goes on the
engine's loop: each :func:`on_caller_thread` call there queues the function for it and
awaits its result. Without a :class:`CallerThread` (an async caller inside ``atomic``,
whose run goes on its own loop), :func:`on_caller_thread` is
``sync_to_async(thread_sensitive=True)``, which reaches the thread holding the
transaction (the outer thread under ``async_to_sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from asgiref.sync import sync_to_async

T = TypeVar("T")

_serving: contextvars.ContextVar[CallerThread | None] = contextvars.ContextVar(
    "async_prefetch_caller_thread", default=None
)

_STOP = object()


class CallerThread:
    """A synchronous caller's thread, running the functions its run sends it.

    Made on that thread, :meth:`serve` runs there; :meth:`call` is awaited on the loop
    that runs the caller's run (inside :meth:`bound`).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """While entered, :func:`on_caller_thread` in this context (and the tasks it
        starts) sends its functions here; on exit :meth:`serve` ends."""
        token = _serving.set(self)
        try:
            yield
        finally:
            _serving.reset(token)
            self.stop()

    async def call(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` run on the caller's thread; its result or its exception.

        Cancelling the awaiting task does not stop a function that has started (as with
        ``sync_to_async``): its result is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((func, args, loop, future))
        return await future

    def stop(self) -> None:
        """End :meth:`serve` once the functions queued before are done (any thread)."""
        self._queue.put(_STOP)

    def serve(self, interrupt: Callable[[], object]) -> None:
        """Run the functions sent here until :meth:`stop`.

        A function's ``Exception`` goes to the task awaiting it. On a ``BaseException``
        raised in this thread (``KeyboardInterrupt``, while waiting or in a function),
        ``interrupt()`` is called (to cancel the run), the awaiting task and those of the
        functions still sent get ``CancelledError`` instead, and the exception is raised
        here once :meth:`stop` comes.
        """
        raised: BaseException | None = None
        while True:
            try:
                item = self._queue.get()
                if item is _STOP:
                    break
                func, args, loop, future = item
                if raised is not None:
                    loop.call_soon_threadsafe(future.cancel)
                    continue
                try:
                    result = func(*args)
                except Exception as exc:
                    loop.call_soon_threadsafe(_set_exception, future, exc)
                    del exc
                except BaseException:
                    loop.call_soon_threadsafe(future.cancel)  # not into the engine's loop
                    raise
                else:
                    loop.call_soon_threadsafe(_set_result, future, result)
                    del result
            except BaseException as exc:  # KeyboardInterrupt, SystemExit
                if raised is None:
                    raised = exc
                    interrupt()
        if raised is not None:
            raise raised


async def on_caller_thread(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` run on the thread that owns the caller's connections: the
    synchronous caller's own thread when its run is bound to it, else through
    ``sync_to_async(thread_sensitive=True)``."""
    caller = _serving.get()
    if caller is not None:
        return await caller.call(func, *args)
    return await sync_to_async(func, thread_sensitive=True)(*args)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
