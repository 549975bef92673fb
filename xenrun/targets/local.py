"""LocalTarget: the running machine, or a machine root in a folder.

A target offers a handful of operations on paths as the host sees them ("/etc/fstab")
and never more: read, lstat, list, atomic write, symlink, remove, sparse file, run an
argv, append to a journal, lock. ``LocalTarget("/")`` is the running machine;
``LocalTarget(DIR)`` is a machine's root in a folder, where paths are resolved the
way chroot would resolve them, so nothing escapes DIR through ``..`` or an absolute
symlink. An SSH target implements the same methods; plugins never see which it is.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import subprocess
from pathlib import Path

from xenrun.errors import LockHeld, TargetError
from xenrun.targets.base import (MAX_READ, SEARCH_PATH, TMP_SUFFIX, FileInfo, Result, Target, resolve_in_root,
                                 machine_fault, unreadable)


def _refused_as(action: str):
    """A write method whose OSError (full disk, immutable file, read-only mount)
    becomes the one-line error naming the target's path."""
    def wrap(method):
        @functools.wraps(method)
        def checked(self, path, *args, **kwargs):
            try:
                return method(self, path, *args, **kwargs)
            except OSError as e:
                raise machine_fault(str(self), action, path, e) from e
        return checked
    return wrap


class LocalTarget(Target):
    """The running machine (root "/") or a machine root in a folder."""

    def __init__(self, root: str | Path = "/", files_only: bool = False):
        self.root = Path(root).resolve()
        self.files_only = files_only
        self._lock_fd: int | None = None

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    def __str__(self) -> str:
        return "local" if self.live else f"root {self.root}"

    # -- paths -------------------------------------------------------------------
    def real(self, path: str, follow: bool = True) -> Path:
        """The path on this machine for the target's ``path``; symlinks followed
        (the last one too when ``follow``) and kept inside the root."""
        if not path.startswith("/"):
            raise TargetError(f"{self}: path must be absolute: {path!r}")
        if self.live:
            return Path(os.path.realpath(path)) if follow else Path(os.path.normpath(path))
        def link_of(parts: list[str], _rest) -> str | None:
            candidate = self.root.joinpath(*parts)
            return os.readlink(candidate) if candidate.is_symlink() else None
        return self.root.joinpath(*resolve_in_root(path, follow, link_of, str(self)))

    def local_path(self, path: str) -> Path:
        """Every file of a local target is on this machine: ``real(path)``."""
        return self.real(path)

    # -- reading -----------------------------------------------------------------
    def read(self, path: str) -> bytes | None:
        """The content of the file at ``path``; None when it does not exist."""
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; the type is checked before reading
            fd = os.open(self.real(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise unreadable(str(self), path, _special_kind(st.st_mode))
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_READ + 1)
        if len(data) > MAX_READ:
            raise unreadable(str(self), path, "file", st.st_size)
        return data

    def lstat(self, path: str) -> FileInfo | None:
        """What is at ``path`` itself (a symlink is reported, not followed)."""
        return _info(self.real(path, follow=False))

    def stat(self, path: str) -> FileInfo | None:
        """What ``path`` leads to, through symlinks."""
        return _info(self.real(path))

    def exists(self, path: str) -> bool:
        return self.real(path).exists()

    def listdir(self, path: str) -> list[str] | None:
        try:
            return sorted(os.listdir(self.real(path)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- writing -----------------------------------------------------------------
    @_refused_as("create the folder")
    def makedirs(self, path: str) -> list[str]:
        """Create ``path`` and missing parents; returns the folders it created,
        outermost first (so an undo can remove them)."""
        created = []
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            real = self.real(sub)
            if not real.exists():
                try:
                    real.mkdir(mode=0o755)
                except FileExistsError:  # another run made it a moment ago: not ours to undo
                    continue
                created.append(sub)
        return created

    def makedirs_many(self, paths: list[str]) -> list[str]:
        """makedirs for several paths (an SSH target does them in one go)."""
        return [folder for path in paths for folder in self.makedirs(path)]

    def write_atomic_many(self, files: list[tuple], before_rename=None, links: list[tuple] = (),
                          checks: dict | None = None) -> None:
        """write_atomic for each (path, data, mode, uid, gid) of ``files``, then
        symlink for each (path, target) of ``links``, one after the other;
        ``before_rename(path, temp file)``. (An SSH target renames them together.)"""
        for path, data, mode, uid, gid in files:
            self.write_atomic(path, data, mode, uid, gid,
                              before_rename and (lambda tmp, path=path: before_rename(path, tmp)))
        for path, target in links:
            self.symlink(path, target)

    def write_new_many(self, files: list[tuple[str, bytes, int]]) -> None:
        """write_new for each (path, data, mode)."""
        for path, data, mode in files:
            self.write_new(path, data, mode)

    @_refused_as("write")
    def write_atomic(self, path: str, data: bytes, mode: int, uid: int | None = None,
                     gid: int | None = None, before_rename=None) -> None:
        """Replace ``path`` with ``data``: temp file in the same folder, fsync,
        ``before_rename(path of the temp file on this machine)`` (validation; raise to abort), rename,
        fsync of the folder. The temp file never outlives a failure."""
        real = self.real(path)
        tmp = real.parent / f".{real.name}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                if uid is not None and gid is not None and os.geteuid() == 0:
                    os.fchown(f.fileno(), uid, gid)
                os.fsync(f.fileno())
            if before_rename:
                before_rename(str(tmp))
            os.replace(tmp, real)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(real.parent)

    @_refused_as("write")
    def write_new(self, path: str, data: bytes, mode: int) -> None:
        """Write a file that must not exist yet, durably (data and the folder's
        entry), without a temp file: for files nothing refers to until this
        returns (the journal's copies of originals)."""
        real = self.real(path)
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(real.parent)

    @_refused_as("make the link")
    def symlink(self, path: str, target: str) -> None:
        real = self.real(path, follow=False)
        tmp = real.parent / f".{real.name}{TMP_SUFFIX}"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.replace(tmp, real)
        _fsync_dir(real.parent)

    @_refused_as("remove")
    def remove(self, path: str) -> None:
        real = self.real(path, follow=False)
        try:
            os.unlink(real)
        except FileNotFoundError:
            return
        _fsync_dir(real.parent)

    def rmdir(self, path: str) -> bool:
        try:
            os.rmdir(self.real(path, follow=False))
            return True
        except OSError:
            return False

    @_refused_as("create")
    def make_sparse(self, path: str, size: int, mode: int) -> None:
        """Create (or grow) a sparse file: only the size is set, no data written."""
        real = self.real(path)
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(real.parent)

    @_refused_as("resize")
    def truncate(self, path: str, size: int) -> None:
        """Set a file's size (undoing a grown disk image)."""
        real = self.real(path)
        if real.exists():
            os.truncate(real, size)

    @_refused_as("write")
    def append_line(self, path: str, line: str) -> None:
        """Append one line (or several, newline-separated) and fsync: the
        journal's durability rests on this."""
        real = self.real(path)
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line.rstrip("\n") + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def free_space(self, paths: list[str]) -> dict[str, tuple[object, int, int]]:
        """statvfs of each path's nearest existing folder (what a write there uses)."""
        found = {}
        for path in paths:
            real = self.real(path, follow=False).parent
            while not real.exists() and real != real.parent:
                real = real.parent
            st, vfs = os.stat(real), os.statvfs(real)
            found[path] = (st.st_dev, vfs.f_bavail * vfs.f_frsize, vfs.f_frsize or 4096)
        return found

    # -- commands ----------------------------------------------------------------
    def cannot_execute(self, argv: tuple[str, ...], written: bool = False) -> str | None:
        """Why ``argv`` cannot run on this target, or None when it can. With
        --files-only nothing runs, on any target: not a command, not a guard.
        ``written``: the plan writes the program before it runs (not looked for)."""
        if self.files_only:
            return "--files-only: commands are left for the host"
        if self.live:
            return None
        if os.geteuid() != 0:
            return f"running commands inside {self.root} needs chroot, which needs root"
        if not written and self.find_program(argv[0]) is None:
            return f"{argv[0]} is not installed in {self.root} (commands run there with chroot)"
        return None

    def find_program(self, program: str) -> str | None:
        """The program's path inside the target, if it is there and can run (an
        ELF binary or a script with #!; anything else would fail under chroot)."""
        candidates = [program] if program.startswith("/") else [f"{d}/{program}" for d in SEARCH_PATH]
        for c in candidates:
            real = self.real(c)
            if real.is_file() and os.access(real, os.X_OK):
                with open(real, "rb") as f:
                    magic = f.read(4)
                if magic == b"\x7fELF" or magic[:2] == b"#!":
                    return c
        return None

    def execute(self, argv: tuple[str, ...] | list[str], timeout: float | None = None,
            input: str | None = None) -> Result:
        argv = tuple(argv)
        reason = self.cannot_execute(argv)
        if reason:
            raise TargetError(f"{self}: cannot run {argv[0]}: {reason}")
        full = argv if self.live else ("chroot", str(self.root), *argv)
        env = {"PATH": ":".join(SEARCH_PATH), "LC_ALL": "C"}
        try:
            p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                               env=env if not self.live else {**os.environ, "LC_ALL": "C"},
                               stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            return Result(argv, 127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return Result(argv, 124, "", f"{argv[0]}: timed out after {timeout} s")
        return Result(argv, p.returncode, p.stdout, p.stderr)

    def execute_on_file(self, argv: tuple[str, ...], file_path: str) -> Result:
        """Run a check command of this machine on a file of the target, "{}"
        standing for its path on this machine (validators such as
        grub-script-check read the file where it lies)."""
        full = tuple(str(file_path) if a == "{}" else a for a in argv)
        try:
            p = subprocess.run(full, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return Result(full, 127, "", f"{full[0]}: command not found (install it to validate this file)")
        return Result(full, p.returncode, p.stdout, p.stderr)

    # -- lock --------------------------------------------------------------------
    @_refused_as("take the lock")
    def lock(self, path: str, holder: str) -> None:
        """Take the target's lock at ``path`` or fail at once naming its holder. The
        kernel drops the lock when the process dies, so a killed run leaves none."""
        self.makedirs(path.rpartition("/")[0])
        real = self.real(path)
        try:
            # never through a link: the lock is written to, and must be the root's own file
            fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as e:
            raise TargetError(f"{self}: cannot open the lock {path}: {e.strerror}"
                              + (" (it is a symbolic link: remove it)" if e.errno == errno.ELOOP
                                 else ": remove it; xenrun makes a new one" if e.errno == errno.EISDIR else "")) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise TargetError(f"{self}: the lock {path} is not a plain file of its own"
                              f" ({'hard-linked elsewhere' if st.st_nlink != 1 else 'not a regular file'}):"
                              " remove it; xenrun makes a new one")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            who = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(f"{self}: another xenrun run holds the lock {path}: {who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        os.fsync(fd)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None


def _info(real: Path) -> FileInfo | None:
    try:
        st = os.lstat(real)
    except (FileNotFoundError, NotADirectoryError):
        return None
    kind = ("link" if stat.S_ISLNK(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "dir" if stat.S_ISDIR(st.st_mode) else "other")
    return FileInfo(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                    st.st_blocks, os.readlink(real) if kind == "link" else None)


def _special_kind(mode: int) -> str:
    return ("dir" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "character device"
            if stat.S_ISCHR(mode) else "block device" if stat.S_ISBLK(mode) else "socket")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
