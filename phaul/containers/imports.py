"""Root file systems users bring: a directory or tarball (`--rootfs`), or an OCI image
(`--image`: an OCI image layout directory, an OCI archive or a `docker save` archive).

`copy_rootfs` copies a directory keeping owners, modes, hard links, ACLs, xattrs
(file capabilities) and holes (`cp -a`), or unpacks a tarball the same way.
`unpack_image` brings the image into a private OCI layout with Debian's skopeo
(which reads every format above and picks the one image named), unpacks it with
umoci (layers in order, whiteouts applied, owners kept) and returns what the
image's configuration says the container runs: command, environment, user,
working directory (umoci's runtime spec, with USER resolved in the image's
/etc/passwd and /etc/group).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from phaul.containers.debian import unpack_tarball
from phaul.errors import InvalidInput, ToolFailed

log = logging.getLogger(__name__)

TOOL_TIMEOUT = 1800.0
_REF_NAME = "org.opencontainers.image.ref.name"
_TAG = "phaul"  # the tag in the private layout


@dataclass
class ImageDefaults:
    """What an image's configuration gives the container (umoci's config.json process)."""

    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    cwd: str = "/"


def _source(path_text: str, what: str) -> Path:
    if not path_text:
        raise InvalidInput(f"no path given for {what}", f"give the {what}'s absolute path on the agent's host")
    path = Path(path_text)
    if not path.is_absolute():
        raise InvalidInput(f"{what} path {path_text!r} is not absolute", "give the absolute path on the agent's host")
    if not path.exists():
        raise InvalidInput(f"{what} {path} does not exist on this host", "give a directory or file the agent can read")
    return path


def copy_rootfs(path_text: str, rootfs: Path) -> None:
    """Fill `rootfs` (created) from the directory or tarball at `path_text`."""
    src = _source(path_text, "root file system")
    if src.is_dir():
        if not any(src.iterdir()):
            raise InvalidInput(f"root file system {src} is empty", "give a directory holding a root file system")
        rootfs.mkdir(parents=True, exist_ok=True)
        _tool(["cp", "-a", "--sparse=always", f"{src}/.", f"{rootfs}/"], f"copying {src}")
    elif src.is_file():
        if not _is_tar(src):
            raise InvalidInput(
                f"{src} is neither a directory nor a tar archive", "give a root directory or a (compressed) tarball"
            )
        unpack_tarball(src, rootfs)
    else:
        raise InvalidInput(f"{src} is neither a directory nor a file", "give a root directory or a tarball")
    log.info("copied root file system %s into %s", src, rootfs)


def unpack_image(path_text: str, ref: str, rootfs: Path) -> ImageDefaults:
    """Unpack the image at `path_text` (tag `ref`, or its only image) into `rootfs`
    (must not exist); returns the image's process defaults."""
    src = _source(path_text, "image")
    transport = _transport(src, ref)
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise ToolFailed(f"{tool} not found on PATH", f"install it: apt-get install {tool} (or run scripts/setup.sh)")
    work = Path(tempfile.mkdtemp(prefix=".image.", dir=rootfs.parent))
    try:
        layout = work / "layout"
        # local files only, never a registry: no signature policy applies
        _tool(["skopeo", "--insecure-policy", "copy", "--quiet", transport, f"oci:{layout}:{_TAG}"], f"reading image {src}")
        bundle = work / "bundle"
        _tool(["umoci", "unpack", "--image", f"{layout}:{_TAG}", str(bundle)], f"unpacking image {src}")
        defaults = _defaults(json.loads((bundle / "config.json").read_text()))
        (bundle / "rootfs").rename(rootfs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("unpacked image %s%s into %s: command %s, user %d:%d", src, f":{ref}" if ref else "", rootfs,
             defaults.args, defaults.uid, defaults.gid)
    return defaults


def _transport(src: Path, ref: str) -> str:
    """skopeo's name of the image at `src`; InvalidInput unless it holds the image asked for."""
    if src.is_dir():
        if not (src / "oci-layout").is_file() or not (src / "index.json").is_file():
            raise InvalidInput(
                f"{src} is not an OCI image layout (no oci-layout or index.json in it)",
                "give an OCI image layout directory, an OCI archive or a `docker save` archive; a plain root "
                "directory goes with --rootfs",
            )
        index = _json(src / "index.json", src)
        tags = [str(m.get("annotations", {}).get(_REF_NAME, "")) for m in index.get("manifests", [])]
        _choose(tags, ref, src)
        return f"oci:{src}:{ref}" if ref else f"oci:{src}"
    if not _is_tar(src):
        raise InvalidInput(
            f"{src} is not an image", "give an OCI image layout directory, an OCI archive or a `docker save` archive"
        )
    with tarfile.open(src) as tar:
        names = set(tar.getnames())
        if "manifest.json" in names or "./manifest.json" in names:
            f = tar.extractfile(tar.getmember("manifest.json" if "manifest.json" in names else "./manifest.json"))
            entries = json.loads(f.read()) if f else []
            tags = [t for e in entries for t in (e.get("RepoTags") or [""])]
            if not ref and len(entries) == 1:
                return f"docker-archive:{src}"  # one image, however many tags it has
            _choose(tags, ref, src)
            return f"docker-archive:{src}:{ref}" if ref else f"docker-archive:{src}"
        if "oci-layout" in names or "./oci-layout" in names:
            if ref:
                return f"oci-archive:{src}:{ref}"
            return f"oci-archive:{src}"
    raise InvalidInput(f"{src} is a tar archive but not an image (no manifest.json or oci-layout)",
                       "a tarball of a root file system goes with --rootfs")


def _choose(tags: list[str], ref: str, src: Path) -> None:
    named = sorted({t for t in tags if t})
    if not tags:
        raise InvalidInput(f"image {src} holds no image manifest", "give an image that holds one")
    if ref:
        if ref not in named:
            raise InvalidInput(f"image {src} has no tag {ref!r}", f"its tags: {', '.join(named) or '(none)'}")
    elif len(tags) > 1:
        raise InvalidInput(
            f"image {src} holds {len(tags)} images", f"choose one with --image-ref: {', '.join(named) or '(untagged)'}"
        )


def _defaults(spec: dict) -> ImageDefaults:  # type: ignore[type-arg]
    proc = spec.get("process") or {}
    user = proc.get("user") or {}
    return ImageDefaults(
        args=[str(a) for a in proc.get("args") or []],
        env=[str(e) for e in proc.get("env") or []],
        uid=int(user.get("uid", 0)),
        gid=int(user.get("gid", 0)),
        groups=sorted({int(g) for g in user.get("additionalGids") or []} - {int(user.get("gid", 0))}),
        cwd=str(proc.get("cwd") or "/"),
    )


def _json(path: Path, src: Path) -> dict:  # type: ignore[type-arg]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path} is not valid JSON ({e})", f"{src} is a damaged image layout") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} is not an image index", f"{src} is a damaged image layout")
    return data


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _tool(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=TOOL_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise ToolFailed(f"{what} failed: {e}", f"check that {cmd[0]} is installed") from e
    if proc.returncode != 0:
        raise ToolFailed(f"{what} failed ({cmd[0]} exit {proc.returncode}): {proc.stderr.strip()[-1500:]}",
                         "check the image or directory is complete and readable")
