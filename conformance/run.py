"""Run Django's own prefetch test modules with every prefetch going through the engine.

Usage: ``python conformance/run.py [--mode atomic|transaction] [--verbose] [MODULE ...]``
with the interpreter of the environment to test (Django and async_prefetch installed).

The installed Django's source distribution is downloaded once with pip into
``conformance/.cache/`` (its ``tests/`` folder is what runs). A PostgreSQL server is taken
from :func:`async_prefetch.devtools.embedded.get_server` (``DATABASE_URL`` or an embedded one), and
``tests/runtests.py`` runs once per mode in a child process with
``conformance.settings`` and :class:`conformance.harness.ConformanceRunner`.

For each mode the report gives passed/total per module, how often the engine ran and how
often prefetching was handed back to Django, and every failure and error by test id.
Failures listed in ``conformance/expected-<major.minor>-<mode>.txt`` (``test.id  # reason``)
are expected. Exit status: 0 when every failure and error is expected and every expected one
still fails, 1 otherwise, 2 when a run produced no results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"

MODES = ("atomic", "transaction")

#: Django's test modules that exercise prefetching.
MODULES = (
    "prefetch_related",
    "generic_relations",
    "known_related_objects",
    "many_to_many",
    "m2m_through_regress",
    "foreign_object",
    "async",
    "contenttypes_tests",
)

#: Django 6.1's other modules with fetch-mode tests (FETCH_ONE, FETCH_PEERS, RAISE).
FETCH_MODE_MODULES = (
    "basic",
    "defer",
    "many_to_one",
    "model_inheritance_regress",
    "one_to_one",
    "queryset_pickle",
    "raw_query",
    "select_related",
)

#: The harness's counters (``conformance.harness.COUNTERS``).
ENGINE_RUNS, ON_CALLER_CONNECTIONS = "engine_runs", "on_caller_connections"
HAND_BACKS, DELEGATED_LEVELS = "hand_backs", "delegated_levels"

FAILED = ("failed", "error", "unexpected_success")
NOT_RUN = ("skipped",)


def django_version() -> tuple[str, tuple[int, int]]:
    """The installed Django's version and its (major, minor)."""
    text = installed_version("Django")
    major, minor = (int(part) for part in text.split(".")[:2])
    return text, (major, minor)


def default_modules(line: tuple[int, int]) -> list[str]:
    """The modules a run covers on Django ``line``."""
    modules = list(MODULES)
    if line >= (6, 1):
        modules += FETCH_MODE_MODULES
    return modules


def django_tests(version: str, cache: Path = CACHE) -> Path:
    """The ``tests/`` folder of Django ``version``'s source distribution, fetched with pip
    and unpacked into ``cache`` on first use."""
    tests = cache / f"django-{version}" / "tests"
    if (tests / "runtests.py").is_file():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"django-{version}.tar.gz"
    if not archive.is_file():
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet"),
                *("--no-deps", "--no-binary", ":all:", f"Django=={version}"),
                *("--dest", str(cache)),
            ],
            check=True,
        )
    prefix = f"django-{version}/tests/"
    with tarfile.open(archive) as tar:
        members = [member for member in tar.getmembers() if member.name.startswith(prefix)]
        tar.extractall(cache, members=members, filter="data")
    if not (tests / "runtests.py").is_file():
        raise RuntimeError(f"{archive} has no {prefix}runtests.py")
    return tests


def load_expected(path: Path) -> dict[str, str]:
    """Test id -> reason, from lines ``test.id  # reason`` (blank and ``#`` lines skipped)."""
    expected: dict[str, str] = {}
    if not path.is_file():
        return expected
    for number, line in enumerate(path.read_text().splitlines(), 1):
        test_id, _, reason = line.partition("#")
        test_id = test_id.strip()
        if not test_id:
            continue
        if not reason.strip():
            raise ValueError(f"{path}:{number}: {test_id} has no '# reason'")
        expected[test_id] = reason.strip()
    return expected


def run_mode(
    mode: str, tests: Path, modules: Sequence[str], database_url: str, log: Path | None
) -> dict[str, Any]:
    """Run ``modules`` in ``mode`` with ``tests/runtests.py``; the harness's JSON report.

    The child's output goes to ``log`` (or to this process's when ``log`` is ``None``).
    """
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        results = Path(tmp) / "results.json"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "DATABASE_URL": database_url,
            "ASYNC_PREFETCH_EMBEDDED": "DATABASE_URL",
            "CONFORMANCE_MODE": mode,
            "CONFORMANCE_RESULTS": str(results),
        }
        command = [
            *(sys.executable, str(tests / "runtests.py"), "--settings=conformance.settings"),
            *("--parallel=1", "--noinput", f"--verbosity={1 if log is None else 2}"),
            *modules,
        ]
        if log is None:
            completed = subprocess.run(command, cwd=tests, env=env, check=False)
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("w") as out:
                completed = subprocess.run(
                    command, cwd=tests, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
                )
        if not results.is_file():
            where = f"; see {log}" if log is not None else ""
            raise RuntimeError(f"runtests.py exited {completed.returncode} without results{where}")
        report: dict[str, Any] = json.loads(results.read_text())
        return report


def _module(test_id: str) -> str:
    return test_id.partition(".")[0]


@dataclass
class ModuleTally:
    passed: int = 0
    total: int = 0
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Verdict:
    """One mode's outcome against its expected-failure list."""

    failures: dict[str, dict[str, Any]]  # test id -> record, every failure and error
    unexpected: list[str]
    fixed: list[str]  # expected to fail, passed
    missing: list[str]  # expected to fail, in a module that ran, but no such test ran

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.fixed)


def judge(
    records: dict[str, dict[str, Any]], expected: dict[str, str], whole_modules: Iterable[str]
) -> Verdict:
    """Compare a run's records with the expected failures; ``whole_modules`` are the
    modules that ran in full (an expected test of theirs that did not run is reported)."""
    whole = set(whole_modules)
    failures = {tid: rec for tid, rec in records.items() if rec["outcome"] in FAILED}
    unexpected = sorted(tid for tid in failures if tid not in expected)
    fixed, missing = [], []
    for tid in sorted(expected):
        record = records.get(tid)
        if tid in failures or (record is None and _module(tid) not in whole):
            continue
        if record is None:
            missing.append(tid)
        elif record["outcome"] not in NOT_RUN:
            fixed.append(tid)
    return Verdict(failures, unexpected, fixed, missing)


def tally(records: dict[str, dict[str, Any]], modules: Iterable[str]) -> dict[str, ModuleTally]:
    """Per module: passed/total (skipped tests not counted) and the counter sums."""
    tallies = {module: ModuleTally() for module in modules}
    for test_id, record in records.items():
        module = tallies.setdefault(_module(test_id), ModuleTally())
        for name, value in record.items():
            if isinstance(value, int):
                module.counts[name] = module.counts.get(name, 0) + value
        if record["outcome"] in NOT_RUN:
            module.skipped += 1
            continue
        module.total += 1
        module.passed += record["outcome"] not in FAILED
    return tallies


def _summary(detail: str) -> str:
    """The first line of a traceback's (last) exception message."""
    summary = ""
    previous = ""
    for line in detail.rstrip().splitlines():
        if line and not line[0].isspace() and previous[:1].isspace():
            summary = line
        previous = line
    return summary


def render(
    label: str,
    tallies: dict[str, ModuleTally],
    verdict: Verdict,
    expected: dict[str, str],
    expected_path: Path,
) -> str:
    """The human-readable report for one Django line and mode."""
    passed = sum(t.passed for t in tallies.values())
    total = sum(t.total for t in tallies.values())
    skipped = sum(t.skipped for t in tallies.values())
    out = [f"== {label}: {passed}/{total} passed ({skipped} skipped)"]
    width = max(len(name) for name in tallies)
    for name, t in tallies.items():
        c = t.counts
        out.append(
            f"  {name:<{width}}  {f'{t.passed}/{t.total}':>7} passed, "
            f"engine runs {c.get(ENGINE_RUNS, 0)} ({c.get(ON_CALLER_CONNECTIONS, 0)} on the "
            f"caller's connection), hand-backs {c.get(HAND_BACKS, 0)}, "
            f"delegated levels {c.get(DELEGATED_LEVELS, 0)}"
        )
    if verdict.failures:
        out.append(f"  failures and errors ({len(verdict.failures)}):")
        for test_id, record in sorted(verdict.failures.items()):
            why = expected.get(test_id)
            status = f"expected: {why}" if why else "UNEXPECTED"
            out.append(f"    {record['outcome'].upper():<7} {test_id}  [{status}]")
            if not why:
                out.append(f"            {_summary(record['detail'])}")
    for test_id in verdict.unexpected:
        detail = verdict.failures[test_id]["detail"].rstrip()
        out.append(f"  --- {test_id}\n" + "\n".join(f"  | {line}" for line in detail.splitlines()))
    for test_id in verdict.fixed:
        out.append(f"  NOW PASSES (remove it from {expected_path.name}): {test_id}")
    for test_id in verdict.missing:
        out.append(f"  note: {test_id} is in {expected_path.name} but did not run")
    out.append(f"  verdict: {'ok' if verdict.ok else 'FAILED'}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="test modules or labels (default: all)")
    parser.add_argument("--mode", choices=MODES, action="append", help="default: both")
    parser.add_argument(
        "--verbose", action="store_true", help="show runtests.py's output instead of logging it"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)

    from async_prefetch.devtools.embedded import get_server

    version, line = django_version()
    line_name = f"{line[0]}.{line[1]}"
    tests = django_tests(version)
    modules = args.modules or default_modules(line)
    database_url = get_server().url()
    status = 0
    raw: dict[str, Any] = {}
    reports = []
    for mode in args.mode or MODES:
        log = None if args.verbose else CACHE / "logs" / f"django-{version}-{mode}.log"
        print(f"::: Django {version}, mode {mode}: {' '.join(modules)}", flush=True)
        try:
            report = run_mode(mode, tests, modules, database_url, log)
        except RuntimeError as error:
            print(f"  {error}", flush=True)
            status = 2
            continue
        raw[mode] = report
        expected_path = HERE / f"expected-{line_name}-{mode}.txt"
        expected = load_expected(expected_path)
        labels = {label.partition(".")[0] for label in modules}
        verdict = judge(report["tests"], expected, [m for m in modules if "." not in m])
        text = render(
            f"Django {version}, mode {mode}",
            tally(report["tests"], sorted(labels)),
            verdict,
            expected,
            expected_path,
        )
        reports.append(text)
        print(text, flush=True)
        if log is not None:
            print(f"  log: {log}", flush=True)
        if not verdict.ok:
            status = max(status, 1)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    if len(reports) > 1:
        print("\n" + "\n".join(r.splitlines()[0] for r in reports))
    return status


if __name__ == "__main__":
    sys.exit(main())
