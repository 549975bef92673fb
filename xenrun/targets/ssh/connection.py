"""The SSH connection of an SSHTarget: Fabric/paramiko, host keys checked as
OpenSSH's StrictHostKeyChecking=accept-new, the persistent shell started, and the
SFTP session on first use."""

from __future__ import annotations

import base64
import fcntl
import os
import secrets
import shlex
import threading
import time

import structlog

from xenrun.errors import TargetError
from xenrun.targets.ssh.shell import _why, prologue

log = structlog.get_logger()

CONNECT_TIMEOUT = 10
SFTP_TIMEOUT = 120.0  # one SFTP request: an answer or the host is gone


def parse_address(address: str) -> tuple[str | None, str, int | None]:
    """"user@host:port" -> (user, host, port); user and port optional."""
    user, _, hostport = address.rpartition("@")
    host, port = hostport, None
    if hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p)
    return user or None, host, port


class Connection:
    """The connection part of SSHTarget (a mixin: the state is SSHTarget's)."""

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
                         prologue().encode())
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
