"""The primary's copy of the checkpoint its standby host keeps: the basis of the next
refresh's page delta (phaul.memory.page_delta).

After a refresh the standby host has kept, its images stay here, in
`STATE/standby-out/basis/<ct>/`: `images/` and `basis.json` naming the standby host
and the refresh (its migration ID, the kept generation). The next refresh names that
generation at Prepare; when it is still the standby host's recovery point, the standby
host starts the new checkpoint's images as links of it and the source sends only the
pages that differ. Any doubt (another host, a generation the standby host no longer
holds, a half-written basis) means no basis: the images travel whole, as on the first
refresh. It costs one copy of the container's dumped memory on the primary's disk.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from phaul.errors import InvalidInput
from phaul.linux.fsutil import write_atomic
from phaul.validate import check_id

log = logging.getLogger(__name__)

MARK = "basis.json"


@dataclass(frozen=True)
class Basis:
    images: Path
    gen: str  # the refresh whose checkpoint these images are (its migration ID)


class Bases:
    """The bases of this host's standby copies."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "standby-out" / "basis"

    def _dir(self, ct_id: str) -> Path:
        return self.root / check_id(ct_id)

    def get(self, ct_id: str, host: str) -> Basis | None:
        """The basis of `ct_id`'s standby on `host`, if any."""
        d = self._dir(ct_id)
        try:
            mark = json.loads((d / MARK).read_text())
            if mark["host"] != host or not (d / "images").is_dir():
                return None
            return Basis(d / "images", check_id(str(mark["gen"]), "migration ID"))
        except (OSError, ValueError, KeyError, TypeError, InvalidInput):
            return None

    def replace(self, ct_id: str, host: str, images: Path, gen: str) -> None:
        """`images` (moved here) is what `host` keeps now, as refresh `gen`."""
        d = self._dir(ct_id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / MARK).unlink(missing_ok=True)  # no basis while the images change
        shutil.rmtree(d / "images", ignore_errors=True)
        images.rename(d / "images")
        write_atomic(d / MARK, json.dumps({"host": host, "gen": gen}) + "\n")

    def drop(self, ct_id: str) -> None:
        shutil.rmtree(self._dir(ct_id), ignore_errors=True)
