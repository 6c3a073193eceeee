"""The default seccomp profile, turned into an OCI `linux.seccomp` section.

phaul/data/seccomp.json is the Docker/Podman default profile (origin and
licence in seccomp.json.README beside it), in Docker's format: rules whose
`includes`/`excludes` name capabilities and architectures. `oci_seccomp`
keeps the rules that apply to a container with the given capabilities on
this machine's architecture, as moby's profile loader does, and writes them
in the runtime spec's form (defaultAction, architectures, syscalls with
names, action, args and errnoRet).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from phaul.errors import InvalidInput

PROFILE = Path(__file__).resolve().parents[1] / "data" / "seccomp.json"

# platform.machine() -> the architecture names Docker's profile uses (Go's GOARCH, "x86" for 386)
_DOCKER_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i386": "x86", "i686": "x86",
    "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}  # fmt: skip
_SCMP_ARCH = {
    "amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64", "x86": "SCMP_ARCH_X86", "arm": "SCMP_ARCH_ARM",
    "ppc64le": "SCMP_ARCH_PPC64LE", "s390x": "SCMP_ARCH_S390X", "riscv64": "SCMP_ARCH_RISCV64",
}  # fmt: skip
_FILTER_KEYS = {"caps", "arches"}


def native_arch(machine: str | None = None) -> str:
    """This machine's architecture as the profile names it ("amd64", "arm64", ...)."""
    machine = machine or platform.machine()
    try:
        return _DOCKER_ARCH[machine]
    except KeyError:
        raise InvalidInput(
            f"no seccomp architecture known for machine {machine!r}", "create the container with --seccomp unconfined"
        ) from None


@lru_cache(maxsize=1)
def _profile() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(PROFILE.read_text())
    for rule in data["syscalls"]:
        for key in ("includes", "excludes"):
            unknown = set(rule.get(key) or {}) - _FILTER_KEYS
            if unknown:  # e.g. minKernel: a newer profile than this converter knows
                raise ValueError(f"{PROFILE}: rule {rule['names'][:3]} has {key} {sorted(unknown)} this converter ignores")
    return data


def oci_seccomp(caps: Iterable[str], arch: str | None = None) -> dict[str, Any]:
    """The OCI `linux.seccomp` section for a container whose bounding set is `caps`
    ("CAP_..." names), on architecture `arch` (default: this machine's)."""
    arch = arch or native_arch()
    held = set(caps)
    profile = _profile()
    architectures: list[str] = []
    for entry in profile.get("archMap") or []:
        if entry["architecture"] == _SCMP_ARCH.get(arch):
            architectures = [entry["architecture"], *entry.get("subArchitectures", [])]
    syscalls = []
    for rule in profile["syscalls"]:
        inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
        if inc.get("arches") and arch not in inc["arches"]:
            continue
        if inc.get("caps") and not held.issuperset(inc["caps"]):
            continue
        if arch in (exc.get("arches") or []) or held.intersection(exc.get("caps") or []):
            continue
        out: dict[str, Any] = {"names": list(rule["names"]), "action": rule["action"]}
        if rule.get("args"):
            out["args"] = [
                {"index": a["index"], "value": a["value"], "valueTwo": a.get("valueTwo", 0), "op": a["op"]}
                for a in rule["args"]
            ]
        if "errnoRet" in rule:
            out["errnoRet"] = rule["errnoRet"]
        syscalls.append(out)
    section: dict[str, Any] = {"defaultAction": profile["defaultAction"], "architectures": architectures, "syscalls": syscalls}
    if "defaultErrnoRet" in profile:
        section["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return section
