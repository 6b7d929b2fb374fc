"""Several querysets at once (:func:`agather`), and Django's queryset methods with their
queries on the engine's pool (:func:`run_methods`, the core of :mod:`..terminals`).

A call runs Django's own synchronous method (``list(qs)``, ``qs.get(pk=1)``,
``qs.count()``, ...) on the caller's event loop, in rounds (:mod:`.rounds`). In a round
the method runs until it needs the database, where it stops: the queryset whose model
rows it is about to read, or the SQL it is about to send on its connection, is captured
(:mod:`.script`). The model-row querysets captured are compiled there, once: Django's
compile-time errors come before any query, and the engine sends that SQL. The captures
of every call of a round are then evaluated together in one engine run (one concurrency
limit): model rows through the engine's own path (root rows on a pooled connection,
hydrated as ``ModelIterable`` does, each queryset's ``prefetch_related()`` lookups run
as soon as its rows are in), other SQL on a pooled connection into raw rows. The next
round runs each method again from the start, its earlier queries answered from what was
fetched, so the method sees the same rows, builds the same results and raises the same
exceptions as it would have in Django. A method that needs no query (an evaluated
queryset's ``count()``) finishes in the first round without one.

Only the code between the method's start and its queries runs twice (filtering, cloning,
Django's checks); SQL other than model rows is compiled twice. ``list(qs)`` of a plain
model queryset (:mod:`.querysets`) is not run at all: its one need is known, and the
engine's answer is its result. Django's errors that need no query are raised in the
first round, before any query is sent. Inside ``atomic`` the engine run uses the
caller's own connection (:func:`..dispatch.run_async`); a database that is not
PostgreSQL, or a method that needs the database where the engine cannot go (a
``SynchronousOnlyOperation``), runs as Django's own async method does
(``sync_to_async``), after the others' rounds.
"""

from __future__ import annotations

from .querysets import afetch_all, agather
from .rounds import MAX_ROUNDS, MethodCall, run_methods

__all__ = ["MAX_ROUNDS", "MethodCall", "afetch_all", "agather", "run_methods"]
