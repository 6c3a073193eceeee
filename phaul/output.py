"""The CLI's JSON outputs: one document per command, each carrying
`schema_version`, described by a JSON Schema in phaul/schemas/ (shipped in the
package; tests/test_json_schemas.py validates representative outputs).

The CLI renders every --json output with these functions and nothing else, so
the schemas, the tests and what scripts see cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from phaul.errors import PhaulError

SCHEMA_VERSION = 1  # bumped when a field is removed or changes meaning (adding one does not)
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def schema_path(name: str) -> Path:
    """The JSON Schema of the output `name` (e.g. "report", "error")."""
    return SCHEMA_DIR / f"{name}.json"


def dumps(document: dict[str, Any]) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, **document}, indent=2)


def error(err: PhaulError) -> str:
    """An error as --json prints it on stderr (schema: error.json)."""
    return json.dumps({
        "schema_version": SCHEMA_VERSION, "error": err.message, "hint": err.hint, "exit_code": int(err.exit_code),
        "kind": type(err).__name__,
    })


def usage_error(message: str, exit_code: int) -> str:
    """A command-line mistake argparse found, as --json prints it (schema: error.json)."""
    return json.dumps({
        "schema_version": SCHEMA_VERSION, "error": message, "hint": "see `phaul --help`", "exit_code": exit_code,
        "kind": "UsageError",
    })


def listing(key: str, rows: Sequence[Any]) -> str:
    """A list output: {"schema_version": 1, key: [rows]}; dataclass rows become objects."""
    return dumps({key: [asdict(r) if hasattr(r, "__dataclass_fields__") else r for r in rows]})
