"""pycriu, CRIU's Python bindings: not on PyPI, so not a pip dependency.

scripts/setup.sh builds it from the CRIU source tree it builds CRIU from and
installs it into the project's venv. Code that reads CRIU images gets it with
`load()`, which names the fix when it is missing; `phaul doctor` reports it.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from phaul.errors import ToolFailed

log = logging.getLogger(__name__)

FIX = (
    "install CRIU's Python bindings into the Python phaul runs with: `make setup` does it for the checkout's .venv; "
    "elsewhere build them from the same CRIU source as criu (`make -C CRIU_SRC lib`, then `pip install CRIU_SRC/lib`)"
)


def missing() -> str:
    """Why pycriu cannot be imported here, or "" when it can."""
    try:
        importlib.import_module("pycriu.images")
    except ImportError as e:
        return str(e) or "no module named 'pycriu'"
    return ""


def load(purpose: str) -> ModuleType:
    """The pycriu module; ToolFailed naming the fix when it is missing. `purpose` says what needed it."""
    try:
        module = importlib.import_module("pycriu")
        importlib.import_module("pycriu.images")
    except ImportError as e:
        raise ToolFailed(f"pycriu is missing ({e}), so phaul cannot {purpose}", FIX) from e
    return module
