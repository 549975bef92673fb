"""SSHTarget: a remote host over SSH through Fabric, with LocalTarget's methods.

One connection per target carries two long-lived channels:

- an SFTP session (paramiko's SFTPClient) for every file operation: atomic writes
  (temp file, fsync@openssh.com, posix-rename@openssh.com, fsync of the folder),
  symlinks, removal, sparse files, journal appends;
- one persistent POSIX ``sh`` reading requests on its stdin, for commands and for
  bulk reads: a request is one quoted command line, its answer is framed with a
  random marker and base64, so anything root's rc files print is skipped.

Why one shell and not one exec channel per command: sshd starts every exec and
every subsystem through the login shell, and on these machines root's ~/.bashrc
runs ``pyenv init`` (0.15-0.35 s) each time, non-interactive or not (Debian's bash
reads .bashrc when started by sshd). A persistent shell pays that once per
connection, in parallel with the SFTP session's own start; a request then costs
one round trip (about 1 ms on loopback).

The host needs a POSIX sh and the usual tools (stat -c, base64, readlink, mktemp,
flock from util-linux, env, chroot for a root prefix); no Python.

Reads answer from a cache filled in bulk (``prefetch`` and a warm-up that runs the
core facts plugin speculatively against the cache, fetching whatever it asked for
in one remote script per round) until the first write; any write or command
empties it. A cache miss falls back to one SFTP request.

The lock is ``flock -n`` on fd 9 of the persistent shell: it lives exactly as long
as the SSH session, so a killed xenrun (or a dropped connection, once sshd notices)
releases it. Commands run with fd 9 closed, so nothing they start keeps it.

``root``: an optional folder on the remote host holding a machine root (tests, and
hosts prepared for another machine). Paths are resolved the chroot way over the
remote lstat/readlink answers (LocalTarget.real's algorithm), commands run with
``chroot ROOT``.
"""

from __future__ import annotations

import base64
import posixpath
import secrets
import shlex
import socket
import stat as statmod
import time
from collections import Counter

from xenrun.errors import LockHeld, TargetError
from xenrun.target import SEARCH_PATH, TMP_SUFFIX, FileInfo, Result, resolve_in_root

STAT_FORMAT = "%f %u %g %s %b"  # raw mode (hex), uid, gid, size, 512-byte blocks
CONNECT_TIMEOUT = 10
WARM_UP_ROUNDS = 4
MAGIC_LINKS = ("/proc/self", "/proc/thread-self")
SMALL = 65536  # a file read after a stat miss comes along if at most this big

# The persistent shell's functions. $N is the answer marker, $X a private temp
# folder for command output. Records of x_fetch (one per line, i = index of the
# path in the request): "L i FIELDS|-|?" lstat ("-" absent), "K i" link target,
# "C i" content ("c"; "o": only when at most SMALL bytes), "D i" listing
# (NUL-separated names);
# K, C and D are followed by base64 lines and "." ("!" when reading failed).
PROLOGUE = r"""
PATH=%(path)s:$PATH; export PATH
LC_ALL=C; export LC_ALL
X=$(mktemp -d "${TMPDIR:-/tmp}/xenrun.XXXXXXXX") || exit 1
trap 'rm -rf "$X"' EXIT
trap 'exit 129' HUP
trap 'exit 143' TERM
if command -v timeout >/dev/null 2>&1; then XT=1; else XT=; fi
x_info() {
  if v=$(stat -c '%(fmt)s' "$2" 2>/dev/null); then printf 'L %%s %%s\n' "$1" "$v"
  else printf 'L %%s ?\n' "$1"; fi
}
x_fetch() {
  i=0
  while [ $# -gt 1 ]; do
    m=$1; p=$2; shift 2
    case $m in *l*)
      if [ -e "$p" ] || [ -L "$p" ]; then
        x_info $i "$p"
        if [ -L "$p" ]; then printf 'K %%s\n' $i; readlink "$p" | base64; printf '.\n'; fi
      else printf 'L %%s -\n' $i; fi;;
    esac
    case $m in *c*|*o*)
      if [ -f "$p" ] && { [ -z "${m##*c*}" ] || [ "$(stat -L -c %%s "$p" 2>/dev/null)" -le %(small)d ]; } 2>/dev/null; then
        printf 'C %%s\n' $i
        if base64 < "$p"; then printf '.\n'; else printf '!\n'; fi
      fi;;
    esac
    case $m in *d*)
      if [ -d "$p" ]; then
        printf 'D %%s\n' $i
        (cd "$p" 2>/dev/null && for f in * .[!.]* ..?*; do
           if [ -e "$f" ] || [ -L "$f" ]; then printf '%%s\000' "$f"; fi; done) | base64
        printf '.\n'
      fi;;
    esac
    i=$((i+1))
  done
}
x_t() { t=$1; shift; if [ -n "$t" ] && [ -n "$XT" ]; then exec timeout "$t" "$@"; else exec "$@"; fi; }
x_end() {
  base64 < "$X/o"; printf '%%s E\n' "$N"; base64 < "$X/e"; printf '%%s END %%s\n' "$N" "$1"
}
x_lock() {
  if ! command exec 9>>"$1"; then printf '%%s END 3\n' "$N"; return; fi
  flock -n 9; r=$?
  if [ $r -eq 0 ]; then printf '%%s' "$2" > "$1"; printf '%%s END 0\n' "$N"; return; fi
  exec 9>&-
  base64 < "$1"; printf '%%s END %%s\n' "$N" $r
}
x_unlock() { : > "$1"; exec 9>&-; printf '%%s END 0\n' "$N"; }
printf '%%s READY\n' "$N"
"""


class _Miss(Exception):
    """A cache miss while speculating (no round trip is made)."""


def parse_address(address: str) -> tuple[str | None, str, int | None]:
    """"user@host:port" -> (user, host, port); user and port optional."""
    user, _, hostport = address.rpartition("@")
    host, port = hostport, None
    if hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    return user or None, host, port


def _info(fields: str, link: str | None = None) -> FileInfo:
    raw, uid, gid, size, blocks = fields.split()
    mode = int(raw, 16)
    return FileInfo(_kind(mode), statmod.S_IMODE(mode), int(uid), int(gid), int(size), int(blocks), link)


def _kind(mode: int) -> str:
    return ("link" if statmod.S_ISLNK(mode) else "file" if statmod.S_ISREG(mode)
            else "dir" if statmod.S_ISDIR(mode) else "other")


def _sftp_info(attrs, link: str | None = None) -> FileInfo:
    # SFTP v3 carries no block count: -1 says "unknown" (only the shell's stat has it)
    return FileInfo(_kind(attrs.st_mode), statmod.S_IMODE(attrs.st_mode), attrs.st_uid, attrs.st_gid,
                    attrs.st_size, -1, link)


class SSHTarget:
    """A host over SSH (``root``: a machine root folder on that host)."""

    def __init__(self, address: str, root: str | None = None, files_only: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT, connect_kwargs: dict | None = None,
                 plugins: tuple[str, ...] | list[str] = ("facts",)):
        """``plugins``: the host's selected plugins, whose detect_hardware the
        warm-up runs against the cache (their reads then cost no round trip each)."""
        self.address = address
        self.user, self.hostname, self.port = parse_address(address)
        self.root = posixpath.normpath(root).rstrip("/") or None if root else None
        if self.root and not self.root.startswith("/"):
            raise TargetError(f"{address}: root must be an absolute path on the host: {root!r}")
        self._prefix = self.root or ""  # a host is resolved as a root at "/"
        self.files_only = files_only
        self.connect_timeout = connect_timeout
        self.connect_kwargs = connect_kwargs or {}
        self.stats: Counter = Counter()  # round trips: "command" (shell requests), "sftp" (requests)
        self._conn = self._sftp = self._chan = None
        self._nonce = ""
        self._buf = b""
        self._locked = False
        self._appends: dict[str, object] = {}  # journal files kept open
        self._append_real: dict[str, str] = {}  # and where they lie
        self._dir_handles: dict[str, object] = {}  # folders kept open for fsync
        self._fsync_ext = True
        self._warmed = False
        self._spec: dict[str, set] | None = None  # wants collected while speculating
        self._cache_only = False  # answer from the cache or raise _Miss
        self.plugins = tuple(plugins)
        self._invalidate()

    @property
    def is_host(self) -> bool:
        return self.root is None

    def __str__(self) -> str:
        who = f"{self.user}@{self.hostname}" if self.user else self.hostname
        who += f":{self.port}" if self.port else ""
        return f"ssh {who}" + (f" root {self.root}" if self.root else "")

    # -- connection --------------------------------------------------------------
    def _connect(self) -> None:
        if self._conn is not None:
            return
        import fabric  # ~0.25 s of imports, paid only by SSH runs
        import paramiko

        kwargs = {"banner_timeout": self.connect_timeout, "auth_timeout": self.connect_timeout,
                  **self.connect_kwargs}
        conn = fabric.Connection(self.hostname, user=self.user, port=self.port,
                                 connect_timeout=max(1, int(self.connect_timeout)), connect_kwargs=kwargs)
        try:
            conn.open()
            transport = conn.client.get_transport()
            transport.set_keepalive(15)  # a dead peer is noticed, not waited on forever
            self.stats["connect"] += 1
            # The shell and the SFTP server each start through the login shell (and
            # its rc files): start the shell first and let both start in parallel.
            self._nonce = "xenrun-" + secrets.token_hex(8)
            chan = transport.open_session(timeout=self.connect_timeout)
            chan.exec_command("exec /bin/sh")
            chan.sendall(f"N={self._nonce}\n".encode() +
                         (PROLOGUE % {"path": ":".join(SEARCH_PATH), "fmt": STAT_FORMAT, "small": SMALL}).encode())
            self._chan = chan
            self._sftp = conn.sftp()
            self._count_sftp(self._sftp)
            self._read_answer(timeout=max(30, self.connect_timeout))
            if self.root:
                self.root = self._prefix = self._sftp.normalize(self.root)  # the root itself may be a link
        except TargetError:
            conn.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as e:
            conn.close()
            self._chan = self._sftp = None
            raise TargetError(f"cannot reach {self}: {_why(e)}") from None
        self._conn = conn
        self.user = conn.user

    def _count_sftp(self, sftp) -> None:
        """Count every SFTP request (each is one round trip) in self.stats."""
        for name in ("_request", "_async_request"):
            original = getattr(sftp, name)

            def counted(*args, _original=original):
                self.stats["sftp"] += 1
                return _original(*args)
            setattr(sftp, name, counted)

    def close(self) -> None:
        """Close the session (releases the lock on the host)."""
        self._close_appends()
        if self._conn is not None:
            self._conn.close()
        self._conn = self._sftp = self._chan = None
        self._locked = False

    def _close_appends(self) -> None:
        for f in [*self._appends.values(), *self._dir_handles.values()]:
            try:
                f.close()
            except (OSError, EOFError):
                pass
        self._appends.clear()
        self._append_real.clear()
        self._dir_handles.clear()

    @property
    def sftp(self):
        self._connect()
        return self._sftp

    # -- the persistent shell ----------------------------------------------------
    def _request(self, script: str, timeout: float | None = None) -> tuple[bytes, int]:
        """Send one request to the shell; returns (answer bytes, status)."""
        self._connect()
        self.stats["command"] += 1
        try:
            self._chan.sendall(script.encode() + b"\n")
        except (OSError, EOFError) as e:
            raise TargetError(f"{self}: lost the connection: {_why(e)}") from None
        return self._read_answer(timeout)

    def _find(self, marker: bytes) -> tuple[int, int] | None:
        """Where ``marker`` starts a line in the buffer, and where that line ends."""
        if self._buf.startswith(marker):
            at = 0
        else:
            at = self._buf.find(b"\n" + marker) + 1
            if not at:
                return None
        nl = self._buf.find(b"\n", at + len(marker))
        return None if nl < 0 else (at, nl)

    def _read_answer(self, timeout: float | None = None) -> tuple[bytes, int]:
        """Read up to the next marker line: "N END status" after a request,
        "N READY" after the prologue (what came before it was rc-file noise)."""
        end, ready = f"{self._nonce} END ".encode(), f"{self._nonce} READY".encode()
        deadline = None if timeout is None else time.monotonic() + timeout
        chan = self._chan
        while True:
            for marker in (end, ready):
                found = self._find(marker)
                if found:
                    at, nl = found
                    answer, line = self._buf[:at], self._buf[at + len(marker):nl]
                    self._buf = self._buf[nl + 1:]
                    return (b"", 0) if marker is ready else (answer, int(line or b"0"))
            while chan.recv_stderr_ready():
                chan.recv_stderr(65536)  # the shell's own stderr: drained, not kept
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise TargetError(f"{self}: no answer within {timeout:.0f} s; the session was closed")
            chan.settimeout(0.5)
            try:
                data = chan.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                self.close()
                raise TargetError(f"{self}: the remote shell ended (connection lost?)")
            self._buf += data

    # -- cache -------------------------------------------------------------------
    @property
    def _offline(self) -> bool:
        return self._spec is not None or self._cache_only

    def _invalidate(self) -> None:
        """Forget everything (after a command, which may change any file)."""
        self._magic: dict[str, bytes] = {}
        self._lst: dict[str, FileInfo | None] = {}
        self._data: dict[str, bytes] = {}
        self._dirs: dict[str, list[str]] = {}

    def _forget(self, key: str) -> None:
        """Forget what a write to ``key`` changes: the entry itself, anything below
        it, its folder's listing. Exact because every key is a resolved path (no
        link on the way), so no other key can lead to the same file."""
        if self._spec is not None:
            raise TargetError(f"{self}: a write while reading speculatively")
        below = key.rstrip("/") + "/"
        for cache in (self._magic, self._lst, self._data, self._dirs):
            for k in [k for k in cache if k == key or k.startswith(below)]:
                del cache[k]
        self._dirs.pop(posixpath.dirname(key), None)

    def _want(self, key: str, letters: str) -> None:
        self._spec.setdefault(key, set()).update(letters)

    def _get_lst(self, key: str) -> FileInfo | None:
        if key in self._lst:
            return self._lst[key]
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
    def _join(self, parts: list[str]) -> str:
        return (self._prefix + "".join("/" + p for p in parts)) or "/"

    def _resolve(self, path: str, follow: bool) -> str:
        """The remote path for the target's ``path``: LocalTarget.real's algorithm
        over the remote lstat answers (cached), so nothing escapes a root, and on a
        host (a root at "/") it is realpath. Every key of the cache is such a path."""
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
        return self._join(resolve_in_root(path, follow, link_of, str(self)))

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
            if info.kind == "dir":
                raise TargetError(f"{self}: {path} is a folder, not a file")
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
    def prefetch(self, paths: list[str], dirs: list[str] = ()) -> None:
        """Fetch the lstat, stat and content of ``paths`` and the listings of
        ``dirs`` in as few remote scripts as the links among them allow (one when
        there are none); read, lstat, stat, exists and listdir then answer from
        the cache until the next write."""
        def touch():
            for p in paths:
                self.lstat(p)
                if (self.stat(p) or FileInfo("absent", 0, 0, 0, 0, 0)).kind == "file":
                    self.read(p)
            for d in dirs:
                self.listdir(d)
        self._warmed = True  # an explicit prefetch stands in for the warm-up
        self._rounds(touch)

    def _warm_up(self) -> None:
        """Before the first read: run the journal scan of a setup and the
        detect_hardware of the host's plugins against the cache, fetching what
        they ask for in bulk (a round per level of reads that depend on others)."""
        self._warmed = True

        def hints():
            from xenrun import plugins as registry
            from xenrun.apply import Journal, run_ids
            from xenrun.facts import Probe
            for run_id in run_ids(self):
                Journal.read(self, run_id)
            for name in self.plugins:
                try:
                    detect = getattr(registry.load(name), "detect_hardware", None)
                    if detect is not None:
                        detect(probe=Probe(self))
                except Exception:  # noqa: BLE001 - choking on placeholders; the real run will tell
                    pass
        self._rounds(hints)

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
        keys = sorted(wants)
        args = " ".join(f"{''.join(sorted(wants[k]))} {shlex.quote(k)}" for k in keys)
        answer, _ = self._request(f"x_fetch {args}; printf '%s END 0\\n' \"$N\"")
        lines = answer.split(b"\n")
        i = 0
        links: dict[str, str] = {}
        lst: dict[str, str] = {}
        while i < len(lines):
            words = lines[i].decode(errors="surrogateescape").split(" ", 2)
            i += 1
            if len(words) < 2 or not words[1].isdigit() or int(words[1]) >= len(keys):
                continue
            tag, key = words[0], keys[int(words[1])]
            if tag == "L":
                lst[key] = words[2] if len(words) > 2 else "?"
                continue
            body = []
            while i < len(lines) and lines[i] not in (b".", b"!"):
                body.append(lines[i])
                i += 1
            ok = i < len(lines) and lines[i] == b"."
            i += 1
            if not ok:
                continue
            data = base64.b64decode(b"".join(body))
            if tag == "K":
                links[key] = data[:-1].decode(errors="surrogateescape") if data.endswith(b"\n") else data.decode(errors="surrogateescape")
            elif tag == "C":
                self._data[key] = data
            elif tag == "D":
                self._dirs[key] = sorted(n.decode(errors="surrogateescape") for n in data.split(b"\0") if n)
        for key, value in lst.items():
            if value == "-":
                self._lst[key] = None
            elif value != "?":
                info = _info(value, links.get(key))
                if info.kind != "link" or key in links:
                    self._lst[key] = info

    # -- writing -----------------------------------------------------------------
    def _fsync(self, f) -> None:
        """fsync a remote file. paramiko has no fsync call, so this sends the
        fsync@openssh.com extension (OpenSSH >= 6.5) through its request
        primitive; a server without it gets one remote `sync` instead."""
        from paramiko.sftp import CMD_EXTENDED
        if self._fsync_ext:
            try:
                self._sftp._request(CMD_EXTENDED, "fsync@openssh.com", f.handle)
                return
            except OSError:
                self._fsync_ext = False
        self._request("sync; printf '%s END 0\\n' \"$N\"")

    def _fsync_dir(self, folder: str) -> None:
        """Make a rename in ``folder`` durable: a folder opened read-only is a file
        handle to sftp-server, so the same extension fsyncs it. The handle stays
        open for the next write there (one round trip instead of three)."""
        f = self._dir_handles.get(folder)
        try:
            if f is None:
                f = self._dir_handles[folder] = self.sftp.open(folder, "r")
            self._fsync(f)
        except OSError:
            self._dir_handles.pop(folder, None)
            self._request("sync; printf '%s END 0\\n' \"$N\"")

    def _new_file(self, path: str, mode: int):
        """A new file at ``path`` (O_EXCL: never through a link), with ``mode`` set
        before any data is written. A leftover of a killed run is removed first."""
        try:
            f = self.sftp.open(path, "wx")
        except OSError:
            try:
                self._sftp.remove(path)
            except FileNotFoundError:
                pass
            f = self._sftp.open(path, "wx")
        f.chmod(mode)
        return f

    def makedirs(self, path: str) -> list[str]:
        """Create ``path`` and missing parents; returns the folders it created,
        outermost first (so an undo can remove them)."""
        created = []
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            if created or not self.exists(sub):
                key = self._resolve(sub, True)
                self._forget(key)
                self.sftp.mkdir(key, 0o755)
                created.append(sub)
        return created

    def _temp_beside(self, real: str) -> tuple[str, str]:
        """(folder, temp name) for an atomic replace of ``real``; both forgotten
        by the cache, which is about to be wrong about them."""
        folder, _, name = real.rpartition("/")
        folder = folder or "/"
        tmp = f"{folder.rstrip('/')}/.{name}{TMP_SUFFIX}"
        self._forget(real)
        self._forget(tmp)
        return folder, tmp

    def write_atomic(self, path: str, data: bytes, mode: int, uid: int | None = None,
                     gid: int | None = None, before_rename=None) -> None:
        """Replace ``path`` with ``data``: temp file in the same folder, fsync,
        ``before_rename(remote path of the temp file)`` (validation; raise to
        abort), rename, fsync of the folder. The temp file never outlives a failure."""
        real = self._resolve(path, True)
        folder, tmp = self._temp_beside(real)
        try:
            with self._new_file(tmp, mode) as f:
                if uid is not None and gid is not None and self.user == "root":
                    f.chown(uid, gid)
                f.set_pipelined(True)
                f.write(data)
                f.flush()
                self._fsync(f)
            if before_rename:
                before_rename(tmp)
            self._sftp.posix_rename(tmp, real)
        except BaseException:
            try:
                self._sftp.remove(tmp)
            except (OSError, AttributeError):
                pass
            raise
        self._fsync_dir(folder)

    def symlink(self, path: str, target: str) -> None:
        real = self._resolve(path, False)
        folder, tmp = self._temp_beside(real)
        try:
            self.sftp.remove(tmp)
        except FileNotFoundError:
            pass
        self._sftp.symlink(target, tmp)  # paramiko sends (target, link), the order OpenSSH expects
        self._sftp.posix_rename(tmp, real)
        self._fsync_dir(folder)

    def remove(self, path: str) -> None:
        real = self._resolve(path, False)
        self._forget(real)
        try:
            self.sftp.remove(real)
        except FileNotFoundError:
            return
        self._fsync_dir(real.rpartition("/")[0] or "/")

    def rmdir(self, path: str) -> bool:
        real = self._resolve(path, False)
        self._forget(real)
        handle = self._dir_handles.pop(real, None)
        if handle is not None:
            handle.close()
        try:
            self.sftp.rmdir(real)
            return True
        except OSError:
            return False

    def make_sparse(self, path: str, size: int, mode: int) -> None:
        """Create (or grow) a sparse file: only the size is set, no data written."""
        real = self._resolve(path, True)
        self._forget(real)
        try:
            f = self.sftp.open(real, "r+")
        except FileNotFoundError:
            f = self._new_file(real, mode)
        with f:
            if f.stat().st_size < size:
                f.truncate(size)
            self._fsync(f)
        self._fsync_dir(real.rpartition("/")[0] or "/")

    def truncate(self, path: str, size: int) -> None:
        """Set a file's size (undoing a grown disk image)."""
        real = self._resolve(path, True)
        self._forget(real)
        try:
            self.sftp.truncate(real, size)
        except FileNotFoundError:
            pass

    def append_line(self, path: str, line: str) -> None:
        """Append one line and fsync it: the journal's durability rests on this.
        The file stays open for the next line (two round trips per line)."""
        real = self._append_real.get(path) or self._resolve(path, True)
        self._forget(real)
        f = self._appends.get(real)
        if f is None:
            self._append_real[path] = real
            try:
                f = self.sftp.open(real, "ax")  # new: private before the first line
                f.chmod(0o600)
            except OSError:  # exists (SFTP v3 says only "Failure"); a real error shows below
                f = self.sftp.open(real, "a")
            self._appends[real] = f
        f.write((line.rstrip("\n") + "\n").encode())
        f.flush()
        self._fsync(f)

    # -- commands ----------------------------------------------------------------
    def cannot_run(self, argv: tuple[str, ...]) -> str | None:
        """Why ``argv`` cannot run on this target, or None when it can."""
        if self.is_host:
            return None
        if self.files_only:
            return "--files-only: commands are left for the host"
        if self.user not in (None, "root"):
            return f"running commands inside {self.root} needs chroot, which needs root on the host"
        if self.find_program(argv[0]) is None:
            return f"{argv[0]} is not installed in {self.root} (commands run there with chroot)"
        return None

    def find_program(self, program: str) -> str | None:
        """The program's path inside the target, if it is there and can run (an
        ELF binary or a script with #!), as LocalTarget.find_program."""
        candidates = [program] if program.startswith("/") else [f"{d}/{program}" for d in SEARCH_PATH]
        for c in candidates:
            info = self.stat(c)
            if info is not None and info.kind == "file" and info.mode & 0o111:
                if self._offline:
                    return c  # speculating: no round trip for the magic bytes
                key = self._resolve(c, True)
                if key not in self._magic:
                    self._magic[key] = self._data[key][:4] if key in self._data else self._head(key, 4)
                magic = self._magic[key]
                if magic == b"\x7fELF" or magic[:2] == b"#!":
                    return c
        return None

    def _head(self, key: str, size: int) -> bytes:
        try:
            with self.sftp.open(key, "rb") as f:
                return f.read(size)
        except OSError:
            return b""

    def _command(self, argv, timeout: float | None, input: str | None, chroot: bool) -> tuple[int, bytes, bytes]:
        """Run argv through the shell: one quoted command line, stdin from the
        input (or /dev/null), stdout and stderr framed in base64, fd 9 (the lock)
        closed. Returns (status, stdout, stderr)."""
        self._connect()
        words = ["x_t", str(int(timeout + 0.999)) if timeout else "''"]
        if chroot and self.root:
            words += ["env", "-i", f"PATH={':'.join(SEARCH_PATH)}", "LC_ALL=C", "chroot", shlex.quote(self.root)]
        else:
            words += ["env", "LC_ALL=C"]
        words += [shlex.quote(a) for a in argv]
        script, stdin = "", "/dev/null"
        if input is not None:
            encoded = base64.encodebytes(input.encode()).decode()
            script = f"base64 -d > \"$X/i\" <<'{self._nonce}-IN'\n{encoded}{self._nonce}-IN\n"
            stdin = '"$X/i"'
        script += f"(cd / && {' '.join(words)}) <{stdin} >\"$X/o\" 2>\"$X/e\" 9>&-; x_end $?"
        answer, rc = self._request(script, None if timeout is None else timeout + 30)
        sep = f"{self._nonce} E\n".encode()
        if answer.startswith(sep):
            out, err = b"", answer[len(sep):]
        else:
            out, _, err = answer.partition(b"\n" + sep)
        return rc, base64.b64decode(out.replace(b"\n", b"")), base64.b64decode(err.replace(b"\n", b""))

    def run(self, argv: tuple[str, ...] | list[str], timeout: float | None = None,
            input: str | None = None) -> Result:
        argv = tuple(argv)
        if self._spec is not None:
            return Result(argv, 1, "", "not run while reading speculatively")
        reason = self.cannot_run(argv)
        if reason:
            raise TargetError(f"{self}: cannot run {argv[0]}: {reason}")
        self._invalidate()  # a command may change any file
        rc, out, err = self._command(argv, timeout, input, chroot=True)
        if rc == 124 and timeout:
            return Result(argv, 124, out.decode(errors="replace"), f"{argv[0]}: timed out after {timeout} s")
        return Result(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def run_on_file(self, argv: tuple[str, ...], remote_path: str) -> Result:
        """Run a check command of the host (outside any root) on a file of the
        target, "{}" standing for its remote path (the temp file before a rename)."""
        full = tuple(str(remote_path) if a == "{}" else a for a in argv)
        rc, out, err = self._command(full, None, None, chroot=False)
        if rc == 127:
            return Result(full, 127, "", f"{full[0]}: command not found on {self} (install it to validate this file)")
        return Result(full, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    # -- lock --------------------------------------------------------------------
    def lock(self, path: str, holder: str) -> None:
        """Take the target's lock at ``path`` or fail at once naming its holder. The
        lock is held by the session's shell, so it ends with the session."""
        self.makedirs(path.rpartition("/")[0])
        real = self._resolve(path, True)
        self._forget(real)
        answer, rc = self._request(f"x_lock {shlex.quote(real)} {shlex.quote(holder)}")
        if rc == 0:
            self._locked, self._lock_path = True, real
            return
        if rc == 1:
            who = base64.b64decode(answer.replace(b"\n", b"")).decode(errors="replace").strip() or "another process"
            raise LockHeld(f"{self}: another xenrun run holds the lock {path}: {who}")
        if rc == 127:
            raise TargetError(f"{self}: flock (util-linux) is needed on the host to lock {path}")
        raise TargetError(f"{self}: cannot open the lock {path} (status {rc})")

    def unlock(self) -> None:
        self._close_appends()
        if self._locked and self._chan is not None:
            self._locked = False
            self._request(f"x_unlock {shlex.quote(self._lock_path)}")


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__
