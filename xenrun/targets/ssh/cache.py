"""The read cache of an SSHTarget: paths resolved over cached lstat answers,
reads answered from the cache, speculative read-ahead, and the bulk fetch that
fills it (one remote script per round)."""

from __future__ import annotations

import posixpath
import stat as statmod

from xenrun.errors import TargetError
from xenrun.targets.base import MAX_READ, FileInfo, resolve_in_root, unreadable
from xenrun.targets.ssh.framing import fetch_request, kind_of, parse_fetch

WARM_UP_ROUNDS = 4
MAGIC_LINKS = ("/proc/self", "/proc/thread-self")


class _Miss(Exception):
    """A cache miss while speculating (no round trip is made)."""


def _sftp_info(attrs, link: str | None = None) -> FileInfo:
    # SFTP v3 carries no block count: -1 says "unknown" (only the shell's stat has it)
    return FileInfo(kind_of(attrs.st_mode), statmod.S_IMODE(attrs.st_mode), attrs.st_uid, attrs.st_gid,
                    attrs.st_size, -1, link)



class Cache:
    """The cache part of SSHTarget (a mixin: the state is SSHTarget's)."""

    # -- cache -------------------------------------------------------------------
    @property
    def _offline(self) -> bool:
        return self._spec is not None or self._cache_only

    def _invalidate(self) -> None:
        """Forget everything (after a command, which may change any file)."""
        self._room = None  # free space measured ahead (free_space_ahead), until a command or a write
        self._magic: dict[str, bytes] = {}
        self._lst: dict[str, FileInfo | None] = {}
        self._data: dict[str, bytes] = {}
        self._dirs: dict[str, list[str]] = {}
        self._resolved: dict[tuple[str, bool], str] = {}  # (path, follow) -> key, from the entries above

    def _forget(self, key: str, regular: bool = False) -> None:
        """Forget what a write to ``key`` changes: the entry itself, anything below
        it, its folder's listing. Exact because every key is a resolved path (no
        link on the way), so no other key can lead to the same file. ``regular``:
        the write leaves a regular file there; when the cache knew no folder or
        link there (a path walked through one would have put it in the cache), no
        path resolves differently and nothing below it is cached."""
        if self._spec is not None:
            raise TargetError(f"{self}: a write while reading speculatively")
        if not self._deferring:  # a write of an apply's stretch waits for its check; any other makes it stale
            self._room = None
        before = self._lst.get(key)
        if regular and (before is None or before.kind == "file"):
            for cache in (self._magic, self._lst, self._data):
                cache.pop(key, None)
        else:
            below = key.rstrip("/") + "/"
            self._resolved.clear()  # it may be, or have been, a link or a folder on some path's way
            for cache in (self._magic, self._lst, self._data, self._dirs):
                for k in [k for k in cache if k == key or k.startswith(below)]:
                    del cache[k]
        self._dirs.pop(posixpath.dirname(key), None)

    def _want(self, key: str, letters: str) -> None:
        self._spec.setdefault(key, set()).update(letters)

    def _get_lst(self, key: str) -> FileInfo | None:
        if key in self._lst:
            return self._lst[key]
        folder, _, name = key.rpartition("/")
        folder = folder or "/"
        known = self._lst.get(folder)
        if known is not None and known.kind == "dir" and folder in self._dirs and name not in self._dirs[folder] \
                and name not in ("", ".", ".."):
            self._lst[key] = None  # not in its folder's listing, which is current (a write there forgets both)
            return None
        if known is None and folder in self._lst and name not in ("", ".", ".."):
            self._lst[key] = None  # its folder is known to be absent (making it forgets what is below)
            return None
        if self._offline:
            raise _Miss(key)
        try:
            attrs = self.sftp.lstat(key)
            link = self._sftp.readlink(key) if statmod.S_ISLNK(attrs.st_mode) else None
            info = _sftp_info(attrs, link)
        except FileNotFoundError:
            info = None
        self._lst[key] = info
        return info

    # -- paths -------------------------------------------------------------------
    def _missing_folders(self, paths: list[str]) -> list[str]:
        """The folders of ``paths`` (and their parents) that do not exist yet, each
        after its parent; every part of every path looked up in one round trip."""
        self._rounds(lambda: [self.exists(p) for p in paths])
        missing: list[str] = []
        for path in paths:
            parts = [p for p in path.split("/") if p]
            for i in range(1, len(parts) + 1):
                sub = "/" + "/".join(parts[:i])
                if sub not in missing and (posixpath.dirname(sub) in missing or not self.exists(sub)):
                    missing.append(sub)
        return missing

    def _join(self, parts: list[str]) -> str:
        return self._prefix + "/" + "/".join(parts) if parts else self._prefix or "/"

    def _resolve(self, path: str, follow: bool) -> str:
        """The remote path for the target's ``path``: LocalTarget.real's algorithm
        over the remote lstat answers (cached), so nothing escapes a root, and on a
        host (a root at "/") it is realpath. Every key of the cache is such a path."""
        known = self._resolved.get((path, follow))
        if known is not None:  # resolving is pure Python over the cache: the fleet's biggest client cost
            return known
        if not path.startswith("/"):
            raise TargetError(f"{self}: path must be absolute: {path!r}")
        def link_of(parts: list[str], rest: list[str]) -> str | None:
            candidate = self._join(parts)
            try:
                info = self._get_lst(candidate)
            except _Miss:
                raise _Miss(candidate, rest) from None
            # /proc/self names whichever process looks: left to the kernel of
            # the process that reads (a readlink child's pid is gone at once)
            if info is not None and info.kind == "link" and candidate[len(self._prefix):] not in MAGIC_LINKS:
                return info.link
            return None
        key = self._join(resolve_in_root(path, follow, link_of, str(self)))
        self._resolved[(path, follow)] = key
        return key

    def _node(self, path: str, follow: bool) -> tuple[str, FileInfo | None]:
        key = self._resolve(path, follow)
        return key, self._get_lst(key)

    def _speculative(self, path: str, letters: str, placeholder, fn):
        """Run a read from the cache. While speculating, a miss records what to
        fetch and answers ``placeholder``; otherwise a miss fetches what the read
        needs in one remote script (twice more if links lead elsewhere), and
        only then falls back to SFTP."""
        if self._spec is not None:
            try:
                return fn()
            except _Miss:
                self._wants_for(path, letters)
                return placeholder
        if self._cache_only:
            return fn()
        if not self._warmed:
            self._warm_up()
        letters = letters or "o"  # a stat is mostly followed by a read (Overlay, _save)
        for _ in range(3):
            self._cache_only = True
            try:
                return fn()
            except _Miss:
                pass
            finally:
                self._cache_only = False
            self._spec = {}
            try:
                self._wants_for(path, letters)
            finally:
                wants, self._spec = self._spec, None
            self._fetch(wants)
        return fn()

    def _wants_for(self, path: str, letters: str) -> None:
        """What to fetch for ``path``: from the first component the cache does not
        know, every component as written (the kernel's reading; links among them
        show up in the answer and are followed next round) and the path itself."""
        try:
            key = self._resolve(path, True)
        except _Miss as miss:
            candidate, rest = miss.args[0], list(miss.args[1]) if len(miss.args) > 1 else []
            self._want(candidate, "l" + ("" if rest else letters))
            for i, part in enumerate(rest):
                if part in (".", ".."):
                    break
                candidate = f"{candidate.rstrip('/')}/{part}"
                self._want(candidate, "l" + (letters if i == len(rest) - 1 else ""))
        else:
            self._want(key, "l" + letters)

    # -- reading -----------------------------------------------------------------
    def read(self, path: str) -> bytes | None:
        """The content of the file at ``path``; None when it does not exist."""
        def fn():
            key, info = self._node(path, True)
            if info is None:
                return None
            if info.kind in ("dir", "other"):  # a FIFO or a device: SFTP's read would block or never end
                raise unreadable(str(self), path, "special file (FIFO, device or socket)"
                                 if info.kind == "other" else "dir")
            if info.size > MAX_READ:
                raise unreadable(str(self), path, "file", info.size)
            if key in self._data:
                return self._data[key]
            if self._offline:
                raise _Miss(key)
            data = self._sftp_read(key, info)
            self._data[key] = data
            return data
        return self._speculative(path, "c", None, fn)

    def _sftp_read(self, key: str, info: FileInfo) -> bytes | None:
        try:
            with self.sftp.open(key, "rb") as f:
                if info.size > 65536:
                    f.prefetch(info.size)  # pipelined reads instead of one round trip per 32 KiB
                return f.read()
        except FileNotFoundError:
            return None

    def lstat(self, path: str) -> FileInfo | None:
        """What is at ``path`` itself (a symlink is reported, not followed)."""
        return self._speculative(path, "", None, lambda: self._node(path, False)[1])

    def stat(self, path: str) -> FileInfo | None:
        """What ``path`` leads to, through symlinks."""
        return self._speculative(path, "", None, lambda: self._node(path, True)[1])

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def listdir(self, path: str) -> list[str] | None:
        def fn():
            key, info = self._node(path, True)
            if info is None or info.kind != "dir":
                return None
            if key in self._dirs:
                return self._dirs[key]
            if self._offline:
                raise _Miss(key)
            try:
                names = sorted(self.sftp.listdir(key))
            except FileNotFoundError:
                return None
            self._dirs[key] = names
            return names
        return self._speculative(path, "d", None, fn)

    # -- bulk reads ----------------------------------------------------------------
    def prefetch(self, paths: list[str], dirs: list[str] = (), stat_only: list[str] = ()) -> None:
        """Fetch the lstat, stat and content of ``paths``, the lstat and stat of
        ``stat_only`` (disk images: never read) and the listings of ``dirs`` in
        as few remote scripts as the links among them allow (one when there are
        none); read, lstat, stat, exists and listdir then answer from the cache
        until the next write."""
        def touch():
            for p in paths:
                self.lstat(p)
                info = self.stat(p)
                if info is None or info.kind == "file":  # None: absent, or unknown yet (then asked for)
                    self.read(p)
            for p in stat_only:  # with the content when small, as a stat outside a prefetch
                self.lstat(p)
                self._speculative(p, "o", None, lambda p=p: self._node(p, True)[1])
            for d in dirs:
                self.listdir(d)
        if self._spec is not None:  # inside a read-ahead: its rounds fetch these too
            touch()
            return
        self._warmed = True  # an explicit prefetch stands in for the warm-up
        self._rounds(touch)

    def _warm_up(self) -> None:
        """Before the first read that misses the cache (when no read_ahead came
        first): run the reads the flow gave to warm_up_with against the cache,
        fetching what they ask for in bulk (a round per level of reads that
        depend on others)."""
        self._warmed = True
        if self._warm_up_reads is not None:
            self._rounds(self._warm_up_reads)

    def warm_up_with(self, reads) -> None:
        """``reads()``: the reads to run ahead before the first read (the flow
        knows them: its state scan, its plugins' facts)."""
        self._warm_up_reads = reads

    def read_ahead(self, fn) -> None:
        """Run the reads of ``fn`` against the cache and fetch what they ask for
        in bulk (a round per level of reads that depend on others); ``fn``'s
        answers meanwhile are placeholders. Before the first read, ``fn`` stands
        in for the warm-up: it should read what the warm-up would."""
        self._warmed = True
        self._rounds(fn)

    def _rounds(self, fn) -> None:
        for _ in range(WARM_UP_ROUNDS):
            self._spec = {}
            try:
                fn()
            except Exception:  # noqa: BLE001 - a hint choking on placeholders: fetch what it asked so far
                pass
            finally:
                wants, self._spec = self._spec, None
            if not wants:
                return
            self._fetch(wants)

    def _fetch(self, wants: dict[str, set]) -> None:
        """One remote script: the records asked for, parsed into the cache."""
        keys, script = fetch_request(wants)
        answer, _ = self._request(script)
        fetched = parse_fetch(answer, keys)
        self._magic.update(fetched.magic)
        self._dirs.update(fetched.dirs)
        self._data.update(fetched.data)
        self._lst.update(fetched.infos)
