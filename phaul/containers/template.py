"""Root file systems for new containers.

`build_rootfs("busybox", path, cache)` gives a minimal root built from what the
host has installed: a static busybox with a symlink per applet in /bin, the
directories an OCI runtime mounts over, root's /etc/passwd and /etc/group, and
the project's static workload programs. `"debian"` unpacks a Debian bookworm
root with the given packages (phaul.containers.debian: mmdebstrap, cached) and
adds the workload programs to /usr/local/bin. `"rootfs"` and `"image"` bring
the user's own (phaul.containers.imports).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from phaul.containers import ContainerConfig, workloads
from phaul.containers.debian import RootfsCache, debian_tarball, unpack_tarball
from phaul.containers.imports import ImageDefaults, copy_rootfs, unpack_image
from phaul.errors import InvalidInput, ToolFailed
from phaul.linux.fsutil import is_static_elf

log = logging.getLogger(__name__)

TEMPLATES = ("busybox", "debian")
SOURCES = ("rootfs", "image")  # ct create --rootfs, --image

_DIRS = {  # path in the rootfs -> mode
    "bin": 0o755,
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
    "tmp": 0o1777,
    "etc": 0o755,
    "root": 0o700,
    "run": 0o755,
    "var": 0o755,
}
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def build_rootfs(
    config: ContainerConfig, rootfs: Path, cache: RootfsCache, programs: workloads.WorkloadDir | None = None
) -> ImageDefaults | None:
    """Fill `rootfs` (must not exist) as `config.template` says: a template, a copy of
    `config.rootfs` ("rootfs") or the unpacked `config.image` ("image", whose process
    defaults are returned). Templates get the workload programs in `programs`
    (default: phaul.containers.workloads.find())."""
    template, rootfs = config.template, Path(rootfs)
    programs = programs or workloads.find()
    if template not in TEMPLATES + SOURCES:
        raise InvalidInput(f"unknown template {template!r}", f"use one of: {', '.join(TEMPLATES)}")
    if config.packages and template != "debian":
        raise InvalidInput(f"the {template} template takes no packages", "use --template debian --packages ...")
    if template == "image":
        return unpack_image(config.image, config.image_ref, rootfs)
    if template == "rootfs":
        copy_rootfs(config.rootfs, rootfs)
    elif template == "debian":
        unpack_tarball(debian_tarball(cache, config.packages), rootfs)
        add_workloads(programs, rootfs / "usr" / "local" / "bin")
    else:
        _build_busybox(rootfs, programs)
    return None


def add_workloads(programs: workloads.WorkloadDir, bin_dir: Path) -> None:
    """Copy the project's static workload programs (those present in `programs`) into `bin_dir`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    present = programs.present()
    if not present:
        log.debug("no workload programs in %s (%s); the root gets none", programs.path, programs.origin)
    for name in present:
        src = programs.path / name
        dst = bin_dir / name
        dst.unlink(missing_ok=True)  # an applet of the same name must not be overwritten through its link
        shutil.copy2(src, dst)
        dst.chmod(0o755)


def _build_busybox(rootfs: Path, programs: workloads.WorkloadDir) -> None:
    busybox = _static_busybox()
    rootfs.mkdir(parents=True, exist_ok=True)
    for name, mode in _DIRS.items():
        d = rootfs / name
        d.mkdir(exist_ok=True)
        d.chmod(mode)  # mkdir's mode is filtered by the umask; /tmp needs its sticky bit
    bin_dir = rootfs / "bin"
    shutil.copy2(busybox, bin_dir / "busybox")
    for applet in _applets(busybox):
        link = bin_dir / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(_PASSWD)
    (rootfs / "etc" / "group").write_text(_GROUP)
    add_workloads(programs, bin_dir)


def _static_busybox() -> Path:
    """The host's busybox if it is statically linked (Debian's busybox-static)."""
    hint = "install Debian's busybox-static: apt-get install busybox-static"
    found = shutil.which("busybox") or ("/bin/busybox" if Path("/bin/busybox").exists() else None)
    if found is None:
        raise ToolFailed("busybox not found on this host", hint)
    path = Path(found).resolve()
    if not is_static_elf(path):
        raise ToolFailed(f"{path} is dynamically linked and cannot run inside a bare container", hint)
    return path


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolFailed(f"`{busybox} --list` failed: {e}", "reinstall busybox-static") from e
    names = [n.strip() for n in out.stdout.splitlines()]
    return [n for n in names if n and "/" not in n and n not in {".", ".."}]

