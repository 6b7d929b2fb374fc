"""Memo levels of one run: served from a memo, their missing keys fetched in rounds.

A level a memo can serve (:func:`.memo_level.memo_level`) needs no query of its own: the keys
the memo holds are served at once, and the missing keys of every memo level the run
decided in one scheduling round (``author`` and ``translator`` of the same chunk, say) are
fetched with one query per memo and database. A many-to-many memo level first reads its
join rows. Keys already being fetched for another level wait for that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Protocol

from django.db.models import Model

from ..sql.compiler import CompiledQuery
from .memo import Memo
from .memo_level import MemoBatch, MemoLevel, batch_query
from .session import Session
from .trace import RunTrace, StepTrace


class Run(Protocol):
    """What the memo rounds need of the run they serve."""

    @property
    def session(self) -> Session: ...

    @property
    def trace(self) -> RunTrace | None: ...

    def launch(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None: ...

    async def post(self, item: MemoLevel | MemoBatch, payload: Any) -> None: ...

    async def run_lookups(self, instances: list[Model], lookups: list[Any]) -> None: ...

    async def complete(self, served: MemoLevel) -> None: ...


class MemoRounds:
    """The memo levels of one run, and the batch queries of its scheduling rounds."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._queue: list[MemoLevel] = []  # waiting for this round's batch queries
        self._inflight: dict[tuple[Memo, str], dict[Hashable, MemoBatch]] = {}
        self._unsent: list[MemoBatch] = []

    def start_pairs(self, served: MemoLevel) -> None:
        """Start the query for a many-to-many memo level's join rows."""
        assert served.pairs is not None
        trace = self._run.trace
        step = None
        if trace is not None:
            step = trace.start(
                f"{served.level.key} (join rows)", "query", served.pairs.sql, served.pairs.params
            )
        self._run.launch(self._fetch_pairs, served, step)

    async def _fetch_pairs(self, served: MemoLevel, step: StepTrace | None) -> None:
        assert served.pairs is not None
        rows = await self._run.session.fetch_rows(served.pairs)
        if step is not None and self._run.trace is not None:
            self._run.trace.finish(step, len(rows))
        await self._run.post(served, rows)

    async def on_pairs(self, served: MemoLevel, rows: list[tuple[Any, ...]]) -> None:
        served.read_pairs(rows)
        await self.request(served)

    async def request(self, served: MemoLevel) -> None:
        """Serve ``served`` now if the memo holds every key it needs, else queue it for
        this round's batch query."""
        served.resolve()
        if served.missing:
            self._queue.append(served)
        else:
            await self._run.complete(served)

    async def flush(self) -> None:
        """One query per memo (and database) for the missing keys of the levels queued
        this round, not counting keys already in flight (their levels wait for those)."""
        while self._queue:
            queue, self._queue = self._queue, []
            complete = []
            for served in queue:
                served.resolve()  # a batch may have brought keys since it was queued
                if not served.missing:
                    complete.append(served)
                    continue
                inflight = self._inflight.setdefault((served.memo, served.alias), {})
                batches: dict[int, MemoBatch] = {}
                if served.memo.all:  # the whole table, loaded once
                    batch = inflight.get(None) or self._load_batch(served)
                    batches[id(batch)] = batch
                else:
                    new = [key for key in served.missing if key not in inflight]
                    if new:
                        # Levels queued later this round add their keys to this batch.
                        batch = self._open_batch(served)
                        assert batch.keys is not None
                        batch.keys += new
                        for key in new:
                            inflight[key] = batch
                    for key in served.missing:
                        batch = inflight[key]
                        batches[id(batch)] = batch
                served.waiting = len(batches)
                for batch in batches.values():
                    batch.waiters.append(served)
            self._send_batches()
            for served in complete:
                await self._run.complete(served)

    def _open_batch(self, served: MemoLevel) -> MemoBatch:
        """This round's unsent batch for ``served``'s memo and database (made if none)."""
        for batch in self._unsent:
            if batch.memo is served.memo and batch.alias == served.alias:
                return batch
        batch = MemoBatch(served.memo, served.alias, [])
        self._unsent.append(batch)
        return batch

    def _load_batch(self, served: MemoLevel) -> MemoBatch:
        """The batch loading ``served``'s ``all=True`` memo (sent with this round's)."""
        batch = MemoBatch(served.memo, served.alias, None)
        self._inflight[(served.memo, served.alias)][None] = batch
        self._unsent.append(batch)
        return batch

    def _send_batches(self) -> None:
        """Compile and start this round's batch queries."""
        unsent, self._unsent = self._unsent, []
        trace = self._run.trace
        for batch in unsent:
            compiled, batch.additional_lookups = batch_query(batch.memo, batch.alias, batch.keys)
            if trace is not None:
                name = f"(memo {batch.memo.model.__name__})"
                batch.step = trace.start(name, "query", compiled.sql, compiled.params)
            self._run.launch(self._fetch_batch, batch, compiled)

    async def _fetch_batch(self, batch: MemoBatch, compiled: CompiledQuery) -> None:
        instances = await self._run.session.fetch_instances(compiled)
        await self._run.post(batch, instances)

    async def on_batch(self, batch: MemoBatch, instances: list[Model]) -> None:
        """Hold the batch's instances in its memo and serve the levels waiting for it."""
        if batch.step is not None and self._run.trace is not None:
            self._run.trace.finish(batch.step, len(instances))
        if batch.additional_lookups:  # the memo queryset's own prefetch_related()
            await self._run.run_lookups(instances, batch.additional_lookups)
        memo = batch.memo
        if batch.keys is None:
            memo.load(instances)
        else:
            memo.add(instances)
        inflight = self._inflight[(memo, batch.alias)]
        for key in [None] if batch.keys is None else batch.keys:
            if inflight.get(key) is batch:
                del inflight[key]
        fetched = {instance.pk: instance for instance in instances}
        for served in batch.waiters:
            served.receive(fetched)
            served.waiting -= 1
            if not served.waiting:
                await self._run.complete(served)
