"""The bench's tables mapped for the peer ORMs: Tortoise ORM models (``T*``) and SQLAlchemy 2
declarative models (``S*``), on the table and column names Django created.

Only what the peers' sides of :mod:`async_prefetch.devtools.bench.peers` read is mapped, but
every column of a mapped table is, so that each side fetches rows as wide as Django's:
``Parent`` with its ten reverse foreign keys ``c0`` .. ``c9`` (``Child0`` .. ``Child9``), and
the demo's ``Book`` -> ``authors`` (many-to-many through Django's auto-created join table) ->
``location``, and ``Book`` -> ``pages``. Orderings follow the Django models' (children by
primary key, pages by ``number``); the many-to-many has no ordering, as in Django.

Importing this module needs both ``tortoise-orm`` and ``sqlalchemy`` (the ``peers`` extra);
it never touches a database. Tortoise registers the ``T*`` classes when
``Tortoise.init(modules={"models": [__name__]})`` names this module.
"""

from __future__ import annotations

import datetime

from sqlalchemy import BigInteger, Column, Date, ForeignKey, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from tortoise import fields
from tortoise.models import Model as TortoiseModel

PARENT_TABLE = "async_prefetch_bench_parent"
CHILD_TABLES = tuple(f"async_prefetch_bench_child{k}" for k in range(10))
BOOK_AUTHORS_TABLE = "async_prefetch_demo_book_authors"

# -- Tortoise ORM ---------------------------------------------------------------------------


class TParent(TortoiseModel):
    id = fields.BigIntField(primary_key=True)
    batch = fields.CharField(max_length=16)
    seq = fields.IntField()
    name = fields.CharField(max_length=50)

    c0: fields.ReverseRelation[TChild0]
    c1: fields.ReverseRelation[TChild1]
    c2: fields.ReverseRelation[TChild2]
    c3: fields.ReverseRelation[TChild3]
    c4: fields.ReverseRelation[TChild4]
    c5: fields.ReverseRelation[TChild5]
    c6: fields.ReverseRelation[TChild6]
    c7: fields.ReverseRelation[TChild7]
    c8: fields.ReverseRelation[TChild8]
    c9: fields.ReverseRelation[TChild9]

    class Meta:
        table = PARENT_TABLE
        ordering = ("id",)


class TChildBase(TortoiseModel):
    id = fields.BigIntField(primary_key=True)
    label = fields.CharField(max_length=40)
    value = fields.IntField()

    class Meta:
        abstract = True
        ordering = ("id",)


class TChild0(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c0"
    )

    class Meta:
        table = CHILD_TABLES[0]
        ordering = ("id",)


class TChild1(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c1"
    )

    class Meta:
        table = CHILD_TABLES[1]
        ordering = ("id",)


class TChild2(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c2"
    )

    class Meta:
        table = CHILD_TABLES[2]
        ordering = ("id",)


class TChild3(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c3"
    )

    class Meta:
        table = CHILD_TABLES[3]
        ordering = ("id",)


class TChild4(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c4"
    )

    class Meta:
        table = CHILD_TABLES[4]
        ordering = ("id",)


class TChild5(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c5"
    )

    class Meta:
        table = CHILD_TABLES[5]
        ordering = ("id",)


class TChild6(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c6"
    )

    class Meta:
        table = CHILD_TABLES[6]
        ordering = ("id",)


class TChild7(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c7"
    )

    class Meta:
        table = CHILD_TABLES[7]
        ordering = ("id",)


class TChild8(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c8"
    )

    class Meta:
        table = CHILD_TABLES[8]
        ordering = ("id",)


class TChild9(TChildBase):
    parent: fields.ForeignKeyRelation[TParent] = fields.ForeignKeyField(
        "models.TParent", related_name="c9"
    )

    class Meta:
        table = CHILD_TABLES[9]
        ordering = ("id",)


class TLocation(TortoiseModel):
    id = fields.BigIntField(primary_key=True)
    city = fields.CharField(max_length=100)

    class Meta:
        table = "async_prefetch_demo_location"


class TAuthor(TortoiseModel):
    id = fields.BigIntField(primary_key=True)
    name = fields.CharField(max_length=100)
    location: fields.ForeignKeyNullableRelation[TLocation] = fields.ForeignKeyField(
        "models.TLocation", related_name="authors", null=True
    )

    class Meta:
        table = "async_prefetch_demo_author"


class TBook(TortoiseModel):
    id = fields.BigIntField(primary_key=True)
    title = fields.CharField(max_length=200)
    publisher_id = fields.BigIntField()
    published = fields.DateField()
    authors: fields.ManyToManyRelation[TAuthor] = fields.ManyToManyField(
        "models.TAuthor",
        related_name="books",
        through=BOOK_AUTHORS_TABLE,
        backward_key="book_id",
        forward_key="author_id",
    )
    pages: fields.ReverseRelation[TPage]

    class Meta:
        table = "async_prefetch_demo_book"


class TPage(TortoiseModel):
    id = fields.BigIntField(primary_key=True)
    book: fields.ForeignKeyRelation[TBook] = fields.ForeignKeyField(
        "models.TBook", related_name="pages"
    )
    number = fields.IntField()
    text = fields.TextField()

    class Meta:
        table = "async_prefetch_demo_page"
        ordering = ("number",)


T_CHILDREN: tuple[type[TChildBase], ...] = (
    TChild0,
    TChild1,
    TChild2,
    TChild3,
    TChild4,
    TChild5,
    TChild6,
    TChild7,
    TChild8,
    TChild9,
)


# -- SQLAlchemy 2 ---------------------------------------------------------------------------


class PeerBase(DeclarativeBase):
    """The declarative base of the ``S*`` models (its own metadata; never ``create_all``)."""


class SParent(PeerBase):
    __tablename__ = PARENT_TABLE

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    batch: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(50))

    c0: Mapped[list[SChild0]] = relationship(order_by="SChild0.id", lazy="raise")
    c1: Mapped[list[SChild1]] = relationship(order_by="SChild1.id", lazy="raise")
    c2: Mapped[list[SChild2]] = relationship(order_by="SChild2.id", lazy="raise")
    c3: Mapped[list[SChild3]] = relationship(order_by="SChild3.id", lazy="raise")
    c4: Mapped[list[SChild4]] = relationship(order_by="SChild4.id", lazy="raise")
    c5: Mapped[list[SChild5]] = relationship(order_by="SChild5.id", lazy="raise")
    c6: Mapped[list[SChild6]] = relationship(order_by="SChild6.id", lazy="raise")
    c7: Mapped[list[SChild7]] = relationship(order_by="SChild7.id", lazy="raise")
    c8: Mapped[list[SChild8]] = relationship(order_by="SChild8.id", lazy="raise")
    c9: Mapped[list[SChild9]] = relationship(order_by="SChild9.id", lazy="raise")


class SChildColumns:
    """The columns of every child table (``parent_id`` is declared per class)."""

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label: Mapped[str] = mapped_column(String(40))
    value: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int]


class SChild0(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[0]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild1(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[1]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild2(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[2]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild3(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[3]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild4(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[4]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild5(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[5]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild6(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[6]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild7(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[7]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild8(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[8]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


class SChild9(SChildColumns, PeerBase):
    __tablename__ = CHILD_TABLES[9]
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENT_TABLE}.id"))


S_CHILDREN: tuple[type[SChildColumns], ...] = (
    SChild0,
    SChild1,
    SChild2,
    SChild3,
    SChild4,
    SChild5,
    SChild6,
    SChild7,
    SChild8,
    SChild9,
)

book_authors = Table(
    BOOK_AUTHORS_TABLE,
    PeerBase.metadata,
    Column("id", BigInteger, primary_key=True),
    Column("book_id", BigInteger, ForeignKey("async_prefetch_demo_book.id")),
    Column("author_id", BigInteger, ForeignKey("async_prefetch_demo_author.id")),
)


class SLocation(PeerBase):
    __tablename__ = "async_prefetch_demo_location"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    city: Mapped[str] = mapped_column(String(100))


class SAuthor(PeerBase):
    __tablename__ = "async_prefetch_demo_author"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    location_id: Mapped[int | None] = mapped_column(ForeignKey(SLocation.id))
    location: Mapped[SLocation | None] = relationship(lazy="raise")


class SPage(PeerBase):
    __tablename__ = "async_prefetch_demo_page"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    book_id: Mapped[int] = mapped_column(ForeignKey("async_prefetch_demo_book.id"))
    number: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)


class SBook(PeerBase):
    __tablename__ = "async_prefetch_demo_book"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    publisher_id: Mapped[int] = mapped_column(BigInteger)
    published: Mapped[datetime.date] = mapped_column(Date)
    authors: Mapped[list[SAuthor]] = relationship(secondary=book_authors, lazy="raise")
    pages: Mapped[list[SPage]] = relationship(order_by=SPage.number, lazy="raise")
