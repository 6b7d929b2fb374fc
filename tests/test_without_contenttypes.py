"""The engine imports and prefetches in a project without ``django.contrib.contenttypes``.

Plain ``prefetch_related`` works there; importing ``contenttypes.fields`` does not (its
``ContentType`` model raises ``RuntimeError`` outside ``INSTALLED_APPS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psycopg
import pytest
from django.db import connection

SETTINGS = """
import json, os
SECRET_KEY = "x"
INSTALLED_APPS = ["plainapp"]
DATABASES = {"default": json.loads(os.environ["NO_CT_DATABASE"])}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
"""

MODELS = """
from django.db import models

class Shelf(models.Model):
    name = models.CharField(max_length=20)

class Item(models.Model):
    shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="items")
    label = models.CharField(max_length=20)
"""

SCRIPT = """
import asyncio, django
django.setup()
from django.db import connection
from plainapp.models import Item, Shelf
import async_prefetch

with connection.schema_editor() as editor:
    editor.create_model(Shelf)
    editor.create_model(Item)
shelves = Shelf.objects.bulk_create([Shelf(name=n) for n in "ab"])
Item.objects.bulk_create([Item(shelf=s, label=f"{s.name}{i}") for s in shelves for i in range(2)])
synced = async_prefetch.prefetch(Shelf.objects.order_by("name"), "items")
awaited = asyncio.run(async_prefetch.aprefetch(Shelf.objects.order_by("name"), "items__shelf"))
print([[i.label for i in s.items.all()] for s in synced + awaited])
async_prefetch.runtime.bridge.shutdown()
"""


def test_engine_works_without_contenttypes(tmp_path: Path) -> None:
    app = tmp_path / "plainapp"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "models.py").write_text(textwrap.dedent(MODELS))
    (tmp_path / "no_ct_settings.py").write_text(textwrap.dedent(SETTINGS))
    settings = connection.settings_dict
    name = f"no_ct_{uuid.uuid4().hex[:8]}"
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**params, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        database = {key: settings[key] for key in ("ENGINE", "USER", "PASSWORD", "HOST", "PORT")}
        env = dict(
            os.environ,
            NO_CT_DATABASE=json.dumps({**database, "NAME": name}),
            DJANGO_SETTINGS_MODULE="no_ct_settings",
            PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path.cwd())]),
        )
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        with psycopg.connect(**params, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([["a0", "a1"], ["b0", "b1"]] * 2)


@pytest.fixture(autouse=True)
def _db(db: None) -> None:
    """Only for the server's connection parameters."""
