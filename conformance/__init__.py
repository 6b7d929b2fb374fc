"""Django's own test modules for prefetching, run with every prefetch going through the engine.

``python conformance/run.py`` (or ``nox -s conformance``) is the entry point; see
``conformance/README.md``. :mod:`conformance.settings` and :mod:`conformance.harness` are
loaded by Django's ``tests/runtests.py`` in a child process.
"""
