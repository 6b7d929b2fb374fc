"""``ASYNC_PREFETCH["REPLICAS"]`` and ``["REPLICA_MAX_LAG"]``: reading and validation."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from pytest_django.fixtures import Settings

from async_prefetch.checks import check_settings
from async_prefetch.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


@pytest.fixture
def databases(settings: Settings) -> None:
    default = settings.DATABASES["default"]
    settings.DATABASES = {**settings.DATABASES, "replica_a": default, "replica_b": default}


def test_defaults(settings: Settings) -> None:
    settings.ASYNC_PREFETCH = {}
    config = load_config()
    assert config.replicas == ()
    assert config.replicas_of("default") == ()
    assert config.replica_max_lag is None


def test_replicas_by_alias(settings: Settings, databases: None) -> None:
    settings.ASYNC_PREFETCH = {
        "replicas": {"default": ["replica_a", "replica_b"]},
        "Replica_Max_Lag": 2,
    }
    config = load_config()
    assert config.replicas_of("default") == ("replica_a", "replica_b")
    assert config.replicas_of("replica_a") == ()
    assert config.replica_max_lag == 2.0
    settings.ASYNC_PREFETCH = {"REPLICAS": {"default": ("default", "replica_a")}}
    assert load_config().replicas_of("default") == ("default", "replica_a")


@pytest.mark.parametrize(
    ("value", "check_id", "message"),
    [
        ({"REPLICAS": ["replica_a"]}, "E001", "ASYNC_PREFETCH['REPLICAS'] must be a dict"),
        ({"REPLICAS": {"other": ["replica_a"]}}, "E006", "names unknown database 'other'"),
        ({"REPLICAS": {"default": ["nope"]}}, "E006", "['default'] names unknown database 'nope'"),
        ({"REPLICAS": {"default": "replica_a"}}, "E004", "must be a non-empty list"),
        ({"REPLICAS": {"default": []}}, "E004", "must be a non-empty list"),
        (
            {"REPLICAS": {"default": ["replica_a", "replica_a"]}},
            "E005",
            "lists ['replica_a'] more than once",
        ),
        ({"REPLICA_MAX_LAG": 0}, "E005", "more than 0 seconds or None"),
        ({"REPLICA_MAX_LAG": True}, "E004", "number of seconds or None, not bool"),
        ({"REPLICA_MAX_LAG": "5"}, "E004", "number of seconds or None, not str"),
        ({"REPLICA_MAX_LAG_S": 5}, "E002", "Did you mean 'REPLICA_MAX_LAG'?"),
    ],
)
def test_bad_values(
    settings: Settings, databases: None, value: object, check_id: str, message: str
) -> None:
    settings.ASYNC_PREFETCH = value
    errors = check_settings()
    assert [error.id for error in errors] == [f"async_prefetch.{check_id}"]
    assert message in errors[0].msg + (errors[0].hint or "")
    with pytest.raises(ImproperlyConfigured, match=check_id):
        load_config()


def test_unknown_alias_hint_lists_the_databases(settings: Settings, databases: None) -> None:
    settings.ASYNC_PREFETCH = {"REPLICAS": {"default": ["replica_c"]}}
    (error,) = check_settings()
    assert error.hint == "Aliases in DATABASES: 'default', 'replica_a', 'replica_b'."
