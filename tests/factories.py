"""Deterministic test data for tests/testapp/models.py."""

from __future__ import annotations

import datetime
import random
import uuid
from decimal import Decimal

from django.contrib.contenttypes.models import ContentType

from tests.testapp.models import (
    Author,
    Book,
    BookProfile,
    Comment,
    Country,
    EBook,
    Edition,
    Location,
    Page,
    Publisher,
    Review,
    Tag,
    Tagging,
)

TAG_NAMES = ("fiction", "history", "science", "poetry", "travel")


def seed_bookstore(n_books: int = 6, seed: int = 0) -> None:
    """Insert a bookstore touching every model and relation kind; same arguments, same rows.

    Per call: 2 countries, 3 locations (one without country), ``n_books // 2 + 3`` authors
    (chained mentors, one without location), 3 publishers (UUID pks, one without books), 5 tags,
    and ``n_books`` books (``n_books >= 2``) of which the last is an ``EBook``, the first has no
    publisher and the second no authors. Each book has 1-4 pages (inserted in reverse order),
    0-3 tags through ``Tagging``, 0-4 reviews (some hidden), 0-2 editions, and 0-2 comments; every
    other book has a profile. One comment is on an author (a second content type for the GFK).
    Emails, ISBNs and tag names are unique, so call it once per test database.
    """
    if n_books < 2:
        raise ValueError("n_books must be at least 2")
    rng = random.Random(seed)
    tz = datetime.UTC

    countries = Country.objects.bulk_create([Country(name=n) for n in ("Atlantis", "Borduria")])
    locations = Location.objects.bulk_create(
        [
            Location(name="Harbour", country=countries[0]),
            Location(name="Szohod", country=countries[1]),
            Location(name="Nowhere", country=None),
        ]
    )
    authors = Author.objects.bulk_create(
        [
            Author(
                name=f"Author {i:02d}",
                email=f"author{i:02d}@example.com",
                location=None if i == 0 else locations[i % len(locations)],
            )
            for i in range(n_books // 2 + 3)
        ]
    )
    for i, author in enumerate(authors):
        author.mentor = authors[i - 1] if i % 3 else None
    Author.objects.bulk_update(authors, ["mentor"])
    publishers = Publisher.objects.bulk_create(
        [
            Publisher(id=uuid.UUID(int=rng.getrandbits(128), version=4), name=name)
            for name in ("Penguin", "Faber", "Unread Press")
        ]
    )
    tags = Tag.objects.bulk_create([Tag(name=n) for n in TAG_NAMES])

    def book_fields(i: int) -> dict[str, object]:
        return {
            "title": f"Book {i:03d}",
            "isbn": f"978-{seed:03d}-{i:06d}",
            "publisher": None if i == 0 else publishers[i % 2],
            "published": datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randrange(9000)),
            "price": Decimal(rng.randrange(100, 5000)) / 100,
        }

    books = Book.objects.bulk_create([Book(**book_fields(i)) for i in range(n_books - 1)])
    books.append(EBook.objects.create(file_format="pdf", **book_fields(n_books - 1)))

    Through = Book.authors.through
    book_authors = []
    for i, book in enumerate(books):
        if i != 1:
            for author in rng.sample(authors, rng.randint(1, 3)):
                book_authors.append(Through(book_id=book.pk, author_id=author.pk))
    Through.objects.bulk_create(book_authors)

    Tagging.objects.bulk_create(
        [
            Tagging(book=book, tag=tag, weight=rng.randrange(10))
            for book in books
            for tag in rng.sample(tags, rng.randint(0, 3))
        ]
    )
    Page.objects.bulk_create(
        [
            Page(book=book, number=number, text=f"{book.title}, page {number}")
            for book in books
            for number in reversed(range(1, rng.randint(1, 4) + 1))
        ]
    )
    Review.all_objects.bulk_create(
        [
            Review(
                book=book,
                author=rng.choice([None, *authors]),
                stars=rng.randint(1, 5),
                hidden=rng.random() < 0.25,
                created=datetime.datetime(2024, 1, 1, tzinfo=tz)
                + datetime.timedelta(minutes=rng.randrange(500_000)),
                data={"source": rng.choice(["web", "mail"]), "helpful": rng.randrange(20)},
            )
            for book in books
            for _ in range(rng.randint(0, 4))
        ]
    )
    BookProfile.objects.bulk_create(
        [
            BookProfile(book=book, summary=f"About {book.title}", ip=f"192.0.2.{i}" if i else None)
            for i, book in enumerate(books)
            if i % 2 == 0
        ]
    )
    Edition.objects.bulk_create(
        [
            Edition(book=book, year=2000 + rng.randrange(25))
            for book in books
            for _ in range(rng.randint(0, 2))
        ]
    )
    book_type = ContentType.objects.get_for_model(Book)
    comments = [
        Comment(content_type=book_type, object_id=book.pk, text=f"On {book.title} #{k}")
        for book in books
        for k in range(rng.randint(0, 2))
    ]
    comments.append(
        Comment(
            content_type=ContentType.objects.get_for_model(Author),
            object_id=authors[0].pk,
            text="On an author",
        )
    )
    Comment.objects.bulk_create(comments)
