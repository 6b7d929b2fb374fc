"""Nox sessions: ``tests`` and ``conformance`` (per Python/Django pair), ``lint``, ``docs``,
``demo`` and ``bench``.

pyenv interpreters (``~/.pyenv/versions/*/bin``) are put first on ``PATH`` so that nox finds
``python3.12`` and ``python3.13`` even when pyenv's shims would refuse to run them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox


def _version(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name))


_pyenv_bins = sorted(Path.home().glob(".pyenv/versions/*/bin"), key=_version, reverse=True)
os.environ["PATH"] = os.pathsep.join([*map(str, _pyenv_bins), os.environ.get("PATH", "")])

nox.options.sessions = ["tests", "lint", "docs"]
nox.options.reuse_existing_virtualenvs = True

# Django 5.2 LTS is the last series for Python 3.11; Django 6.x needs Python >= 3.12.
MATRIX = {
    "py3.11-django5.2": ("3.11", "Django>=5.2,<6.0"),
    "py3.12-django6": ("3.12", "Django>=6.0"),
    "py3.13-django6": ("3.13", "Django>=6.0"),
}


@nox.session
@nox.parametrize(("python", "django"), list(MATRIX.values()), ids=list(MATRIX))
def tests(session: nox.Session, django: str) -> None:
    """Run pytest (extra arguments go to pytest)."""
    session.install("-e", ".[test]")
    session.install(django)
    session.run("python", "-c", "import django; print('Django', django.get_version())")
    session.run("pytest", *session.posargs)


@nox.session
@nox.parametrize(("python", "django"), list(MATRIX.values()), ids=list(MATRIX))
def conformance(session: nox.Session, django: str) -> None:
    """Django's own prefetch test modules with the engine installed (``conformance/run.py``;
    extra arguments go to it, e.g. ``-- --mode transaction prefetch_related``)."""
    session.install("-e", ".[embedded]")
    session.install(django)
    session.run("python", "conformance/run.py", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check and mypy."""
    session.install("-e", ".[test]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "async_prefetch", "tests", "conformance")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors (``site/``)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """``python -m async_prefetch demo`` on the embedded server (or DATABASE_URL)."""
    session.install("-e", ".[embedded]")
    session.run("python", "-m", "async_prefetch", "demo", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """``python -m async_prefetch bench`` (arguments after ``--`` go to the bench)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "async_prefetch", "bench", *session.posargs)
