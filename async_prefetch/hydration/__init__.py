"""Hydration: rows to model instances, then the parents' caches (and the querysets
Django leaves in ``_prefetched_objects_cache``)."""
