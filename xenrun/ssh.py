"""SSHTarget: a remote host over SSH through Fabric, with LocalTarget's methods.

One connection per target carries two long-lived channels:

- an SFTP session (paramiko's SFTPClient), started when a run first writes, for
  every file operation: atomic writes (temp file, fsync@openssh.com,
  posix-rename@openssh.com, fsync of the folder), symlinks, removal, sparse files,
  journal appends; requests go in pipelines (see "writing" below);
- one persistent POSIX ``sh`` reading requests on its stdin, for commands and for
  bulk reads: a request is one quoted command line, its answer is framed with a
  random marker and base64, so anything root's rc files print is skipped.

Why one shell and not one exec channel per command: sshd starts every exec and
every subsystem through the login shell, and on these machines root's ~/.bashrc
runs ``pyenv init`` (0.15-0.35 s) each time, non-interactive or not (Debian's bash
reads .bashrc when started by sshd). A persistent shell pays that once per
connection (and the SFTP server once more, only on a run that writes); a request
then costs one round trip (about 1 ms on loopback).

The host needs a POSIX sh and the usual tools (stat -c, base64, readlink, mktemp,
flock from util-linux, env, chroot for a root prefix); no Python.

Reads answer from a cache filled in bulk until the first write (a write forgets
what it changes, a command everything): ``read_ahead(fn)`` runs ``fn`` (a setup's
whole read side: state, facts, plan, assessment) speculatively against the cache
and fetches whatever it asked for in one remote script per round; ``prefetch``
and a warm-up (the host's detect_hardware) do the same for less. A cache miss
outside them falls back to one SFTP request.

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
import fcntl
import os
import posixpath
import secrets
import shlex
import socket
import stat as statmod
import threading
import time
from collections import Counter

import structlog

from xenrun.errors import LockHeld, TargetError
from xenrun.target import SEARCH_PATH, TMP_SUFFIX, FileInfo, Result, resolve_in_root

log = structlog.get_logger()

STAT_FORMAT = "%f %u %g %s %b"  # raw mode (hex), uid, gid, size, 512-byte blocks
CONNECT_TIMEOUT = 10
WARM_UP_ROUNDS = 4
MAGIC_LINKS = ("/proc/self", "/proc/thread-self")
# a host silent this long while a command runs is asked for a sign of life, and
# given this long to answer before it is taken for gone
PROBE_AFTER, PROBE_WAIT = 20.0, 40.0
SFTP_TIMEOUT = 120.0  # one SFTP request: an answer or the host is gone
SMALL = 65536  # a file read after a stat miss comes along if at most this big

# The persistent shell's functions. $N is the answer marker, $X a private temp
# folder for command output. Records of x_fetch (one per line, i = index of the
# path in the request): "L i FIELDS|-|?" lstat ("-" absent, "?" unknown),
# "Z i j ..." the targets of the links i, j, ... (NUL-terminated, in that order),
# "K i" one link's target (where readlink cannot take several: newline-ended),
# "C i j ..." the contents of regular files i, j, ... one after the other (cut by
# their sizes from the L records; "c" always, "o" when at most SMALL bytes),
# "M i HEX" the first 4 bytes of a regular file ("m", for find_program),
# "Y" the listings asked for ("/i" NUL, then the names of folder i, each NUL-ended);
# Z, K, C and Y are followed by base64 lines and "." ("!" when reading failed).
# A fetch starts a fixed handful of processes whatever the number of paths: one
# stat for every lstat (x_stat; the shell's own tests find the absent ones), one
# readlink for every link, one base64 for all the listings, then one base64 per
# cat for all the contents (a path with a newline in its name gets a stat of its own).
PROLOGUE = r"""
PATH=%(path)s:$PATH; export PATH
LC_ALL=C; export LC_ALL
NL='
'
X=$(mktemp -d "${TMPDIR:-/tmp}/xenrun.XXXXXXXX") || exit 1
trap 'rm -rf "$X"' EXIT
trap 'exit 129' HUP
trap 'exit 143' TERM
if command -v timeout >/dev/null 2>&1; then XT=1; else XT=; fi
x_info() {
  if v=$(stat -c '%(fmt)s' -- "$2" 2>/dev/null); then printf 'L %%s %%s\n' "$1" "$v"
  else printf 'L %%s ?\n' "$1"; fi
}
x_stat() {
  n=$#
  while [ $n -gt 1 ]; do
    m=$1 p=$2; shift 2; n=$((n-2))
    case $m in *l*)
      case $p in *"$NL"*) ;; *) if [ -e "$p" ] || [ -L "$p" ]; then set -- "$@" "$p"; fi;; esac;;
    esac
  done
  : > "$X/s"
  if [ $# -gt 0 ]; then stat -c '%(fmt)s %%n' -- "$@" > "$X/s" 2>/dev/null; fi
  return 0
}
x_links() {
  n=$# i=0 k= xd=
  while [ $n -gt 1 ]; do
    m=$1 p=$2; shift 2; n=$((n-2))
    case $m in *d*) xd=1;; esac
    case $m in *l*) if [ -L "$p" ]; then set -- "$@" "$p"; k="$k $i"; fi;; esac
    i=$((i+1))
  done
  [ $# -eq 0 ] && return 0
  readlink -z -- "$@" > "$X/k" 2>/dev/null || return 1
  printf 'Z%%s\n' "$k"; base64 < "$X/k"; printf '.\n'
}
x_links1() {
  i=0
  while [ $# -gt 1 ]; do
    m=$1 p=$2; shift 2
    case $m in *l*) if [ -L "$p" ]; then printf 'K %%s\n' $i; readlink -- "$p" | base64; printf '.\n'; fi;; esac
    i=$((i+1))
  done
}
x_dirs() {
  printf 'Y\n'
  (i=0
   while [ $# -gt 1 ]; do
     case $1 in *d*)
       if [ -d "$2" ] && cd "$2" 2>/dev/null; then
         printf '/%%s\000' $i
         for f in * .[!.]* ..?*; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%%s\000' "$f"; fi; done
       fi;;
     esac
     shift 2; i=$((i+1))
   done) | base64
  printf '.\n'
}
x_size() { z=; case $1 in 8???) z=$4;; esac; }
x_fetch() {
  x_stat "$@"
  x_links "$@" || x_links1 "$@"
  if [ -n "$xd" ]; then x_dirs "$@"; fi
  exec 8< "$X/s"
  i=0 s= n=$# cs=
  while [ $n -gt 1 ]; do
    m=$1 p=$2; shift 2; n=$((n-2)); f=
    case $m in *l*)
      if [ -z "$s" ]; then IFS= read -r s <&8 || s=; fi
      if [ -n "$s" ] && [ "${s#* * * * * }" = "$p" ]; then f=${s%%" $p"}; s=; fi
      if [ -n "$f" ]; then printf 'L %%s %%s\n' $i "$f"
      elif ! [ -e "$p" ] && ! [ -L "$p" ]; then printf 'L %%s -\n' $i
      else case $p in *"$NL"*) x_info $i "$p";; *) printf 'L %%s ?\n' $i;; esac
      fi;;
    esac
    case $m in *c*|*o*)
      z=; if [ -n "$f" ]; then x_size $f; fi
      if [ -n "$z" ] && { [ -z "${m##*c*}" ] || [ "$z" -le %(small)d ]; }; then
        set -- "$@" "$p"; cs="$cs $i"
      fi;;
    esac
    case $m in *m*)
      z=; if [ -n "$f" ]; then x_size $f; fi
      if [ -n "$z" ]; then printf 'M %%s %%s\n' $i "$(od -An -tx1 -N4 -- "$p" 2>/dev/null)"; fi;;
    esac
    i=$((i+1))
  done
  exec 8<&-
  if [ -n "$cs" ]; then
    printf 'C%%s\n' "$cs"
    if cat -- "$@" | base64; then printf '.\n'; else printf '!\n'; fi
  fi
}
x_t() { t=$1; shift; if [ -n "$t" ] && [ -n "$XT" ]; then exec timeout "$t" "$@"; else exec "$@"; fi; }
x_end() {
  if [ -s "$X/o" ]; then base64 < "$X/o"; fi; printf '%%s E\n' "$N"
  if [ -s "$X/e" ]; then base64 < "$X/e"; fi; printf '%%s END %%s\n' "$N" "$1"
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
        self._heard, self._probe = 0.0, None  # last sign of life; keepalive in flight (sent, answered)
        self._locked = False
        self._appends: dict[str, object] = {}  # journal files kept open
        self._append_real: dict[str, str] = {}  # and where they lie
        self._dir_handles: dict[str, object] = {}  # folders kept open for fsync
        self._programs: dict[str, str] = {}  # find_program's answers that found one
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
                  "transport_factory": _aead_first_transport(), **self.connect_kwargs}
        conn = fabric.Connection(self.hostname, user=self.user, port=self.port,
                                 connect_timeout=max(1, int(self.connect_timeout)), connect_kwargs=kwargs)
        known = known_hosts_file()
        name = f"[{self.hostname}]:{self.port}" if self.port not in (None, 22) else self.hostname  # as in the file
        try:
            # Fabric accepts any host key; xenrun checks them as OpenSSH's
            # StrictHostKeyChecking=accept-new does: a known host must show its
            # known key, a new one is trusted and saved
            keys = conn.client.get_host_keys()
            for key in _known_keys(known, name):
                keys.add(name, key.get_name(), key)
            conn.client.set_missing_host_key_policy(_accept_new(known))
            conn.open()
            transport = conn.client.get_transport()
            transport.set_keepalive(15)  # keeps NAT and firewalls open; dead peers: _heard_of_late
            self._heard, self._probe = time.monotonic(), None
            self.stats["connect"] += 1
            # The shell starts through the login shell (and its rc files); the SFTP
            # server too, so it starts only when a write needs it (self.sftp): a
            # run with nothing to change starts one program on the host, not two.
            self._nonce = "xenrun-" + secrets.token_hex(8)
            chan = transport.open_session(timeout=self.connect_timeout)
            chan.exec_command("exec /bin/sh")
            # the root itself may be a link: its real path, asked right after the prologue
            real_root = "" if not self.root else (
                f"if d=$(cd -P {shlex.quote(self.root)} 2>/dev/null && pwd -P); then printf '%s' \"$d\" | base64;"
                " fi; printf '%s END 0\\n' \"$N\"\n")
            chan.sendall(f"N={self._nonce}\n".encode() +
                         (PROLOGUE % {"path": ":".join(SEARCH_PATH), "fmt": STAT_FORMAT, "small": SMALL}).encode())
            self._chan = chan
            self._read_answer(timeout=max(30, self.connect_timeout))
            if self.root:  # (after READY: an answer's end marker must not come before it)
                chan.sendall(real_root.encode())
                answer, _ = self._read_answer(timeout=max(30, self.connect_timeout))
                real = base64.b64decode(answer.replace(b"\n", b"")).decode(errors="surrogateescape")
                if not real.startswith("/"):
                    raise OSError(f"{self.root}: no such folder on the host")
                self.root = self._prefix = real
        except TargetError:
            conn.close()
            raise
        except paramiko.BadHostKeyException as e:
            conn.close()
            raise TargetError(f"{self}: its host key is not the one {known} has for {name} (got"
                              f" {e.key.get_name()} {_fingerprint(e.key)}, expected {_fingerprint(e.expected_key)});"
                              " not connecting. If the host was reinstalled, remove the old key:"
                              f" ssh-keygen -R '{name}' -f {known}") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            conn.close()
            self._chan = self._sftp = None
            raise TargetError(f"cannot reach {self}: {_why(e)}") from None
        self._conn = conn
        self.user = conn.user

    def _count_sftp(self, sftp) -> None:
        """Count in self.stats every SFTP request ("sftp") and every wait for
        answers ("sftp_waits": a round trip, for one request or a pipeline)."""
        send, wait = sftp._async_request, sftp._request

        def counted_send(*args):
            self.stats["sftp"] += 1
            return send(*args)

        def counted_wait(*args):
            self.stats["sftp_waits"] += 1
            return wait(*args)
        sftp._async_request, sftp._request = counted_send, counted_wait

    def close(self) -> None:
        """Close the session (releases the lock on the host)."""
        self._close_appends()
        if self._conn is not None:
            self._conn.close()
        self._conn = self._sftp = self._chan = None
        self._locked = False

    def _close_appends(self, meanwhile=None) -> None:
        """Close the journal and folder handles kept open; ``meanwhile()`` runs
        while the closes are on their way (the unlock: one wait for both)."""
        handles = [state[0] for state in self._appends.values()] + list(self._dir_handles.values())
        self._appends.clear()
        self._append_real.clear()
        self._dir_handles.clear()
        requests = [self._close_request(h) for h in handles] if self._sftp is not None else []
        try:
            sent = self._send(requests) if requests else []
        except Exception:  # noqa: BLE001 - closing handles of a session that may be gone
            requests = []
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            if requests:
                try:
                    self._collect(requests, sent)
                except Exception:  # noqa: BLE001 - as above
                    pass

    @property
    def sftp(self):
        """The SFTP session, started on first use."""
        self._connect()
        if self._sftp is None:
            import paramiko
            try:
                self._sftp = self._conn.sftp()
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise TargetError(f"{self}: cannot start SFTP: {_why(e)}") from None
            self._sftp.get_channel().settimeout(SFTP_TIMEOUT)
            self._count_sftp(self._sftp)
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
            now = time.monotonic()
            if deadline is not None and now > deadline:
                self.close()
                raise TargetError(f"{self}: no answer within {timeout:.0f} s; the session was closed")
            if not self._heard_of_late(now):
                self.close()
                raise TargetError(f"{self}: the host stopped answering (no reply to an SSH keepalive within"
                                  f" {PROBE_WAIT:.0f} s); the session was closed")
            chan.settimeout(0.5)
            try:
                data = chan.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                self.close()
                raise TargetError(f"{self}: the remote shell ended (connection lost?)")
            self._buf += data
            self._heard = time.monotonic()

    def _heard_of_late(self, now: float) -> bool:
        """False when the host has gone: after PROBE_AFTER s of silence (a long
        command prints nothing) a keepalive that wants a reply is sent; if no reply
        comes within PROBE_WAIT s the peer is dead. paramiko's own keepalive wants no
        reply, so a dead peer would be waited on until TCP gives up (many minutes)."""
        probe = self._probe
        if probe is not None:
            sent, answered = probe
            if answered.is_set():
                self._probe, self._heard = None, now
            elif now - sent > PROBE_WAIT:
                return False
        elif now - self._heard > PROBE_AFTER and self._conn is not None:
            answered = threading.Event()
            transport = self._conn.client.get_transport()

            def ask():
                try:  # OpenSSH answers an unknown global request with a failure: any answer will do
                    transport.global_request("keepalive@openssh.com", wait=True)
                except Exception:  # noqa: BLE001 - a dead transport: the reply never comes
                    return
                if transport.is_active():  # global_request also returns when the transport dies
                    answered.set()
            threading.Thread(target=ask, daemon=True, name=f"keepalive {self.hostname}").start()
            self._probe = (now, answered)
        return True

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
        """Before the first read: run the journal scan of a setup and the
        detect_hardware of the host's plugins against the cache, fetching what
        they ask for in bulk (a round per level of reads that depend on others)."""
        self._warmed = True

        def hints():
            from xenrun import registry
            from xenrun.apply import STATE_DIR, read_state
            from xenrun.facts import Probe
            self.lstat(f"{STATE_DIR}/lock")  # taken before an apply
            read_state(self)
            for name in self.plugins:
                try:
                    detect = getattr(registry.load(name), "detect_hardware", None)
                    if detect is not None:
                        detect(probe=Probe(self))
                except Exception:  # noqa: BLE001 - choking on placeholders; the real run will tell
                    pass
        self._rounds(hints)

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
        keys = sorted(wants)
        args = " ".join(f"{''.join(sorted(wants[k]))} {shlex.quote(k)}" for k in keys)
        answer, _ = self._request(f"x_fetch {args}; printf '%s END 0\\n' \"$N\"")
        lines = answer.split(b"\n")
        i = 0
        links: dict[str, str] = {}
        lst: dict[str, str] = {}
        text = lambda b: b.decode(errors="surrogateescape")  # noqa: E731
        while i < len(lines):
            head = text(lines[i])
            words = head.split(" ", 2)
            i += 1
            tag = words[0]
            if tag in ("L", "M"):
                if len(words) > 1 and words[1].isdigit() and int(words[1]) < len(keys):
                    value = words[2] if len(words) > 2 else ("?" if tag == "L" else "")
                    if tag == "L":
                        lst[keys[int(words[1])]] = value
                    else:
                        try:
                            self._magic[keys[int(words[1])]] = bytes.fromhex(value.replace(" ", ""))
                        except ValueError:
                            pass
                continue
            if tag not in ("Y", "Z", "C") and not (tag == "K" and len(words) == 2 and words[1].isdigit()
                                                   and int(words[1]) < len(keys)):
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
            if tag == "Z":  # several links' targets, NUL-terminated, in the order of their indices
                where = [int(w) for w in head[1:].split()]
                targets = data.split(b"\0")
                if len(targets) == len(where) + 1 and not targets[-1] and all(n < len(keys) for n in where):
                    links.update((keys[n], text(t)) for n, t in zip(where, targets))
            elif tag == "Y":  # listings: "/i" starts folder i's names
                listings: dict[str, list[str]] = {}
                names: list | None = None
                for entry in data.split(b"\0"):
                    if entry.startswith(b"/"):
                        n = int(entry[1:]) if entry[1:].isdigit() else len(keys)
                        names = listings.setdefault(keys[n], []) if n < len(keys) else None
                    elif entry and names is not None:
                        names.append(text(entry))
                self._dirs.update((k, sorted(v)) for k, v in listings.items())
            elif tag == "K":
                key = keys[int(words[1])]
                links[key] = text(data[:-1]) if data.endswith(b"\n") else text(data)
            else:  # "C": the files' contents back to back, cut by the sizes stat gave
                self._data.update(_cut(data, [keys[n] for n in map(int, head[1:].split()) if n < len(keys)], lst))
        for key, value in lst.items():
            if value == "-":
                self._lst[key] = None
            elif value != "?":
                info = _info(value, links.get(key))
                if info.kind != "link" or key in links:
                    self._lst[key] = info

    # -- writing -----------------------------------------------------------------
    # Writes go to the SFTP server in pipelines: requests sent back to back, then
    # every answer read (one round trip for all). OpenSSH's sftp-server handles
    # requests one at a time in the order they arrive (fsync@openssh.com returns
    # once the data is on disk), so a pipeline does on the host exactly what the
    # same requests sent one by one would do; only the waiting is shared. A step
    # that may only happen if an earlier one succeeded (the rename after the data,
    # the target after its journal record) waits for that answer first.
    def _pipeline(self, requests: list[tuple], check: bool = True) -> list:
        """Send ``requests`` ((type, *args) each) back to back and read every answer,
        in order. Returns the answers; raises the first error, once all are in.
        An fsync the server does not know (no fsync@openssh.com) becomes one
        remote ``sync`` after the pipeline, and every later fsync a sync too.
        ``check=False``: errors are returned in place of their answers."""
        return self._collect(requests, self._send(requests), check)

    def _send(self, requests: list[tuple]) -> list:
        """Send ``requests`` without waiting; ``_collect`` reads their answers.
        They go out together: one write to the channel, so SSH carries them in
        as few packets as their size allows (each packet costs paramiko's
        Python, and sshd, more than the bytes in it)."""
        from paramiko.sftp import CMD_EXTENDED
        sftp = self.sftp
        sent, out = [], []
        sftp._write_all = out.append  # paramiko's _send_packet ends with _write_all(its bytes)
        try:
            for request in requests:
                if request[0] == "fsync":
                    if not self._fsync_ext:
                        sent.append("sync")
                        continue
                    request = (CMD_EXTENDED, "fsync@openssh.com", request[1])
                sent.append(sftp._async_request(type(None), *request))
        finally:
            del sftp._write_all
        if out:
            sftp._write_all(b"".join(out))
        return sent

    def _collect(self, requests: list[tuple], sent: list, check: bool = True) -> list:
        """The answers to ``requests`` sent as ``sent``: as _pipeline."""
        sftp = self.sftp
        self.stats["sftp_waits"] += 1
        answers, error, sync = [], None, False
        for num in sent:
            if num == "sync":
                answers.append(None)
                sync = True
                continue
            try:
                answers.append(sftp._read_response(num))
            except (socket.timeout, ConnectionError):
                raise  # the session, not this request: no use waiting for the others
            except (OSError, EOFError) as e:  # this request's status
                answers.append(e)
                if requests[len(answers) - 1][0] == "fsync" and "nsupported" in str(e):
                    self._fsync_ext, sync = False, True  # an old server: fsync by a remote sync
                elif error is None:
                    error = e
        if sync:
            self._request("sync; printf '%s END 0\\n' \"$N\"")
        if error is not None and check:
            raise error
        return answers

    @staticmethod
    def _path(key: str) -> bytes:
        return key.encode(errors="surrogateescape")

    @staticmethod
    def _open_request(key: str, flags: str, mode: int | None = None) -> tuple:
        """An SFTP open: "x" new (O_EXCL: never through a link), "a" append,
        "r" read, "rwc" read and write, created if absent; ``mode``: permissions
        to create it with (the umask may take bits)."""
        from paramiko.sftp import (CMD_OPEN, SFTP_FLAG_APPEND, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL,
                                   SFTP_FLAG_READ, SFTP_FLAG_WRITE)
        from paramiko.sftp_attr import SFTPAttributes
        bits = {"x": SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL,
                "a": SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_APPEND,
                "r": SFTP_FLAG_READ, "rwc": SFTP_FLAG_READ | SFTP_FLAG_WRITE | SFTP_FLAG_CREATE}[flags]
        attrs = SFTPAttributes()
        if mode is not None:
            attrs.st_mode = mode
        return (CMD_OPEN, SSHTarget._path(key), bits, attrs)

    @staticmethod
    def _handle(answer) -> bytes:
        from paramiko.sftp import CMD_HANDLE
        t, msg = answer
        if t != CMD_HANDLE:
            raise TargetError("the SFTP server answered an open without a handle")
        return msg.get_binary()

    @staticmethod
    def _attrs(mode: int | None = None, uid: int | None = None, gid: int | None = None, size: int | None = None):
        from paramiko.sftp_attr import SFTPAttributes
        attrs = SFTPAttributes()
        if mode is not None:
            attrs.st_mode = mode
        if uid is not None:
            attrs.st_uid, attrs.st_gid = uid, gid
        if size is not None:
            attrs.st_size = size
        return attrs

    def _writes(self, handle: bytes, data: bytes, offset: int = 0) -> list[tuple]:
        from paramiko.sftp import CMD_WRITE, int64
        step = 32768  # paramiko's (and the protocol's usual) largest write
        return [(CMD_WRITE, handle, int64(offset + at), data[at:at + step]) for at in range(0, len(data), step)]

    def _close_request(self, handle: bytes) -> tuple:
        from paramiko.sftp import CMD_CLOSE
        return (CMD_CLOSE, handle)

    def _dir_handle_requests(self, folder: str) -> list[tuple]:
        """The open of ``folder`` (for the fsync that makes a rename in it durable)
        when no handle is kept for it yet: to go in the pipeline before the rename."""
        return [] if folder in self._dir_handles else [self._open_request(folder, "r")]

    def _keep_dir_handle(self, folder: str, answers: list) -> None:
        if folder not in self._dir_handles and answers:
            self._dir_handles[folder] = self._handle(answers[-1])

    def _fsync_dir(self, folder: str) -> list[tuple]:
        """The request that makes a rename in ``folder`` durable: a folder opened
        read-only is a file handle to sftp-server, so fsync@openssh.com works on
        it (the handle stays open for the next write there)."""
        return [("fsync", self._dir_handles[folder])]

    def _open_new_many(self, files: list[tuple[str, str, int | None]], folders: list[str] = ()) -> list[bytes]:
        """New files (key, folder, mode) opened O_EXCL (never through a link), in
        one round trip; a leftover of a killed run is removed and opened again
        (a second). Each folder (theirs and ``folders``) is opened too and kept,
        for the fsync that makes entries in it durable. Returns the files'
        handles, in order."""
        from paramiko.sftp import CMD_REMOVE
        folders = list(dict.fromkeys([folder for _, folder, _ in files] + list(folders)))
        extra = [f for f in folders if f not in self._dir_handles]
        requests = [self._open_request(key, "x", mode) for key, _, mode in files] \
            + [self._open_request(f, "r") for f in extra]
        answers = self._pipeline(requests, check=False) if requests else []
        for folder, answer in zip(extra, answers[len(files):]):
            if not isinstance(answer, Exception):
                self._dir_handles[folder] = self._handle(answer)
        handles: list = [None if isinstance(a, Exception) else self._handle(a) for a in answers[:len(files)]]
        again = [n for n, h in enumerate(handles) if h is None]
        if again:  # SFTP v3 says only "Failure" for "exists": remove and try once more
            requests = []
            for n in again:
                key, _, mode = files[n]
                requests += [(CMD_REMOVE, self._path(key)), self._open_request(key, "x", mode)]
            retried = self._pipeline(requests, check=False)
            for n, answer in zip(again, retried[1::2]):
                handles[n] = answer if isinstance(answer, Exception) else self._handle(answer)
            failed = [(files[n][0], h) for n, h in enumerate(handles) if isinstance(h, Exception)]
            if failed:
                self._abandon(files, handles)
                raise TargetError(f"{self}: cannot create {failed[0][0]}: {failed[0][1]}") from failed[0][1]
        missing = [f for f in folders if f not in self._dir_handles]
        if missing:
            self._abandon(files, handles)
            raise TargetError(f"{self}: cannot open the folder {missing[0]} (for its fsync)")
        return handles

    def _abandon(self, files: list[tuple], handles: list) -> None:
        """Close and remove the files of a failed _open_new_many that were made."""
        from paramiko.sftp import CMD_REMOVE
        made = [(key, h) for (key, *_), h in zip(files, handles) if isinstance(h, bytes)]
        try:
            self._pipeline([self._close_request(h) for _, h in made]
                           + [(CMD_REMOVE, self._path(key)) for key, _ in made], check=False)
        except (OSError, EOFError):
            pass

    def _close_quietly(self, handle: bytes) -> None:
        try:
            self._pipeline([self._close_request(handle)])
        except (OSError, EOFError):
            pass

    def makedirs(self, path: str) -> list[str]:
        return self.makedirs_many([path])

    def makedirs_many(self, paths: list[str]) -> list[str]:
        """Create ``paths`` and their missing parents; returns the folders it
        created, each after its parent (so an undo can remove them newest first).
        One round trip to look (every part of every path at once), one to create
        the missing folders."""
        from paramiko.sftp import CMD_LSTAT, CMD_MKDIR
        from paramiko.sftp_attr import SFTPAttributes
        self._rounds(lambda: [self.exists(p) for p in paths])  # every part of every path in one go
        missing: list[str] = []
        for path in paths:
            parts = [p for p in path.split("/") if p]
            for i in range(1, len(parts) + 1):
                sub = "/" + "/".join(parts[:i])
                if sub not in missing and (posixpath.dirname(sub) in missing or not self.exists(sub)):
                    missing.append(sub)
        if not missing:
            return []
        keys = [self._resolve(sub, True) for sub in missing]  # from the cache: every part was fetched
        requests = []
        for key in keys:
            self._forget(key)
            requests += [(CMD_MKDIR, self._path(key), self._attrs(0o755)), (CMD_LSTAT, self._path(key))]
        try:
            answers = self._pipeline(requests)
        finally:
            for key in keys:
                self._forget(key)
        for key, (_, msg) in zip(keys, answers[1::2]):
            # a folder just made holds only the folders made in it: its listing
            # answers "absent" for anything else (until a write there forgets it)
            self._lst[key] = _sftp_info(SFTPAttributes._from_msg(msg))
            self._dirs[key] = [k.rpartition("/")[2] for k in keys if k.rpartition("/")[0] == key]
        return missing

    def _temp_beside(self, real: str, regular: bool) -> tuple[str, str]:
        """(folder, temp name) for an atomic replace of ``real``; both forgotten
        by the cache, which is about to be wrong about them."""
        folder, _, name = real.rpartition("/")
        folder = folder or "/"
        tmp = f"{folder.rstrip('/')}/.{name}{TMP_SUFFIX}"
        self._forget(real, regular)
        self._forget(tmp, regular)
        return folder, tmp

    def write_atomic(self, path: str, data: bytes, mode: int, uid: int | None = None,
                     gid: int | None = None, before_rename=None) -> None:
        """Replace ``path`` with ``data``: write_atomic_many for one file;
        ``before_rename(remote path of the temp file)``."""
        self.write_atomic_many([(path, data, mode, uid, gid)],
                               before_rename and (lambda _path, tmp: before_rename(tmp)))

    def write_atomic_many(self, files: list[tuple], before_rename=None, links: list[tuple] = ()) -> None:
        """Replace each (path, data, mode, uid, gid) of ``files``: a temp file in its
        folder (mode set before any data is written), fsync, ``before_rename(path,
        remote path of its temp file)`` (validation; raise to abort); and make each
        (path, target) of ``links`` a symlink: a temp link. Then every rename and
        the folders' fsyncs. No temp file outlives a failure. Three round trips for
        them all: the opens; modes, owners, data, fsyncs, closes and temp links;
        the renames and the folders' fsyncs."""
        from paramiko.sftp import CMD_EXTENDED, CMD_FSETSTAT, CMD_REMOVE, CMD_SYMLINK
        if not files and not links:
            return
        # every path resolved before the cache forgets anything
        reals = [self._resolve(path, True) for path, *_ in files] + [self._resolve(path, False) for path, _ in links]
        if len(set(reals)) < len(reals):  # two of them lead to one file (through a link): in order, one by one
            for n, item in enumerate(list(files) + list(links)):
                self.write_atomic_many([item] if n < len(files) else [], before_rename,
                                       [] if n < len(files) else [item])
            return
        places = [(path, real, *self._temp_beside(real, regular=n < len(files)))  # (path, real, folder, tmp)
                  for n, ((path, *_), real) in enumerate(zip(list(files) + list(links), reals))]
        folders = list(dict.fromkeys(folder for _, _, folder, _ in places))
        handles = self._open_new_many([(tmp, folder, None) for _, _, folder, tmp in places[:len(files)]], folders)
        closed = False
        try:
            requests, owners, may_be_absent = [], [], set()
            for (path, data, mode, uid, gid), handle in zip(files, handles):
                mine = [(CMD_FSETSTAT, handle, self._attrs(mode))]
                if uid is not None and gid is not None and self.user == "root":
                    mine.append((CMD_FSETSTAT, handle, self._attrs(uid=uid, gid=gid)))
                mine += self._writes(handle, data) + [("fsync", handle), self._close_request(handle)]
                requests += mine
                owners += [path] * len(mine)
            for (path, target), (_, _, _, tmp) in zip(links, places[len(files):]):
                may_be_absent.add(len(requests))  # a leftover temp link of a killed run, mostly none
                # OpenSSH takes (target, link): the reverse of the draft, as paramiko sends it
                requests += [(CMD_REMOVE, self._path(tmp)),
                             (CMD_SYMLINK, target.encode(errors="surrogateescape"), self._path(tmp))]
                owners += [path, path]
            closed = True  # the closes are in the pipeline whatever else fails
            self._pipeline_of(requests, owners, may_be_absent)
            if before_rename:
                for path, _, _, tmp in places[:len(files)]:
                    before_rename(path, tmp)
            self._pipeline_of([(CMD_EXTENDED, "posix-rename@openssh.com", self._path(tmp), self._path(real))
                               for _, real, _, tmp in places] + [r for f in folders for r in self._fsync_dir(f)],
                              [path for path, *_ in places] + folders)
        except BaseException:
            if not closed:
                for handle in handles:
                    self._close_quietly(handle)
            try:
                self._pipeline([(CMD_REMOVE, self._path(tmp)) for *_, tmp in places], check=False)
            except (OSError, EOFError, AttributeError):
                pass
            raise

    def _pipeline_of(self, requests: list[tuple], owners: list[str], may_be_absent=()) -> list:
        """_pipeline, its first error naming the path its request was for
        (``may_be_absent``: indices of requests for which "no such file" is fine)."""
        answers = self._pipeline(requests, check=False)
        for n, (answer, owner) in enumerate(zip(answers, owners)):
            if isinstance(answer, Exception) and not (n in may_be_absent and isinstance(answer, FileNotFoundError)):
                raise TargetError(f"{self}: {owner}: {answer}") from answer
        return answers

    def write_new(self, path: str, data: bytes, mode: int) -> None:
        self.write_new_many([(path, data, mode)])

    def write_new_many(self, files: list[tuple[str, bytes, int]]) -> None:
        """Write (path, data, mode) files that must not exist yet, durably (data and
        the folders' entries), without temp files: for files nothing refers to
        until this returns (the journal's copies of originals). Two round trips
        for them all."""
        from paramiko.sftp import CMD_FSETSTAT
        reals = [self._resolve(path, True) for path, _, _ in files]  # all before the cache forgets anything
        places = []
        for (_, _, mode), real in zip(files, reals):
            self._forget(real, regular=True)
            places.append((real, real.rpartition("/")[0] or "/", mode))
        if not places:
            return
        handles = self._open_new_many(places)
        requests, owners = [], []
        for (path, data, mode), handle in zip(files, handles):
            mine = ([(CMD_FSETSTAT, handle, self._attrs(mode))] + self._writes(handle, data)
                    + [("fsync", handle), self._close_request(handle)])
            requests += mine
            owners += [path] * len(mine)
        folders = list(dict.fromkeys(folder for _, folder, _ in places))
        self._pipeline_of(requests + [r for f in folders for r in self._fsync_dir(f)], owners + folders)

    def symlink(self, path: str, target: str) -> None:
        """Make ``path`` a link to ``target`` atomically (a temp link renamed over
        it). Two round trips: a leftover temp link removed, the link made and the
        folder opened; the rename and the folder's fsync."""
        from paramiko.sftp import CMD_EXTENDED, CMD_REMOVE, CMD_SYMLINK
        real = self._resolve(path, False)
        folder, tmp = self._temp_beside(real, regular=False)
        # OpenSSH takes (target, link): the reverse of the draft, as paramiko sends it
        answers = self._pipeline([(CMD_REMOVE, self._path(tmp)),
                                  (CMD_SYMLINK, target.encode(errors="surrogateescape"), self._path(tmp))]
                                 + self._dir_handle_requests(folder), check=False)
        if isinstance(answers[0], Exception) and not isinstance(answers[0], FileNotFoundError):
            raise answers[0]  # a leftover that cannot go: the new link was not made in its place
        for answer in answers[1:]:
            if isinstance(answer, Exception):
                raise answer
        self._keep_dir_handle(folder, answers[2:])
        self._pipeline([(CMD_EXTENDED, "posix-rename@openssh.com", self._path(tmp), self._path(real))]
                       + self._fsync_dir(folder))

    def remove(self, path: str) -> None:
        from paramiko.sftp import CMD_REMOVE
        real = self._resolve(path, False)
        self._forget(real)
        folder = real.rpartition("/")[0] or "/"
        if folder in self._dir_handles:  # one round trip
            try:
                self._pipeline([(CMD_REMOVE, self._path(real))] + self._fsync_dir(folder))
            except FileNotFoundError:
                pass
            return
        answers = self._pipeline([(CMD_REMOVE, self._path(real))] + self._dir_handle_requests(folder), check=False)
        if not isinstance(answers[1], Exception):
            self._keep_dir_handle(folder, answers[1:])
        if isinstance(answers[0], FileNotFoundError):
            return
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        self._pipeline(self._fsync_dir(folder))

    def rmdir(self, path: str) -> bool:
        real = self._resolve(path, False)
        self._forget(real)
        handle = self._dir_handles.pop(real, None)
        if handle is not None:
            self._close_quietly(handle)
        try:
            self.sftp.rmdir(real)
            return True
        except OSError:
            return False

    def make_sparse(self, path: str, size: int, mode: int) -> None:
        """Create (or grow, never shrink) a sparse file: only the size is set, no
        data written. Two round trips: open (creating it), its size and the
        folder; mode (when new), size, fsync, close and the folder's fsync."""
        from paramiko.sftp import CMD_FSETSTAT, CMD_STAT
        from paramiko.sftp_attr import SFTPAttributes
        new = self.stat(path) is None
        real = self._resolve(path, True)
        folder = real.rpartition("/")[0] or "/"
        self._forget(real, regular=True)
        extra = self._dir_handle_requests(folder)
        answers = self._pipeline([self._open_request(real, "rwc", mode), (CMD_STAT, self._path(real))] + extra,
                                 check=False)
        errors = [a for a in answers if isinstance(a, Exception)]
        if errors:
            if not isinstance(answers[0], Exception):
                self._close_quietly(self._handle(answers[0]))
            raise errors[0]
        self._keep_dir_handle(folder, answers[2:])
        handle = self._handle(answers[0])
        requests = [(CMD_FSETSTAT, handle, self._attrs(mode))] if new else []
        if SFTPAttributes._from_msg(answers[1][1]).st_size < size:
            requests.append((CMD_FSETSTAT, handle, self._attrs(size=size)))
        self._pipeline(requests + [("fsync", handle), self._close_request(handle)] + self._fsync_dir(folder))

    def truncate(self, path: str, size: int) -> None:
        """Set a file's size (undoing a grown disk image)."""
        real = self._resolve(path, True)
        self._forget(real, regular=True)
        try:
            self.sftp.truncate(real, size)
        except FileNotFoundError:
            pass

    def append_line(self, path: str, line: str) -> None:
        """Append one line (or several, newline-separated) and fsync them: the
        journal's durability rests on this. The file stays open for the next
        line: one round trip per call (two for the first, which creates it
        private: mode 0600 before the first line)."""
        from paramiko.sftp import CMD_FSETSTAT
        real = self._append_real.get(path) or self._resolve(path, True)
        self._forget(real, regular=True)
        state = self._appends.get(real)
        first = []
        if state is None:
            self._append_real[path] = real
            try:
                handle = self._handle(self._pipeline([self._open_request(real, "x", 0o600)])[0])
                first = [(CMD_FSETSTAT, handle, self._attrs(0o600))]
            except OSError:  # exists (SFTP v3 says only "Failure"); a real error shows below
                handle = self._handle(self._pipeline([self._open_request(real, "a")])[0])
            state = self._appends[real] = [handle, 0 if first else None]
        handle, offset = state
        if offset is None:  # appending: where the file ends now (writes go at an offset in SFTP v3)
            from paramiko.sftp import CMD_FSTAT
            from paramiko.sftp_attr import SFTPAttributes
            _, msg = self._pipeline([(CMD_FSTAT, handle)])[0]
            offset = SFTPAttributes._from_msg(msg).st_size
        data = (line.rstrip("\n") + "\n").encode()
        self._pipeline(first + self._writes(handle, data, offset) + [("fsync", handle)])
        state[1] = offset + len(data)

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
        ELF binary or a script with #!), as LocalTarget.find_program. Every
        candidate and the first bytes of the runnable ones come in one fetch (a
        round more per level of links). A program found stays found for the
        session: the commands that forget the cache (package installs) add
        programs, they do not take away the one a plan's next command runs."""
        if program in self._programs:
            return self._programs[program]
        candidates = _candidates(program)

        def runnable(c: str) -> bool:
            info = self.stat(c)
            return info is not None and info.kind == "file" and bool(info.mode & 0o111)
        if not self._offline:
            if not self._warmed:
                self._warm_up()
            self._rounds(lambda: [self._magic_of(c) for c in candidates])
        for c in candidates:
            if runnable(c):
                if self._offline:
                    return c  # speculating: no round trip for the magic bytes
                magic = self._magic_of(c)
                if magic == b"\x7fELF" or magic[:2] == b"#!":
                    self._programs[program] = c
                    return c
        return None

    def find_programs(self, programs: list[str]) -> None:
        """Look up the programs commands will need, all in one fetch (a round
        more per level of links), when this target runs commands in a root."""
        if self.is_host or self.files_only or self.user not in (None, "root") or self._cache_only:
            return
        look = lambda: [self._magic_of(c) for p in programs if p not in self._programs  # noqa: E731
                        for c in _candidates(p)]
        if self._spec is not None:  # inside a read-ahead: its rounds fetch these too
            look()
        else:
            self._rounds(look)

    def _magic_of(self, path: str) -> bytes:
        """The first four bytes of the file ``path`` leads to."""
        def fn():
            key, info = self._node(path, True)
            if info is None or info.kind != "file":
                return b""
            if key not in self._magic:
                if key in self._data:
                    self._magic[key] = self._data[key][:4]
                elif self._offline:
                    raise _Miss(key)
                else:
                    self._magic[key] = self._head(key, 4)
            return self._magic[key]
        return self._speculative(path, "m", b"", fn)

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
        folder, _, name = real.rpartition("/")
        listing = self._dirs.get(folder)
        self._forget(real)
        if listing is not None:  # the lock file is there now, nothing else changed in its folder
            self._dirs[folder] = sorted(set(listing) | {name})
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
        def release():
            if self._locked and self._chan is not None:
                self._locked = False
                self._request(f"x_unlock {shlex.quote(self._lock_path)}")
        self._close_appends(meanwhile=release)


def _candidates(program: str) -> list[str]:
    """Where a program may be, as the commands' PATH searches."""
    return [program] if program.startswith("/") else [f"{d}/{program}" for d in SEARCH_PATH]


def _cut(data: bytes, keys: list[str], lst: dict[str, str]) -> dict[str, bytes]:
    """The contents of ``keys`` from their concatenation ``data``, cut by the sizes
    in their stat fields; nothing when the sizes do not add up (a file changed
    or could not be read between the stat and the read: then each is read
    again on its own)."""
    try:
        sizes = [int(lst[key].split()[3]) for key in keys]
    except (KeyError, IndexError, ValueError):
        return {}
    if sum(sizes) != len(data):
        return {}
    out, at = {}, 0
    for key, size in zip(keys, sizes):
        out[key], at = data[at:at + size], at + size
    return out


def known_hosts_file() -> str:
    """Where host keys are checked and new ones saved: $XENRUN_KNOWN_HOSTS, else
    the user's ~/.ssh/known_hosts (the file OpenSSH uses)."""
    return os.environ.get("XENRUN_KNOWN_HOSTS") or os.path.expanduser("~/.ssh/known_hosts")


def _known_keys(path: str, name: str) -> list:
    """The keys the known_hosts file ``path`` has for ``name`` ("host", or
    "[host]:port"), plain or hashed, as paramiko matches them. Only that host's
    lines are parsed: paramiko's own load parses every line into a key and checks
    each against those before it, which with a fleet's hosts in the file cost
    every connection time quadratic in their number."""
    import paramiko
    from paramiko.hostkeys import HostKeyEntry, HostKeys
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    keys = []
    for number, line in enumerate(lines, 1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        if not any(h == name or (h.startswith("|1|") and HostKeys.hash_host(name, h) == h)
                   for h in fields[0].split(",")):
            continue
        try:
            entry = HostKeyEntry.from_line(line.strip(), number)
        except paramiko.SSHException:
            continue
        if entry is not None:
            keys.append(entry.key)
    return keys


def _fingerprint(key) -> str:
    return getattr(key, "fingerprint", None) or key.get_base64()[:24] + "..."


def _accept_new(path: str):
    """paramiko's policy for a host not in ``path``: trust its key and append it
    (one line, under a lock: the hosts of a fleet connect at once, in threads and
    processes, and each SSHClient would otherwise rewrite the whole file)."""
    import paramiko
    from paramiko.hostkeys import HostKeyEntry

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            folder = os.path.dirname(path)
            if folder:
                os.makedirs(folder, mode=0o700, exist_ok=True)
            with _KNOWN_HOSTS_LOCK, open(path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(HostKeyEntry([hostname], key).to_line())
            log.warning("new host: its key is trusted and saved", host=hostname,
                        key=f"{key.get_name()} {_fingerprint(key)}", file=path)
    return AcceptNew()


_KNOWN_HOSTS_LOCK = threading.Lock()
_AEAD_FIRST = None


def _aead_first_transport():
    """paramiko's Transport offering AES-GCM first: an AEAD cipher needs no HMAC,
    and paramiko checks each packet's HMAC in a Python loop (a quarter of the
    client's CPU with 30 hosts). Servers without GCM still get paramiko's usual
    CTR + HMAC (only the order of the offer changes)."""
    global _AEAD_FIRST
    if _AEAD_FIRST is None:
        import paramiko
        base = paramiko.Transport._preferred_ciphers
        gcm = tuple(c for c in base if "-gcm@" in c)
        _AEAD_FIRST = type("AEADFirstTransport", (paramiko.Transport,),
                           {"_preferred_ciphers": gcm + tuple(c for c in base if c not in gcm)})
    return _AEAD_FIRST


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__
