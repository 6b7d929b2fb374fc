"""The ``ASYNC_PREFETCH`` setting: defaults, case-insensitive keys, validation."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from pytest_django.fixtures import Settings

from async_prefetch.config import EngineConfig, PoolConfig, load_config


def test_defaults(settings: Settings) -> None:
    settings.ASYNC_PREFETCH = {}
    assert load_config() == EngineConfig(
        pool=PoolConfig(), max_concurrency=10, install=False, chunk_size=5000
    )


def test_keys_are_case_insensitive(settings: Settings) -> None:
    settings.ASYNC_PREFETCH = {
        "pool": {"min_size": 1, "Max_Size": 4, "check": True},
        "chunk_size": None,
        "Install": True,
    }
    config = load_config()
    assert (config.pool.min_size, config.pool.max_size, config.pool.check) == (1, 4, True)
    assert config.chunk_size is None
    assert config.install is True


def test_max_concurrency_defaults_to_the_pool_size(settings: Settings) -> None:
    settings.ASYNC_PREFETCH = {"POOL": {"MAX_SIZE": 3}}
    assert load_config().max_concurrency == 3
    settings.ASYNC_PREFETCH = {"POOL": {"MAX_SIZE": 3}, "MAX_CONCURRENCY": 7}
    assert load_config().max_concurrency == 7


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"POOLS": {}}, "unknown keys"),
        ({"POOL": {"SIZE": 3}}, "unknown keys"),
        ({"POOL": []}, "must be a dict"),
        ({"POOL": {"MIN_SIZE": 5, "MAX_SIZE": 2}}, "MIN_SIZE <= MAX_SIZE"),
        ({"MAX_CONCURRENCY": 0}, "MAX_CONCURRENCY"),
        ({"CHUNK_SIZE": 0}, "CHUNK_SIZE"),
    ],
)
def test_bad_values_raise(settings: Settings, value: object, message: str) -> None:
    settings.ASYNC_PREFETCH = value
    with pytest.raises(ImproperlyConfigured, match=message):
        load_config()


def test_a_setting_changed_in_place_or_back_is_read_again(settings: Settings) -> None:
    """The config is kept between calls, but never past a change to the setting."""
    settings.ASYNC_PREFETCH = {"POOL": {"MAX_SIZE": 3}}
    first = load_config()
    assert load_config() is first  # unchanged: not read again
    settings.ASYNC_PREFETCH["POOL"]["MAX_SIZE"] = 5  # in place, nested
    assert load_config().pool.max_size == 5
    settings.ASYNC_PREFETCH["MAX_CONCURRENCY"] = 0
    with pytest.raises(ImproperlyConfigured, match="MAX_CONCURRENCY"):
        load_config()
    settings.ASYNC_PREFETCH = {"POOL": {"MAX_SIZE": 3}}
    assert load_config() == first
