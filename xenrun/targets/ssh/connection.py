"""The SSH connection of an SSHTarget: Fabric/paramiko, host keys checked as
OpenSSH's StrictHostKeyChecking=accept-new, the persistent shell started, and the
SFTP session on first use."""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import secrets
import shlex
import socket
import threading
import time

import structlog

from xenrun.errors import HostLost, TargetError
from xenrun.targets.ssh.framing import find_line
from xenrun.targets.ssh.shell import _why, prologue

log = structlog.get_logger()

CONNECT_TIMEOUT = 10  # the handshake, at most (and at most the host's timeout)
TIMEOUT = 60.0  # a host silent this long is given up on (plugins.toml's timeout, per host)


_config_lock = threading.Lock()
_config = None


def _fabric_config():
    """One Fabric Config (its files and ~/.ssh/config read once) for every
    connection of the process: a Connection made without one builds two, Fabric's
    and invoke's, each reading those files again (a fleet's hosts paid it each).
    Connections only read it."""
    global _config
    with _config_lock:
        if _config is None:
            import fabric
            _config = fabric.Config()
        return _config


def parse_address(address: str) -> tuple[str | None, str, int | None]:
    """"user@host:port" -> (user, host, port); user and port optional."""
    user, _, hostport = address.rpartition("@")
    host, port = hostport, None
    if hostport.startswith("["):  # [IPv6]:port (plugins.toml's check allows no other bracket)
        host, _, rest = hostport[1:].partition("]")
        return user or None, host, int(rest[1:]) if rest.startswith(":") else None
    if hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    return user or None, host, port


class Connection:
    """The connection part of SSHTarget (a mixin: the state is SSHTarget's).

    Every wait on the host is bounded by ``self.timeout`` (plugins.toml's
    ``timeout``): the handshake, the login shell starting the shell or the SFTP
    server, every answer (a command's heartbeats count), every SFTP request. A
    host that stays silent that long is given up on (HostLost): the session is
    closed, nothing more is sent, and the next run recovers, as after SIGKILL."""

    def _connect(self) -> None:
        if self._conn is not None:
            return
        if self._lost:
            raise HostLost(self._lost)
        import fabric  # ~0.25 s of imports, paid only by SSH runs
        import paramiko
        _quiet_paramiko()

        wait = self.connect_timeout
        kwargs = {"banner_timeout": wait, "auth_timeout": wait, "channel_timeout": wait,
                  "transport_factory": _aead_first_transport(), **self.connect_kwargs}
        conn = fabric.Connection(self.hostname, user=self.user, port=self.port, config=_fabric_config(),
                                 connect_timeout=max(1, int(wait)), connect_kwargs=kwargs)
        known = known_hosts_file()
        name = f"[{self.hostname}]:{self.port}" if self.port not in (None, 22) else self.hostname  # as in the file
        started = time.monotonic()
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
            transport.set_keepalive(max(1, int(min(15, self.timeout / 2))))  # NAT and firewalls; dead peers: probes
            self._conn = conn
            self.stats["connect"] += 1
            # The shell starts through the login shell (and its rc files); the SFTP
            # server too, so it starts only when a write needs it (self.sftp): a
            # run with nothing to change starts one program on the host, not two.
            self._nonce = "xenrun-" + secrets.token_hex(8)
            self._heard, self._probe, self._buf = time.monotonic(), None, b""
            self._chan = self._login_shell(transport)
            # N: the answers' marker; B: seconds between a running command's heartbeats
            self._chan.sendall(f"N={self._nonce}\nB={max(1, int(self.timeout / 4))}\n{prologue()}".encode())
            self._read_answer()
            if self.root:  # the root itself may be a link: its real path (after READY: markers come in order)
                answer, _ = self._request(
                    f"if d=$(cd -P {shlex.quote(self.root)} 2>/dev/null && pwd -P); then printf '%s' \"$d\" | base64;"
                    " fi; printf '%s END 0\\n' \"$N\"", count=False)
                real = base64.b64decode(answer.replace(b"\n", b"")).decode(errors="surrogateescape")
                if not real.startswith("/"):
                    raise TargetError(f"{self}: {self.root}: no such folder on the host")
                self.root = self._prefix = real
        except TargetError:
            self._drop(conn)
            raise
        except paramiko.BadHostKeyException as e:
            self._drop(conn)
            raise TargetError(f"{self}: its host key is not the one {known} has for {name} (got"
                              f" {e.key.get_name()} {_fingerprint(e.key)}, expected {_fingerprint(e.expected_key)});"
                              " not connecting. If the host was reinstalled, remove the old key:"
                              f" ssh-keygen -R '{name}' -f {known}") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._drop(conn)
            raise TargetError(f"cannot reach {self}: {_handshake_why(e, time.monotonic() - started, wait)}") from None
        self.user = conn.user

    def _drop(self, conn) -> None:
        """Close ``conn`` without another word to the host (a failed connect, a lost host)."""
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing what is broken
            pass
        self._conn = self._sftp = self._chan = None
        self._owed = 0
        self._appends.clear()
        self._append_real.clear()
        self._dir_handles.clear()
        self._locked = False

    def _lose(self, why: str) -> HostLost:
        """The host stopped answering: close the session at once (no request more:
        each would wait too) and refuse everything after; returns the error to raise."""
        if not self._lost:
            self._lost = (f"cannot reach {self}: {why}; gave up and closed the session"
                          " (the next run recovers what this one left)")
            if self._conn is not None:
                self._drop(self._conn)
        return HostLost(self._lost)

    def _login_shell(self, transport):
        """A channel running ``exec /bin/sh`` through the login shell, read up to the
        line the command prints once the rc files are done (what they printed
        before it is skipped). An rc file waiting for input is given empty lines,
        which the shell then reads as empty commands. The rc files see nothing
        xenrun sends after that."""
        chan = transport.open_session(timeout=self.connect_timeout)
        chan.exec_command(f"printf '%s\\n' {self._nonce}-START; exec /bin/sh")
        self._wait_for_line(chan, f"{self._nonce}-START", nudge=True, what="start the shell")
        return chan

    def _wait_for_line(self, chan, line: str, nudge: bool, what: str, other: str | None = None) -> str:
        """Read ``chan`` up to a line that is ``line`` (or starts with ``other``);
        returns that line. At most self.timeout seconds; ``nudge``: send an empty
        line each half second meanwhile (for an rc file that reads stdin)."""
        deadline = time.monotonic() + self.timeout
        buf, next_nudge = b"", time.monotonic() + 0.5
        markers = [line.encode()] + ([other.encode()] if other else [])
        while True:
            for marker in markers:
                found = find_line(buf, marker)
                if found is not None:
                    return found
            nl = buf.rfind(b"\n")
            if nl > 0:
                buf = buf[nl:]  # rc-file noise: only the last line may still become the marker
            while chan.recv_stderr_ready():
                chan.recv_stderr(65536)
            now = time.monotonic()
            if now > deadline:
                raise self._lose(f"the login shell did not {what} within {self.timeout:.0f} s"
                                 " (an rc file of root's shell waiting for input?)")
            chan.settimeout(0.25)
            try:
                data = chan.recv(1 << 16)
            except socket.timeout:
                data = None
            except (OSError, EOFError) as e:
                raise self._lose(f"the connection dropped ({_why(e)})") from None
            if data == b"":
                raise TargetError(f"{self}: the login shell ended before it could {what}"
                                  f" (exit status {chan.recv_exit_status()})")
            if data:
                buf += data
            if nudge and time.monotonic() >= next_nudge:
                chan.sendall(b"\n")
                next_nudge = time.monotonic() + 0.5

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
        if self._conn is not None:
            self._close_appends()
            self._drop(self._conn)
        self._locked = False

    @property
    def sftp(self):
        """The SFTP session, started on first use: sftp-server run by a shell of
        xenrun's (started as the persistent one is), so that nothing the rc files
        print gets into the SFTP stream; the "sftp" subsystem only where no
        sftp-server program is found (internal-sftp)."""
        self._connect()
        if self._queue:  # the shell's writes waiting go first
            self.flush()
        if self._sftp is None:
            import paramiko
            transport = self._conn.client.get_transport()
            try:
                chan = self._login_shell(transport)
                chan.sendall(SFTP_START.replace("$N", self._nonce).encode())
                found = self._wait_for_line(chan, f"{self._nonce} SFTP", nudge=False, what="start sftp-server",
                                            other=f"{self._nonce} NOSFTP")
                if found.endswith("NOSFTP"):
                    chan.close()
                    chan = transport.open_session(timeout=self.connect_timeout)
                    chan.invoke_subsystem("sftp")
                chan.settimeout(self.timeout)
                self._sftp = paramiko.SFTPClient(_Guarded(chan, self))
            except (OSError, EOFError, paramiko.SSHException) as e:
                raise TargetError(f"{self}: cannot start SFTP: {_why(e)}") from None
            self._count_sftp(self._sftp)
        return self._sftp


# sftp-server where sshd_config's Subsystem line says, else where distributions
# put it; "$N SFTP" just before it starts, so its stream begins clean
SFTP_START = (
    "s=$(sed -n 's/^[[:space:]]*[Ss]ubsystem[[:space:]][[:space:]]*sftp[[:space:]][[:space:]]*\\([^[:space:]]*\\).*/\\1/p'"
    " /etc/ssh/sshd_config 2>/dev/null | head -n 1)\n"
    "for p in \"$s\" /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/lib/ssh/sftp-server"
    " /usr/libexec/sftp-server /usr/lib/sftp-server; do"
    " case $p in /*) if [ -x \"$p\" ] && [ -f \"$p\" ]; then printf '%s SFTP\\n' $N; exec \"$p\"; fi;; esac; done;"
    " printf '%s NOSFTP\\n' $N; exit 0\n")


class _Guarded:
    """The SFTP channel as paramiko's SFTPClient sees it: a wait that times out, a
    dropped connection or a stream that ends mid-request loses the host (HostLost:
    the session closed) instead of an OSError a caller could take for a file's."""

    def __init__(self, chan, target):
        self._chan, self._target = chan, target

    def recv(self, n: int) -> bytes:
        try:
            data = self._chan.recv(n)
        except (OSError, EOFError) as e:
            raise self._target._lose(self._why(e, "no SFTP answer")) from None
        if not data:
            raise self._target._lose("the connection dropped (the SFTP session ended)")
        return data

    def send(self, data: bytes) -> int:
        try:
            return self._chan.send(data)
        except (OSError, EOFError) as e:
            raise self._target._lose(self._why(e, "the SFTP server took no request")) from None

    def _why(self, e: BaseException, what: str) -> str:
        if isinstance(e, socket.timeout):
            return f"the host stopped answering ({what} within {self._target.timeout:.0f} s)"
        return f"the connection dropped ({_why(e)})"

    def __getattr__(self, name: str):
        return getattr(self._chan, name)


def _quiet_paramiko() -> None:
    """paramiko's transport thread logs a failed handshake with its traceback;
    xenrun reports it in one line instead."""
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False


def _handshake_why(e: BaseException, took: float, wait: float) -> str:
    text = _why(e)
    if "protocol banner" in text or "No existing session" in text or isinstance(e, EOFError):
        if took < wait * 0.9:
            return "the connection was closed before the SSH handshake (is this an SSH server?)"
        return f"no SSH greeting within {wait:.0f} s (is this an SSH server?)"
    return text


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
