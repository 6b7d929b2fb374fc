"""The benchmark's workloads: what to seed, which queryset to fetch, which lookups to prefetch.

A :class:`Workload` bundles an idempotent, deterministic ``seed()`` (bulk inserts on the
``default`` database; the bench's own tables are topped up to the size asked for, so runs
with different sizes can share a database, while ``chain`` uses the demo's bookstore, which
is seeded only when empty), ``root(alias)`` (the unevaluated root queryset on a database alias),
``lookups()`` (fresh lookup objects for each run) and the relation paths that make up its
structural signature (:func:`async_prefetch.devtools.signature.signature`).
:func:`build_workloads` returns them by name, in report order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from django.db import transaction
from django.db.models import Model, Prefetch, QuerySet

from async_prefetch.devtools.demo.bookstore import seed as seed_bookstore
from async_prefetch.devtools.signature import Node, signature

if TYPE_CHECKING:
    from async_prefetch.devtools.bench.models import ChildBase

Lookup: TypeAlias = "str | Prefetch[Any]"

NAMES = ("fanout-100", "fanout-1000", "chain", "wide-m2m", "big-batch", "slow-server")
"""The workloads :func:`build_workloads` returns, in report order (importable before
Django is configured: the models load only when the functions run)."""


def children() -> tuple[type[ChildBase], ...]:
    """``Child0`` .. ``Child9``; ``children()[k]`` is reached from ``Parent`` as ``c{k}``."""
    from async_prefetch.devtools.bench import models

    return (
        models.Child0,
        models.Child1,
        models.Child2,
        models.Child3,
        models.Child4,
        models.Child5,
        models.Child6,
        models.Child7,
        models.Child8,
        models.Child9,
    )


SEED_DB = "default"
_BATCH_SIZE = 5000


@dataclass(frozen=True)
class Workload:
    """One benchmark case. ``paths`` name every prefetched relation (``a``, ``a__b``) whose ids
    and order the signature records; relations in ``unordered`` have no defined order (no
    ``ordering``), so their ids are compared sorted. ``runs`` overrides the default number of
    timed runs (slow or big workloads run fewer)."""

    name: str
    description: str
    seed: Callable[[], bool]
    root: Callable[[str], QuerySet[Any]]
    lookups: Callable[[], list[Lookup]]
    paths: tuple[str, ...]
    unordered: frozenset[str] = field(default_factory=frozenset)
    runs: int | None = None

    def queryset(self, alias: str) -> QuerySet[Any]:
        """``root(alias).prefetch_related(*lookups())``: what Django's side evaluates."""
        return self.root(alias).prefetch_related(*self.lookups())

    def signature(self, roots: Sequence[Model]) -> list[Node]:
        """The structural signature of fetched ``roots`` (see
        :func:`async_prefetch.devtools.signature.signature`)."""
        return signature(roots, self.paths, self.unordered)


# -- seeding --------------------------------------------------------------------------------


def seed_parents(
    batch: str, n: int, relations: Sequence[int], rows: Callable[[int, int], int]
) -> bool:
    """Make sure ``batch`` has parents ``seq`` 0..n-1; new ones get ``rows(seq, k)`` children
    in each relation ``c{k}`` for ``k`` in ``relations``. Returns whether rows were inserted."""
    from async_prefetch.devtools.bench.models import Parent

    existing = set(
        Parent.objects.using(SEED_DB).filter(batch=batch, seq__lt=n).values_list("seq", flat=True)
    )
    missing = [seq for seq in range(n) if seq not in existing]
    if not missing:
        return False
    with transaction.atomic(using=SEED_DB):
        parents = Parent.objects.using(SEED_DB).bulk_create(
            (Parent(batch=batch, seq=seq, name=f"{batch} {seq}") for seq in missing),
            batch_size=_BATCH_SIZE,
        )
        for k in relations:
            model = children()[k]
            model._default_manager.using(SEED_DB).bulk_create(
                (
                    model(
                        parent=parent,
                        label=f"c{k}-{parent.seq}-{j}",
                        value=(parent.seq * 31 + j * 7 + k) % 1000,
                    )
                    for parent in parents
                    for j in range(rows(parent.seq, k))
                ),
                batch_size=_BATCH_SIZE,
            )
    return True


def seed_wide(n_articles: int, n_labels: int = 1000, per_article: int = 50) -> bool:
    """Make sure labels ``seq`` 0..n_labels-1 and articles 0..n_articles-1 exist; each new
    article gets ``per_article`` distinct labels through ``ArticleLabel`` with a weight 0-99."""
    from async_prefetch.devtools.bench.models import Article, ArticleLabel, Label

    have_labels = set(
        Label.objects.using(SEED_DB).filter(seq__lt=n_labels).values_list("seq", flat=True)
    )
    have_articles = set(
        Article.objects.using(SEED_DB).filter(seq__lt=n_articles).values_list("seq", flat=True)
    )
    new_labels = [seq for seq in range(n_labels) if seq not in have_labels]
    new_articles = [seq for seq in range(n_articles) if seq not in have_articles]
    if not new_labels and not new_articles:
        return False
    with transaction.atomic(using=SEED_DB):
        Label.objects.using(SEED_DB).bulk_create(
            (Label(seq=s, name=f"label-{s:05d}", featured=s % 10 == 0) for s in new_labels),
            batch_size=_BATCH_SIZE,
        )
        label_pk = dict(
            Label.objects.using(SEED_DB).filter(seq__lt=n_labels).values_list("seq", "pk")
        )
        articles = Article.objects.using(SEED_DB).bulk_create(
            (Article(seq=s, title=f"Article {s}") for s in new_articles), batch_size=_BATCH_SIZE
        )
        # 13 is coprime with n_labels (1000): the labels of one article are distinct.
        ArticleLabel.objects.using(SEED_DB).bulk_create(
            (
                ArticleLabel(
                    article=article,
                    label_id=label_pk[(article.seq * 7 + j * 13) % n_labels],
                    weight=(article.seq * 31 + j * 17) % 100,
                )
                for article in articles
                for j in range(per_article)
            ),
            batch_size=_BATCH_SIZE,
        )
    return True


def _fanout_rows(seq: int, k: int) -> int:
    return 2 + (seq + 2 * k) % 3  # 2, 3 or 4: three on average


def _big_rows(seq: int, k: int) -> int:
    return 1 + seq % 2


# -- workloads ------------------------------------------------------------------------------


def _parents(batch: str, n: int) -> Callable[[str], QuerySet[Any]]:
    def root(alias: str) -> QuerySet[Any]:
        from async_prefetch.devtools.bench.models import Parent

        return Parent.objects.using(alias).filter(batch=batch, seq__lt=n).order_by("seq")

    return root


def _sleeping(seconds: float) -> Callable[[], list[Lookup]]:
    where = f"EXISTS (SELECT 1 FROM pg_sleep({seconds:g}))"  # evaluated once per query

    def lookups() -> list[Lookup]:
        models = children()
        return [
            Prefetch(f"c{k}", queryset=models[k]._default_manager.extra(where=[where]))
            for k in range(5)
        ]

    return lookups


def _wide_lookups() -> list[Lookup]:
    from async_prefetch.devtools.bench.models import ArticleLabel, Label

    return [
        "labels",
        Prefetch("labels", queryset=Label.objects.filter(featured=True), to_attr="featured_labels"),
        Prefetch(
            "links",
            queryset=ArticleLabel.objects.filter(weight__gte=80)
            .select_related("label")
            .order_by("-weight", "pk"),
            to_attr="heavy_links",
        ),
    ]


def _chain_root(n: int) -> Callable[[str], QuerySet[Any]]:
    def root(alias: str) -> QuerySet[Any]:
        from async_prefetch.devtools.demo.models import Book

        return Book.objects.using(alias).order_by("pk")[:n]

    return root


def build_workloads(quick: bool = False) -> dict[str, Workload]:
    """All workloads by name, in report order (:data:`NAMES`); ``quick`` shrinks them for a
    smoke test. Needs configured Django settings."""
    from async_prefetch.devtools.bench.models import Article

    fanout_n = 100 if quick else 1000
    small_n = 20 if quick else 100
    big_n = 2000 if quick else 20_000
    articles = 40 if quick else 300
    books = 50 if quick else 200
    sleep = 0.05 if quick else 0.3
    slow_n = 5 if quick else 20
    fanout_lookups = [f"c{k}" for k in range(10)]
    # ``c0__parent``: Django sets each child's cache back to its parent; reading it must not query.
    fanout_paths = tuple(p for k in range(10) for p in (f"c{k}", f"c{k}__parent"))

    def seed_fanout() -> bool:
        return seed_parents("fanout", fanout_n, range(10), _fanout_rows)

    def fanout(name: str, n: int) -> Workload:
        return Workload(
            name=name,
            description=f"{n} parents x 10 reverse FKs of ~3 rows",
            seed=seed_fanout,
            root=_parents("fanout", n),
            lookups=lambda: list(fanout_lookups),
            paths=fanout_paths,
        )

    workloads = [
        fanout("fanout-100", small_n),
        fanout("fanout-1000", fanout_n),
        Workload(
            name="chain",
            description=f"{books} books -> authors (M2M) -> location, + pages",
            seed=lambda: seed_bookstore(200),
            root=_chain_root(books),
            lookups=lambda: ["authors__location", "pages"],
            paths=("authors", "authors__location", "pages", "pages__book"),
            unordered=frozenset({"authors"}),
        ),
        Workload(
            name="wide-m2m",
            description=f"{articles} articles x 50 labels through ArticleLabel(weight), to_attr",
            seed=lambda: seed_wide(articles),
            root=lambda alias: Article.objects.using(alias).filter(seq__lt=articles),
            lookups=_wide_lookups,
            paths=(
                "labels",
                "featured_labels",
                "heavy_links",
                "heavy_links__label",
                "heavy_links__article",
            ),
        ),
        Workload(
            name="big-batch",
            description=f"{big_n} parents, one reverse FK (long id lists)",
            seed=lambda: seed_parents("big", big_n, [0], _big_rows),
            root=_parents("big", big_n),
            lookups=lambda: ["c0"],
            paths=("c0", "c0__parent"),
            runs=3,
        ),
        Workload(
            name="slow-server",
            description=f"{slow_n} parents, 5 sibling Prefetch querysets of {sleep:g} s each",
            seed=seed_fanout,
            root=_parents("fanout", slow_n),
            lookups=_sleeping(sleep),
            paths=tuple(p for k in range(5) for p in (f"c{k}", f"c{k}__parent")),
            runs=3,
        ),
    ]
    assert tuple(w.name for w in workloads) == NAMES
    return {workload.name: workload for workload in workloads}
