"""An asyncio worker that renders pages of books concurrently with ``aprefetch``.

Run: ``pip install -e ".[embedded]" && python examples/async_worker.py``. It reuses the
demo's bookstore (embedded PostgreSQL, or ``DATABASE_URL``), then renders four pages at
once on one event loop: each ``aprefetch`` runs its own lookups concurrently too.
"""

from __future__ import annotations

import asyncio
import time

from django.db.models import Prefetch

import async_prefetch
from async_prefetch.devtools.demo.bookstore import configure_django, seed
from async_prefetch.devtools.embedded import get_server


async def render_page(page: int, size: int = 25) -> str:
    from async_prefetch.devtools.demo.models import Book, Review

    books = await async_prefetch.aprefetch(
        Book.objects.order_by("title", "pk")[page * size : (page + 1) * size],
        "authors__location",
        "tags",
        "publisher",
        Prefetch("reviews", queryset=Review.objects.filter(stars__gte=4), to_attr="good"),
    )
    good: list[Review] = [r for book in books for r in book.good]  # type: ignore[attr-defined]
    return f"page {page}: {len(books)} books, {len(good)} good reviews"


async def main() -> None:
    started = time.perf_counter()
    with async_prefetch.tracing() as trace:
        lines = await asyncio.gather(*(render_page(page) for page in range(4)))
    print("\n".join(lines))
    print(f"{trace.queries} queries in {(time.perf_counter() - started) * 1000:.1f} ms")
    await async_prefetch.aclose()


if __name__ == "__main__":
    configure_django(get_server())
    seed()
    asyncio.run(main())
