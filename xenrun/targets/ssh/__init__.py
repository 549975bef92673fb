"""SSHTarget: a remote host over SSH through Fabric, with LocalTarget's methods.

One connection per target carries one long-lived channel, and a second only where
the host lacks what the first needs for writes:

- one persistent POSIX ``sh`` reading requests on its stdin, for commands, bulk
  reads and file writes: a request is one quoted command line, its answer is
  framed with a random marker and base64, so anything root's rc files print is
  skipped. Writes (atomic writes: temp file, fsync, rename, fsync of the folder;
  symlinks, removal, sparse files, journal appends) are steps of a shell program
  with their data inline as framed base64, queued and sent ahead of the next
  request (shellfiles.py);
- an SFTP session (paramiko's SFTPClient), started only when a write cannot go
  through the shell (no ``base64 -d``, ``mv -T`` or ``sync FILE`` on the host,
  more than 8 MiB at once, or XENRUN_SFTP_WRITES=1), or a read misses the cache
  outside a fetch; its requests go in pipelines (sftp.py).

Why one shell and not one exec channel per command: sshd starts every exec and
every subsystem through the login shell, and on these machines root's ~/.bashrc
runs ``pyenv init`` (0.15-0.35 s) each time, non-interactive or not (Debian's bash
reads .bashrc when started by sshd). A persistent shell pays that once per
connection (and the SFTP server once more, only where writes need it); a request
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

import posixpath
from collections import Counter

from xenrun.errors import TargetError
from xenrun.targets.base import Target
from xenrun.targets.ssh.cache import Cache
from xenrun.targets.ssh.connection import CONNECT_TIMEOUT, TIMEOUT, Connection, known_hosts_file, parse_address
from xenrun.targets.ssh.shellfiles import ShellFiles
from xenrun.targets.ssh.shell import Shell

__all__ = ["SSHTarget", "known_hosts_file", "parse_address"]


class SSHTarget(Connection, Shell, Cache, ShellFiles, Target):
    """A host over SSH (``root``: a machine root folder on that host)."""

    remote = True

    def __init__(self, address: str, root: str | None = None, files_only: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT, connect_kwargs: dict | None = None,
                 timeout: float | None = None):
        """``timeout``: how long the host may stay silent before it is given up
        on (plugins.toml's ``timeout``; TIMEOUT when None); the handshake gets at
        most ``connect_timeout`` of it."""
        self.address = address
        self.user, self.hostname, self.port = parse_address(address)
        self.root = posixpath.normpath(root).rstrip("/") or None if root else None
        if self.root and not self.root.startswith("/"):
            raise TargetError(f"{address}: root must be an absolute path on the host: {root!r}")
        self._prefix = self.root or ""  # a host is resolved as a root at "/"
        self.files_only = files_only
        self.timeout = float(timeout or TIMEOUT)
        self.connect_timeout = min(connect_timeout, self.timeout)
        self._lost = ""  # why the host was given up on: every later operation raises HostLost with it
        self.connect_kwargs = connect_kwargs or {}
        # round trips: "command" (shell requests), "sftp_waits" (SFTP pipelines waited for), "sftp" (requests)
        self.stats: Counter = Counter(command=0, sftp_waits=0, sftp=0)
        self._conn = self._sftp = self._chan = None
        self._nonce = ""
        self._buf = b""
        self._heard, self._probe = 0.0, None  # last sign of life; keepalive in flight (sent, answered)
        self._locked = False
        self._owed = 0  # answers of requests sent without waiting (the unlock): read before the next one's
        self._appends: dict[str, object] = {}  # journal files kept open
        self._append_real: dict[str, str] = {}  # and where they lie
        self._dir_handles: dict[str, object] = {}  # folders kept open for fsync
        self._programs: dict[str, str] = {}  # find_program's answers that found one
        self._fsync_ext = True
        self._shell_writes = False  # the prologue found what shell writes need (shellfiles.py)
        self._shell_sparse = False  # and truncate, for sparse files
        self._queue: list[tuple] = []  # shell writes waiting for the next request: (owner, command, data)
        self._deferring = 0
        self._checked: dict[tuple, object] = {}  # check_files' results, for execute_on_file
        self._room_paths: list[str] | None = None  # free_space_ahead's, measured with the lock
        self._warmed = False
        self._spec: dict[str, set] | None = None  # wants collected while speculating
        self._cache_only = False  # answer from the cache or raise _Miss
        self._warm_up_reads = None  # what to read ahead before the first read (warm_up_with)
        self._invalidate()

    @property
    def live(self) -> bool:
        return self.root is None

    def __str__(self) -> str:
        who = f"{self.user}@{self.hostname}" if self.user else self.hostname
        who += f":{self.port}" if self.port else ""
        return f"ssh {who}" + (f" root {self.root}" if self.root else "")
