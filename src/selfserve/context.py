"""Per-app collaborators handed to handlers as dependencies."""

from __future__ import annotations

from typing import Any

import asyncpg
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide

from selfserve.auth.guards import provide_principal
from selfserve.settings import Settings


def provide_pool(state: State) -> asyncpg.Pool:
    pool: asyncpg.Pool = state.pool
    return pool


def provide_settings(state: State) -> Settings:
    settings: Settings = state.settings
    return settings


def provide_redis(state: State) -> Any:
    return state.redis


DEPENDENCIES = {
    "principal": Provide(provide_principal),
    "pool": Provide(provide_pool, sync_to_thread=False),
    "settings": Provide(provide_settings, sync_to_thread=False),
    "redis": Provide(provide_redis, sync_to_thread=False),
}


# Explicitly named dependencies for handler signatures (Litestar >= 2.23 style).
DbPool = NamedDependency[asyncpg.Pool]
AppSettings = NamedDependency[Settings]
