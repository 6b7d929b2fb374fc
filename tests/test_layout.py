"""The package layout: the library never imports :mod:`async_prefetch.devtools`, and the
developer tooling has no import cycle.

The library side runs in a subprocess configured without the test settings (which start
the embedded server through ``async_prefetch.devtools.embedded``), on this test's database.
"""

from __future__ import annotations

import ast
import graphlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connection

from async_prefetch.__main__ import COMMANDS
from tests.conftest import Bookstore

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "async_prefetch"
DEVTOOLS = "async_prefetch.devtools"


def module_name(path: Path) -> str:
    """``async_prefetch/devtools/demo/cli.py`` -> ``async_prefetch.devtools.demo.cli``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


LIBRARY_MODULES = sorted(
    module_name(path)
    for path in PACKAGE.rglob("*.py")
    if not path.is_relative_to(PACKAGE / "devtools")
)
DEVTOOLS_MODULES = sorted(module_name(path) for path in (PACKAGE / "devtools").rglob("*.py"))


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code *args`` in a fresh interpreter without Django settings; must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


LIBRARY_RUN = """
import importlib, json, sys

import django
from django.conf import settings

settings.configure(
    DATABASES={"default": json.loads(sys.argv[1])},
    INSTALLED_APPS=["django.contrib.contenttypes", "async_prefetch", "tests.testapp"],
    USE_TZ=True,
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()

import async_prefetch
from async_prefetch import api, patching

from tests.testapp.models import Book

for name in json.loads(sys.argv[2]):
    importlib.import_module(name)

with async_prefetch.tracing() as trace:
    books = async_prefetch.prefetch(
        Book.objects.order_by("pk"), "authors__location", "tags", "reviews", "comments"
    )
patching.install()
try:
    again = list(Book.objects.prefetch_related("authors").order_by("pk"))
finally:
    patching.uninstall()
print(json.dumps({
    "books": len(books),
    "authors": sum(len(b.authors.all()) for b in again),
    "engine_queries": trace.queries,
    "devtools": sorted(m for m in sys.modules if m.startswith("async_prefetch.devtools")),
}))
"""


@pytest.mark.django_db(transaction=True)
def test_the_library_never_imports_devtools(bookstore: Bookstore) -> None:
    """Every library module imported, a traced prefetch run through the engine and one
    through the patched ``prefetch_related``: nothing under ``async_prefetch.devtools``."""
    keys = ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT", "OPTIONS")
    database = {key: connection.settings_dict[key] for key in keys}
    done = run_python(LIBRARY_RUN, json.dumps(database), json.dumps(LIBRARY_MODULES))
    result = json.loads(done.stdout)
    assert result["books"] == len(bookstore.book_ids)
    assert result["authors"] > 0
    assert result["engine_queries"] > 1  # the engine, not Django, fetched the relations
    assert result["devtools"] == []


def imported_devtools_modules(path: Path) -> set[str]:
    """The devtools modules ``path`` imports anywhere (functions included): an import of
    ``package.name`` counts as the module ``package.name`` when that is a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path).split(".")
                if path.name != "__init__.py":
                    package.pop()
                base = ".".join([*package[: len(package) - node.level + 1], base]).rstrip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name in DEVTOOLS_MODULES and name.startswith(DEVTOOLS)}


def test_devtools_modules_import_each_other_without_a_cycle() -> None:
    """The import graph of the devtools modules, imports inside functions included, is
    acyclic: ``graphlib`` raises ``CycleError`` naming the cycle otherwise."""
    graph = {
        module_name(path): imported_devtools_modules(path) - {module_name(path)}
        for path in (PACKAGE / "devtools").rglob("*.py")
    }
    assert graph["async_prefetch.devtools.bench.workloads"]  # the graph is not trivially empty
    order = list(graphlib.TopologicalSorter(graph).static_order())
    assert set(order) >= set(DEVTOOLS_MODULES)


IMPORT_FIRST = """
import importlib, sys

name = sys.argv[1]
if name.endswith(".models"):  # a models module needs its app in the registry
    import django
    from django.conf import settings

    app = name.removesuffix(".models")
    settings.configure(INSTALLED_APPS=["django.contrib.contenttypes", app])
    django.setup()
importlib.import_module(name)
"""


@pytest.mark.parametrize("name", DEVTOOLS_MODULES)
def test_each_devtools_module_imports_first_in_a_fresh_process(name: str) -> None:
    """Imported before any other devtools module (a models module: by ``django.setup()``
    with only its own app), and before Django is configured for every other module, as
    ``python -m async_prefetch`` imports its commands."""
    run_python(IMPORT_FIRST, name)


def test_the_commands_are_devtools_modules() -> None:
    assert set(COMMANDS) == {
        "demo",
        "bench",
        "bench-peers",
        "bench-load",
        "bench-n-plus-one",
        "bench-gather",
    }
    for module, _ in COMMANDS.values():
        assert module.startswith(DEVTOOLS + ".")
        assert importlib.util.find_spec(module) is not None, module
