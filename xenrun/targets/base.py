"""The Target contract: what plans, appliers and plugins may ask of a machine.

A target offers a handful of operations on paths as the host sees them
("/etc/fstab") and never more: read, lstat, list, atomic write, symlink, remove,
sparse file, run an argv, append to a journal, lock. ``Target`` names them (the
abstract ones every target implements) and supplies the optional capabilities
(bulk reads, a read-ahead, direct file access, round-trip counts) with what a
target without them does, so that no caller has to guess what a target can do.

Implementations: ``targets.local.LocalTarget`` (the running machine, or a machine
root in a folder) and ``targets.ssh.SSHTarget`` (a host over SSH). Nothing here
imports anything above the targets (flows, registry, plugins, apply, facts).
"""

from __future__ import annotations

import contextlib
import errno
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from xenrun.errors import TargetError

SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
TMP_SUFFIX = ".xenrun-tmp"
# the largest file a plan reads whole (config files, kernels, initramfs images);
# beyond it something is wrong with the file, and reading it would exhaust memory
MAX_READ = 512 * 1024 * 1024


@dataclass(frozen=True)
class FileInfo:
    kind: str  # "file", "dir", "link", "other"
    mode: int  # permission bits
    uid: int
    gid: int
    size: int
    blocks: int  # 512-byte blocks really allocated
    link: str | None = None  # symlink target


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


def resolve_in_root(path: str, follow: bool, link_of, where: str = "target") -> list[str]:
    """The parts of ``path`` resolved as chroot would: ``..`` stops at the root,
    an absolute link starts again at the root, so nothing leaves it.
    ``link_of(parts, rest)`` says what the link at ``parts`` points to (None: not a
    link); ``rest`` are the parts still to come (an SSH target prefetches them). The last part
    is followed only when ``follow``. Shared by local roots and SSH targets."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        link = link_of(resolved + [part], parts) if (parts or follow) else None
        if link is not None:
            hops += 1
            if hops > 40:
                raise TargetError(f"{where}: too many symlinks resolving {path}")
            if link.startswith("/"):
                resolved = []  # chroot semantics: absolute links start at the root
            parts = [p for p in link.split("/") if p] + parts
            continue
        resolved.append(part)
    return resolved


def unreadable(where: str, path: str, kind: str, size: int = 0) -> TargetError:
    """The one-line error for a read of something that is not a file xenrun can
    read: a folder, a FIFO, a device or socket (reading those blocks or never ends),
    or a file too big to be one a plan manages."""
    if kind == "dir":
        return TargetError(f"{where}: {path} is a folder, not a file")
    if kind == "file":
        return TargetError(f"{where}: {path} is {size} bytes, more than the {MAX_READ >> 20} MiB"
                           " xenrun reads: check that it is the file you mean")
    return TargetError(f"{where}: {path} is a {kind}, not a regular file (reading it would block or"
                       " never end): replace it with the file it should be")


_FAULT_HINTS = {
    errno.EPERM: "is it immutable? lsattr shows it, chattr -i clears it",
    errno.EACCES: "check its permissions and those of its folder",
    errno.ENOSPC: "its filesystem is full: free some space and run again",
    errno.EDQUOT: "a disk quota is exhausted: free some space and run again",
    errno.EROFS: "its filesystem is mounted read-only",
}


def machine_fault(where: str, action: str, path: str, error: OSError) -> TargetError:
    """The one-line error for a write the machine refused (full disk, immutable
    file, read-only mount), naming the target's path, not the temp file's."""
    hint = _FAULT_HINTS.get(error.errno)
    return TargetError(f"{where}: cannot {action} {path}: {error.strerror or error}" + (f" ({hint})" if hint else ""))


def tmp_name(path: str) -> str:
    """The temporary name an atomic write uses for ``path`` (same folder, so the
    rename is atomic; fixed, so recovery can find and remove it)."""
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}{TMP_SUFFIX}"


class Target(ABC):
    """A machine (or a machine root) that plans are read from and applied to.

    ``before_rename(path, file_path)`` (write_atomic_many) and ``execute_on_file(argv,
    file_path)`` share one contract: ``file_path`` is a str naming the file where it
    lies, as the machine that runs the check sees it (this machine for a local
    target, the host for an SSH one)."""

    files_only: bool = False
    remote: bool = False  # reached over a network (failing to connect means "unreachable")
    stats: Mapping[str, int] = MappingProxyType({})  # round trips so far, by kind (a remote target counts them)

    @property
    @abstractmethod
    def live(self) -> bool:
        """True for the live machine (not a root in a folder)."""

    # -- reading -----------------------------------------------------------------
    @abstractmethod
    def read(self, path: str) -> bytes | None:
        """The content of the file at ``path``; None when it does not exist."""

    @abstractmethod
    def lstat(self, path: str) -> FileInfo | None:
        """What is at ``path`` itself (a symlink is reported, not followed)."""

    @abstractmethod
    def stat(self, path: str) -> FileInfo | None:
        """What ``path`` leads to, through symlinks."""

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def listdir(self, path: str) -> list[str] | None: ...

    # -- writing -----------------------------------------------------------------
    @abstractmethod
    def makedirs(self, path: str) -> list[str]:
        """Create ``path`` and missing parents; the folders created, outermost first."""

    @abstractmethod
    def makedirs_many(self, paths: list[str]) -> list[str]: ...

    @abstractmethod
    def write_atomic(self, path: str, data: bytes, mode: int, uid: int | None = None,
                     gid: int | None = None, before_rename=None) -> None: ...

    @abstractmethod
    def write_atomic_many(self, files: list[tuple], before_rename=None, links: list[tuple] = (),
                          checks: dict | None = None) -> None:
        """``checks``: {path: validator argv} that ``before_rename`` runs through
        execute_on_file; a target may run them all at once beforehand."""

    @abstractmethod
    def write_new(self, path: str, data: bytes, mode: int) -> None: ...

    @abstractmethod
    def write_new_many(self, files: list[tuple[str, bytes, int]]) -> None: ...

    @abstractmethod
    def symlink(self, path: str, target: str) -> None: ...

    @abstractmethod
    def remove(self, path: str) -> None: ...

    @abstractmethod
    def rmdir(self, path: str) -> bool: ...

    @abstractmethod
    def make_sparse(self, path: str, size: int, mode: int) -> None: ...

    @abstractmethod
    def truncate(self, path: str, size: int) -> None: ...

    @abstractmethod
    def append_line(self, path: str, line: str) -> None: ...

    # -- commands and the lock ---------------------------------------------------
    @abstractmethod
    def cannot_execute(self, argv: tuple[str, ...], written: bool = False) -> str | None:
        """Why ``argv`` cannot run on this target, or None when it can.
        ``written``: the plan writes the program (an executable file) before it runs."""

    @abstractmethod
    def find_program(self, program: str) -> str | None: ...

    @abstractmethod
    def execute(self, argv, timeout: float | None = None, input: str | None = None) -> Result: ...

    @abstractmethod
    def execute_on_file(self, argv: tuple[str, ...], file_path: str) -> Result:
        """Run a check command on a file of the target, "{}" standing for ``file_path``."""

    @abstractmethod
    def lock(self, path: str, holder: str) -> None: ...

    @abstractmethod
    def unlock(self) -> None: ...

    # -- optional capabilities: what a target without them does -------------------
    def prefetch(self, paths: list[str], dirs: list[str] = (), stat_only: list[str] = ()) -> None:
        """Fetch these paths (contents), ``stat_only`` (never read) and the listings
        of ``dirs`` in bulk, so later reads answer from a cache. Without a cache:
        nothing (each read is cheap)."""

    def find_programs(self, programs: list[str]) -> None:
        """Look up the programs commands will need, all at once. Without a cache:
        nothing (cannot_execute looks each up)."""

    def read_ahead(self, reads: Callable[[], object]) -> None:
        """Run ``reads()`` against a cache, fetching in bulk what it asks for; its
        answers meanwhile are placeholders. Without a cache: nothing (``reads`` is
        not called: the real reads that follow cost no round trip)."""

    def warm_up_with(self, reads: Callable[[], object]) -> None:
        """``reads()``: what to read ahead before the first read that misses the
        cache, when no read_ahead came first. Without a cache: ignored."""

    def free_space(self, paths: list[str]) -> dict[str, tuple[object, int, int]]:
        """For each path, (its filesystem's id, bytes free, block size), found at
        its nearest existing folder, so a stretch can tell whether its writes fit.
        Without it: {} (not checked)."""
        return {}

    def free_space_ahead(self, paths: list[str]) -> None:
        """The paths the next free_space will ask for: a target may measure them
        with its next request (the lock's). Without it: nothing."""

    def deferred(self):
        """A context in which writes may wait (in order) for the target's next
        request, and are all made by its end (an exception's too, unless making
        them fails: then they are dropped, as a crash there would). Without it:
        each write is made at once."""
        return contextlib.nullcontext()

    def flush(self) -> None:
        """Make the writes waiting in ``deferred()`` now. Without it: nothing."""

    def local_path(self, path: str) -> Path | None:
        """The file's path on this machine, for direct access (reading only some
        sectors of an image); None when the target's files are elsewhere."""
        return None

    def close(self) -> None:
        """End the session (an SSH target's lock goes with it). Locally: nothing."""
