"""Received trees are data: file operations that never follow a link.

A peer writes the destination's image and delta areas (rsync, the page
stream). Whatever it put there is read and written here relative to a
directory descriptor opened with O_NOFOLLOW, by plain names only, so a
symbolic link, FIFO, device or socket planted in an area is refused (with the
file's name) instead of being followed out of it. `check_data_tree` walks a
whole area the same way before the agent reads it.

The parent directories of an area are the agent's own; only an area's
contents come from the peer.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import TracebackType

from phaul.errors import InvalidInput

MAX_DEPTH = 8
MAX_ENTRIES = 100_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer before fstat can refuse it.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _refuse(path: Path | str, mode: int, want: str) -> InvalidInput:
    return InvalidInput(
        f"received {path} is {_kind(mode)}, not {want}; refused",
        "received areas hold only regular files and directories: a peer planted it (or a bug did); abort the migration",
    )


def check_name(name: str) -> str:
    """`name` if it is a plain base name (no separator, not . or ..)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidInput(f"invalid file name {name[:100]!r} in a received area", "names are plain base names")
    return name


class DataDir:
    """An open directory of a received area; every name is looked up in it without following.

    Use it as a context manager (or call `close`)."""

    def __init__(self, path: Path, *, create: bool = False, _fd: int | None = None) -> None:
        self.path = Path(path)
        if _fd is not None:  # from `subdir`
            self.fd = _fd
            return
        if create:
            try:
                os.mkdir(self.path, 0o700)  # mkdir never follows a link at its last component
            except FileExistsError:
                pass
        try:
            self.fd = os.open(self.path, _DIR_FLAGS)
        except OSError as e:
            mode = _lstat_mode(self.path)
            if mode is not None and not stat.S_ISDIR(mode):
                raise _refuse(self.path, mode, "a directory") from None
            raise InvalidInput(f"cannot open received directory {self.path}: {e.strerror}") from None
        if not stat.S_ISDIR(os.fstat(self.fd).st_mode):  # O_DIRECTORY makes this impossible; belt and braces
            os.close(self.fd)
            raise InvalidInput(f"received {self.path} is not a directory; refused")

    def __enter__(self) -> DataDir:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def subdir(self, name: str) -> DataDir:
        """Directory entry `name`, opened relative to this one without following."""
        try:
            fd = os.open(check_name(name), _DIR_FLAGS, dir_fd=self.fd)
        except OSError as e:
            st = self.lstat(name)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise _refuse(self.path / name, st.st_mode, "a directory") from None
            raise InvalidInput(f"cannot open received directory {self.path / name}: {e.strerror}") from None
        return DataDir(self.path / name, _fd=fd)

    def names(self) -> list[str]:
        """The entries of the directory (no . or ..)."""
        return os.listdir(self.fd)

    def regular_files(self) -> list[str]:
        """The entries of the directory, which must all be regular files (InvalidInput naming the first that is not)."""
        names = self.names()
        for name in names:
            self.size(name)
        return names

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry's own status (a link's, not its target's), None when absent."""
        try:
            return os.stat(check_name(name), dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def links(self, name: str) -> int:
        """How many names regular file `name` has (hard links)."""
        self.size(name)
        st = self.lstat(name)
        assert st is not None
        return st.st_nlink

    def size(self, name: str) -> int:
        """The size of regular file `name`; InvalidInput if it is anything else."""
        st = self.lstat(name)
        if st is None:
            raise FileNotFoundError(f"{self.path / name} is missing")
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(self.path / name, st.st_mode, "a regular file")
        return st.st_size

    def open(self, name: str, flags: int = os.O_RDONLY) -> int:
        """An fd of existing regular file `name` (O_RDONLY or O_WRONLY/O_RDWR, no O_CREAT)."""
        st = self.lstat(name)  # refuse a device before opening it has any effect
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _refuse(self.path / name, st.st_mode, "a regular file")
        try:
            fd = os.open(check_name(name), flags | _FILE_FLAGS, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:  # swapped for a link since the lstat
                raise _refuse(self.path / name, stat.S_IFLNK, "a regular file") from None
            raise
        return self._regular(fd, name)

    def create(self, name: str, mode: int = 0o644) -> int:
        """A write fd of a new, empty regular file `name` (whatever had the name is removed first)."""
        self.unlink(name, missing_ok=True)
        fd = os.open(check_name(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, mode, dir_fd=self.fd)
        return self._regular(fd, name)

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The content of regular file `name`, at most `limit` bytes (InvalidInput when longer)."""
        fd = self.open(name)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise InvalidInput(f"received {self.path / name} is larger than {limit} bytes; refused")
        return data

    def unlink(self, name: str, *, missing_ok: bool = False) -> None:
        """Remove entry `name` (a link itself, never its target); a directory is refused."""
        try:
            os.unlink(check_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except IsADirectoryError:
            raise InvalidInput(f"received {self.path / name} is a directory, not a file; refused") from None

    def replace(self, name: str, dest: DataDir, dest_name: str) -> None:
        """Rename entry `name` to `dest_name` in `dest` (neither name is followed)."""
        os.replace(check_name(name), check_name(dest_name), src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def link_into(self, name: str, dest: DataDir, dest_name: str) -> None:
        """Hard-link regular file `name` as `dest_name` in `dest` (replacing it); the file
        linked is the one checked, even if `name` is swapped meanwhile."""
        fd = self.open(name)
        try:
            dest.unlink(dest_name, missing_ok=True)
            # linkat(2)'s own recipe for linking an open file: its /proc/self/fd magic link, followed.
            os.link(f"/proc/self/fd/{fd}", check_name(dest_name), dst_dir_fd=dest.fd, follow_symlinks=True)
        finally:
            os.close(fd)

    def _regular(self, fd: int, name: str) -> int:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise _refuse(self.path / name, mode, "a regular file")
        os.set_blocking(fd, True)
        return fd


def _lstat_mode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


def check_data_tree(root: Path, *, max_depth: int = MAX_DEPTH, max_entries: int = MAX_ENTRIES) -> int:
    """Walk received area `root` without following anything; InvalidInput naming the
    first entry that is not a regular file or a directory, or when the tree is deeper
    than `max_depth` or holds more than `max_entries` entries. Returns the entry count."""
    count = 0

    def walk(d: DataDir, depth: int) -> None:
        nonlocal count
        for name in sorted(d.names()):
            count += 1
            if count > max_entries:
                raise InvalidInput(f"received {root} holds more than {max_entries} entries; refused")
            st = d.lstat(name)
            if st is None:
                continue  # removed meanwhile
            if stat.S_ISDIR(st.st_mode):
                if depth >= max_depth:
                    raise InvalidInput(f"received {d.path / name} is nested deeper than {max_depth} levels; refused")
                with d.subdir(name) as sub:
                    walk(sub, depth + 1)
            elif not stat.S_ISREG(st.st_mode):
                raise _refuse(d.path / name, st.st_mode, "a regular file or directory")

    with DataDir(root) as top:
        walk(top, 1)
    return count
