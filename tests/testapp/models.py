"""A schema with every relation kind the engine must handle.

Country <- Location <- Author (self FK "mentor") <-M2M-> Book -> Publisher (UUID pk)
Book <- Page (default ordering), Book <- Review (filtering default manager),
Book <-M2M via Tagging (to_field="name")-> Tag, Book <-1:1- BookProfile,
Book <- Edition (FK to_field="isbn"), EBook(Book) multi-table inheritance,
Comment (GenericForeignKey) <- Book.comments (GenericRelation).
"""

from __future__ import annotations

import uuid
from functools import cached_property
from typing import Any

from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.contrib.contenttypes.models import ContentType
from django.db import models


class Country(models.Model):
    name = models.CharField(max_length=50)

    def __str__(self) -> str:
        return self.name


class LocationManager(models.Manager["Location"]):
    """Default manager that prefetches: reverse relations to Location add auto lookups."""

    def get_queryset(self) -> models.QuerySet[Location]:
        return super().get_queryset().prefetch_related("country")


class Location(models.Model):
    name = models.CharField(max_length=50)
    country = models.ForeignKey(
        Country, models.CASCADE, null=True, blank=True, related_name="locations"
    )

    objects = LocationManager()

    def __str__(self) -> str:
        return self.name


class Publisher(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=50)

    def __str__(self) -> str:
        return self.name


class Author(models.Model):
    name = models.CharField(max_length=50)
    email = models.CharField(max_length=80, unique=True)
    location = models.ForeignKey(
        Location, models.SET_NULL, null=True, blank=True, related_name="authors"
    )
    mentor = models.ForeignKey(
        "self", models.SET_NULL, null=True, blank=True, related_name="mentees"
    )

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    name = models.CharField(max_length=30, unique=True)

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    title = models.CharField(max_length=100)
    isbn = models.CharField(max_length=20, unique=True)
    publisher = models.ForeignKey(
        Publisher, models.SET_NULL, null=True, blank=True, related_name="books"
    )
    authors = models.ManyToManyField(Author, related_name="books", blank=True)
    tags = models.ManyToManyField(Tag, through="Tagging", related_name="books", blank=True)
    published = models.DateField(null=True, blank=True)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    comments = GenericRelation("Comment", related_query_name="book")

    def __str__(self) -> str:
        return self.title

    @property
    def publisher_prop(self) -> Publisher | None:
        """A plain property over a relation: prefetch lookups traverse it."""
        return self.publisher

    @cached_property
    def author_list(self) -> list[Author]:
        """A cached_property holding a list: prefetch lookups traverse it."""
        return list(self.authors.all())


class EBook(Book):
    """Multi-table inheritance: Book gets a reverse one-to-one "ebook"."""

    file_format = models.CharField(max_length=10, default="epub")


class Tagging(models.Model):
    """Custom M2M through model whose tag side points at Tag.name (to_field)."""

    book = models.ForeignKey(Book, models.CASCADE, related_name="taggings")
    tag = models.ForeignKey(Tag, models.CASCADE, to_field="name", related_name="taggings")
    weight = models.IntegerField(default=0)

    class Meta:
        constraints = (models.UniqueConstraint(fields=("book", "tag"), name="uniq_tagging"),)


class Page(models.Model):
    book = models.ForeignKey(Book, models.CASCADE, related_name="pages")
    number = models.IntegerField()
    text = models.TextField(default="")

    class Meta:
        ordering = ("number", "id")


class VisibleReviewManager(models.Manager["Review"]):
    """Default manager that filters: reverse managers inherit the filter."""

    def get_queryset(self) -> models.QuerySet[Review]:
        return super().get_queryset().filter(hidden=False)


class Review(models.Model):
    book = models.ForeignKey(Book, models.CASCADE, related_name="reviews")
    author = models.ForeignKey(
        Author, models.SET_NULL, null=True, blank=True, related_name="reviews"
    )
    stars = models.IntegerField()
    hidden = models.BooleanField(default=False)
    created = models.DateTimeField(null=True, blank=True)
    data = models.JSONField(default=dict, blank=True)

    objects = VisibleReviewManager()
    all_objects = models.Manager["Review"]()


class BookProfile(models.Model):
    book = models.OneToOneField(Book, models.CASCADE, related_name="profile")
    summary = models.TextField(default="")
    ip = models.GenericIPAddressField(null=True, blank=True)


class Edition(models.Model):
    """FK to a non-primary-key field (Book.isbn)."""

    book = models.ForeignKey(Book, models.CASCADE, to_field="isbn", related_name="editions")
    year = models.IntegerField()


class Comment(models.Model):
    content_type = models.ForeignKey(ContentType, models.CASCADE)
    object_id = models.PositiveIntegerField()
    content_object: Any = GenericForeignKey("content_type", "object_id")
    text = models.CharField(max_length=100)
