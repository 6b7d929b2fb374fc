"""A stream holds its read-ahead window, not the table: the peak memory of a 500,000-parent
stream is within a few MiB of a 50,000-parent one (each run in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.db import connection

PARENTS = 500_000
SMALL = 50_000
SLACK_MIB = 8

SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    import django
    from django.conf import settings
    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "tests.testapp"],
        DATABASES={"default": json.loads(os.environ["STREAM_DATABASE"])},
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()
    import async_prefetch
    from tests.testapp.models import Book

    limit = int(sys.argv[1])
    count = pages = 0
    queryset = Book.objects.filter(pk__lte=limit).order_by("pk")
    for book in async_prefetch.iterator(queryset, "pages", chunk_size=2000):
        count += 1
        pages += len(book.pages.all())
    async_prefetch.runtime.bridge.shutdown()
    print(json.dumps({"books": count, "pages": pages,
                      "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


def peak(limit: int) -> dict[str, int]:
    database = {
        key: connection.settings_dict[key]
        for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")
    }
    env = dict(os.environ, STREAM_DATABASE=json.dumps(database), PYTHONPATH=str(Path.cwd()))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(limit)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.django_db(transaction=True)
def test_peak_memory_does_not_grow_with_the_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO testapp_book (id, title, isbn, price)"
            " SELECT g, 'Book ' || g, 'isbn-' || g, 0 FROM generate_series(1, %s) g",
            [PARENTS],
        )
        cursor.execute(
            "INSERT INTO testapp_page (book_id, number, text)"
            " SELECT id, n, '' FROM testapp_book, generate_series(1, 2) n"
        )
    small, large = peak(SMALL), peak(PARENTS)
    assert (small["books"], small["pages"]) == (SMALL, 2 * SMALL)
    assert (large["books"], large["pages"]) == (PARENTS, 2 * PARENTS)
    grown_mib = (large["peak_kib"] - small["peak_kib"]) / 1024
    assert grown_mib < SLACK_MIB, f"peak {small['peak_kib']} KiB -> {large['peak_kib']} KiB"
