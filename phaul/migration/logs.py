"""A logger adapter that names the migration a message is about."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class MigrationLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """`log` with every message prefixed "migration ID: "."""

    def __init__(self, log: logging.Logger, migration_id: str) -> None:
        super().__init__(log, {"migration_id": migration_id})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        assert self.extra is not None
        return f"migration {self.extra['migration_id']}: {msg}", kwargs
