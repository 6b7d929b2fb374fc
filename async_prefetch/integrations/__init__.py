"""Reporting engine queries to third-party Django tooling (each imported only when used)."""
