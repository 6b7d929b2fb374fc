"""A small bookstore: the relations a typical list page prefetches."""

from __future__ import annotations

from django.db import models


class Publisher(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Location(models.Model):
    city = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.city


class Author(models.Model):
    name = models.CharField(max_length=100)
    location = models.ForeignKey(
        Location, models.SET_NULL, null=True, blank=True, related_name="authors"
    )

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    title = models.CharField(max_length=200)
    publisher = models.ForeignKey(Publisher, models.CASCADE, related_name="books")
    authors = models.ManyToManyField(Author, related_name="books")
    tags = models.ManyToManyField(Tag, related_name="books")
    published = models.DateField()

    def __str__(self) -> str:
        return self.title


class Page(models.Model):
    book = models.ForeignKey(Book, models.CASCADE, related_name="pages")
    number = models.IntegerField()
    text = models.TextField()

    class Meta:
        ordering = ("number",)


class Review(models.Model):
    book = models.ForeignKey(Book, models.CASCADE, related_name="reviews")
    stars = models.IntegerField()
    body = models.TextField()
