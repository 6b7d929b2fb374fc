"""Benchmark schema: a parent with ten reverse foreign keys, a wide many-to-many, and the
books of the ``stream`` workload.

``Parent`` rows belong to a ``batch`` (``fanout`` or ``big``) and are numbered by ``seq``
within it, so a workload picks its roots with ``filter(batch=..., seq__lt=n)`` and the
seed functions can top a batch up without touching existing rows. Every model but
``StreamBookCategory`` (join rows, read as a set) is ordered by primary key so that Django
and the engine must return identical lists.
The book chain reuses :mod:`async_prefetch.devtools.demo`. Managers are declared explicitly so
that mypy's Django plugin types them without this app in the type-checking settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar

from django.db import models


class Parent(models.Model):
    objects: ClassVar[models.Manager[Parent]] = models.Manager()
    batch = models.CharField(max_length=16)
    seq = models.IntegerField()
    name = models.CharField(max_length=50)

    class Meta:
        ordering = ("pk",)
        constraints = (
            models.UniqueConstraint(fields=("batch", "seq"), name="bench_parent_batch_seq"),
        )


class ChildBase(models.Model):
    """Columns shared by ``Child0`` .. ``Child9``; each adds its ``parent`` (``c0`` .. ``c9``)."""

    label = models.CharField(max_length=40)
    value = models.IntegerField()

    class Meta:
        abstract = True
        ordering = ("pk",)


class Child0(ChildBase):
    objects: ClassVar[models.Manager[Child0]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c0")


class Child1(ChildBase):
    objects: ClassVar[models.Manager[Child1]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c1")


class Child2(ChildBase):
    objects: ClassVar[models.Manager[Child2]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c2")


class Child3(ChildBase):
    objects: ClassVar[models.Manager[Child3]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c3")


class Child4(ChildBase):
    objects: ClassVar[models.Manager[Child4]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c4")


class Child5(ChildBase):
    objects: ClassVar[models.Manager[Child5]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c5")


class Child6(ChildBase):
    objects: ClassVar[models.Manager[Child6]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c6")


class Child7(ChildBase):
    objects: ClassVar[models.Manager[Child7]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c7")


class Child8(ChildBase):
    objects: ClassVar[models.Manager[Child8]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c8")


class Child9(ChildBase):
    objects: ClassVar[models.Manager[Child9]] = models.Manager()
    parent = models.ForeignKey(Parent, models.CASCADE, related_name="c9")


class Label(models.Model):
    objects: ClassVar[models.Manager[Label]] = models.Manager()
    seq = models.IntegerField(unique=True)
    name = models.CharField(max_length=50)
    featured = models.BooleanField(default=False)

    class Meta:
        ordering = ("name", "pk")


class Article(models.Model):
    objects: ClassVar[models.Manager[Article]] = models.Manager()
    seq = models.IntegerField(unique=True)
    title = models.CharField(max_length=100)
    labels = models.ManyToManyField(Label, through="ArticleLabel", related_name="articles")

    class Meta:
        ordering = ("pk",)


class ArticleLabel(models.Model):
    """The custom through model: a label on an article, with a ``weight`` (0-99)."""

    objects: ClassVar[models.Manager[ArticleLabel]] = models.Manager()
    article = models.ForeignKey(Article, models.CASCADE, related_name="links")
    label = models.ForeignKey(Label, models.CASCADE, related_name="links")
    weight = models.IntegerField()

    class Meta:
        ordering = ("pk",)
        constraints = (
            models.UniqueConstraint(fields=("article", "label"), name="bench_article_label"),
        )


# -- the stream workload: books with two foreign keys to one model, a small table, an M2M ---------

_stream_alias: ContextVar[str | None] = ContextVar("_stream_alias", default=None)


@contextmanager
def reading_from(alias: str) -> Iterator[None]:
    """Within this block, :class:`StreamBookCategory`'s default manager reads from ``alias``.

    django-memoized-prefetch reads a many-to-many relation's join rows with
    ``through_model.objects`` (on the default database, with no way to pass another); the
    bench routes them to the database alias under test this way.
    """
    token = _stream_alias.set(alias)
    try:
        yield
    finally:
        _stream_alias.reset(token)


class ReadingFromManager(models.Manager["StreamBookCategory"]):
    """A manager whose querysets use the alias set by :func:`reading_from`, if any."""

    def get_queryset(self) -> models.QuerySet[StreamBookCategory]:
        queryset = super().get_queryset()
        alias = _stream_alias.get()
        return queryset if alias is None else queryset.using(alias)


class StreamAuthor(models.Model):
    objects: ClassVar[models.Manager[StreamAuthor]] = models.Manager()
    name = models.CharField(max_length=50)
    email = models.CharField(max_length=80)

    class Meta:
        ordering = ("pk",)


class StreamPublisher(models.Model):
    objects: ClassVar[models.Manager[StreamPublisher]] = models.Manager()
    name = models.CharField(max_length=50)
    country = models.CharField(max_length=2)

    class Meta:
        ordering = ("pk",)


class StreamCategory(models.Model):
    objects: ClassVar[models.Manager[StreamCategory]] = models.Manager()
    name = models.CharField(max_length=50)

    class Meta:
        ordering = ("pk",)


class StreamBook(models.Model):
    """``seq`` numbers the books (0..n-1) so that seeding can top the table up."""

    objects: ClassVar[models.Manager[StreamBook]] = models.Manager()
    seq = models.IntegerField(unique=True)
    title = models.CharField(max_length=100)
    author = models.ForeignKey(StreamAuthor, models.CASCADE, related_name="books")
    translator = models.ForeignKey(
        StreamAuthor, models.CASCADE, null=True, related_name="translations"
    )
    publisher = models.ForeignKey(StreamPublisher, models.CASCADE, related_name="books")
    categories = models.ManyToManyField(
        StreamCategory, through="StreamBookCategory", related_name="books"
    )

    class Meta:
        ordering = ("pk",)


class StreamBookCategory(models.Model):
    """The join rows of ``StreamBook.categories`` (a plain through model, no extra columns)."""

    objects: ClassVar[ReadingFromManager] = ReadingFromManager()
    book = models.ForeignKey(StreamBook, models.CASCADE)
    category = models.ForeignKey(StreamCategory, models.CASCADE)

    class Meta:
        constraints = (
            models.UniqueConstraint(fields=("book", "category"), name="bench_stream_book_category"),
        )
