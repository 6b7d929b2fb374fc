"""A pooled connection's own transaction: a snapshot-consistent one (``BEGIN_CONSISTENT``
and the export of its snapshot, in the caller's pipeline), and ending it before the
connection goes back to its pool."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = [
    "BEGIN_CONSISTENT",
    "begin_exporting",
    "end_transaction",
    "export_snapshot",
    "exported_snapshot",
    "release",
]

BEGIN_CONSISTENT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


async def begin_exporting(conn: psycopg.AsyncConnection[Any]) -> psycopg.AsyncCursor[Any]:
    """Queue, in ``conn``'s pipeline, a ``BEGIN_CONSISTENT`` transaction and the export of
    its snapshot; the cursor :func:`exported_snapshot` reads the snapshot's id from."""
    await conn.execute(BEGIN_CONSISTENT)
    return await conn.execute("SELECT pg_export_snapshot()")


async def exported_snapshot(cursor: psycopg.AsyncCursor[Any]) -> str:
    """The snapshot id :func:`begin_exporting`'s cursor holds, once its pipeline ran."""
    row = await cursor.fetchone()
    assert row is not None
    snapshot: str = row[0]
    return snapshot


async def export_snapshot(conn: psycopg.AsyncConnection[Any]) -> str:
    """Open a ``BEGIN_CONSISTENT`` transaction on ``conn`` and export its snapshot, in
    one round trip; the snapshot's id."""
    async with conn.pipeline():
        exported = await begin_exporting(conn)
    return await exported_snapshot(exported)


async def release(
    conn: psycopg.AsyncConnection[Any] | None, pool: AsyncConnectionPool[Any] | None
) -> None:
    """End ``conn``'s transaction and return it to ``pool`` (nothing when either is
    ``None``), shielded from cancellation: an interrupted ``putconn()`` would leave the
    connection counted as checked out."""
    if conn is None or pool is None:
        return
    with anyio.CancelScope(shield=True):
        await end_transaction(conn)
        await pool.putconn(conn)


async def end_transaction(conn: psycopg.AsyncConnection[Any]) -> None:
    """Roll back ``conn``'s transaction (closing its cursors), if one is open; a
    connection that cannot is closed (the pool discards it)."""
    if conn.closed or conn.info.transaction_status not in (
        psycopg.pq.TransactionStatus.INTRANS,
        psycopg.pq.TransactionStatus.INERROR,
    ):
        return
    try:
        await conn.execute("ROLLBACK")
    except psycopg.Error:
        await conn.close()
