"""The engine's own event-loop thread, where its pools live and its runs execute.

Both APIs run the engine here: sync callers block on it (``run_sync``), async callers
on any event loop await it (``run_async``) while their own loop stays free during
hydration. One pool per alias serves every caller, and it is closed at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal
from django.core.exceptions import SynchronousOnlyOperation

from ..execution.caller_thread import CallerThread

T = TypeVar("T")

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_portal_cm: AbstractContextManager[BlockingPortal] | None = None


def _get_portal() -> BlockingPortal:
    global _portal, _portal_cm
    with _lock:
        if _portal is None:
            _portal_cm = start_blocking_portal(name="async_prefetch")
            _portal = _portal_cm.__enter__()
            atexit.register(shutdown)
        return _portal


def run_sync(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await func(*args)`` on the engine's loop thread and wait for the result.

    Raises Django's ``SynchronousOnlyOperation`` when called from a thread that runs
    an event loop (use the async API there), like Django's own ORM; the engine's own
    thread is one of those.
    """
    _refuse_in_event_loop()
    box: list[T] = _get_portal().call(_boxed, func, args)
    return box.pop()


def _refuse_in_event_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise SynchronousOnlyOperation(
            "You cannot call this from an async context - use a thread or sync_to_async."
        )


def run_serving(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """:func:`run_sync` for a run whose queries must run on this thread (it owns the
    caller's connection inside ``atomic``): while ``await func(*args)`` runs on the
    engine's loop, this thread runs what the run sends it through
    :func:`~async_prefetch.execution.caller_thread.on_caller_thread`.

    Raises ``SynchronousOnlyOperation`` as :func:`run_sync` does.
    """
    _refuse_in_event_loop()
    caller = CallerThread()
    future = _get_portal().start_task_soon(_bound, caller, func, args)
    caller.serve(interrupt=future.cancel)  # until the run has unwound
    box: list[T] = future.result()
    return box.pop()


async def _bound(
    caller: CallerThread, func: Callable[..., Awaitable[T]], args: tuple[Any, ...]
) -> list[T]:
    with caller.bound():
        return await _boxed(func, args)


async def _boxed(func: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> list[T]:
    """``[await func(*args)]``: the caller takes the result out of the list.

    The portal's frames on the engine thread still hold what this returns for a moment
    after the caller has it. Prefetched instances reference each other (reverse caches),
    so a result the engine thread lets go of only after the caller has dropped it (and
    perhaps run ``gc.collect()``) would wait for the cyclic collector. An emptied list
    is all they hold.
    """
    return [await func(*args)]


async def run_async(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await ``func(*args)`` run on the engine's loop thread, from any asyncio loop.

    Cancelling the caller cancels the engine task and waits until it has unwound,
    through any further cancellation (``task.cancel()`` again, a timeout firing inside
    a task group), so the caller never sees instances the engine is still restoring.
    A cancellation that reaches the caller after the engine task has finished (before
    the caller resumed) leaves its work complete, and the result is dropped.
    """
    portal = _get_portal()
    finished: Future[None] = Future()

    async def tracked() -> list[T]:
        try:
            return await _boxed(func, args)
        finally:
            finished.set_result(None)

    future = portal.start_task_soon(tracked)
    try:
        return (await asyncio.wrap_future(future)).pop()
    except asyncio.CancelledError:
        future.cancel()
        unwound = asyncio.wrap_future(finished)
        while not unwound.done():
            # An anyio shield does not hold against a native task.cancel(); this does.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(unwound)
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().clear()  # finished first: the raised error must not hold it
        raise


def start_soon(func: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
    """Start ``func(*args)`` as a task of its own on the engine's loop thread (it outlives
    this call: a stream's producer); returns its concurrent future."""
    return _get_portal().start_task_soon(func, *args)


def shutdown() -> None:
    """Close the engine thread's pools and stop the thread (registered at exit)."""
    global _portal, _portal_cm
    with _lock:
        portal, portal_cm = _portal, _portal_cm
        _portal = _portal_cm = None
    if portal is None or portal_cm is None:
        return
    from ..execution.pools import close_pools

    try:
        portal.call(close_pools)
    finally:
        portal_cm.__exit__(None, None, None)


def on_engine_thread(func: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``func`` on the engine thread if it is running; ``None`` otherwise."""
    with _lock:
        portal = _portal
    return portal.call(func) if portal is not None else None
