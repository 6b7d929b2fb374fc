"""Shelves and the books on them."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from django.db import models

if TYPE_CHECKING:
    from django_stubs_ext.db.models.manager import RelatedManager


class Shelf(models.Model):
    name = models.CharField(max_length=50)

    # Spelled out for type checkers: the project's mypy settings do not install this app.
    objects: ClassVar[models.Manager[Shelf]] = models.Manager()
    if TYPE_CHECKING:
        books: RelatedManager[Book]


class Book(models.Model):
    shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")
    title = models.CharField(max_length=100)

    objects: ClassVar[models.Manager[Book]] = models.Manager()
