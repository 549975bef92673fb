"""A real OpenSSH server on 127.0.0.1 for the SSH tests (a helper, not a test file).

``start_sshd(folder)`` generates a host key and an ed25519 client key with
ssh-keygen, writes a config that lets only that key in (as root: the remote "host"
is this machine), starts ``/usr/sbin/sshd -D -e -f CONFIG`` on a free port and
waits until it answers. Stop it with ``server.stop()`` (or use it as a context
manager). Nothing here listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


@dataclass
class SSHServer:
    port: int
    key: Path  # the client's private key
    folder: Path
    process: subprocess.Popen
    user: str = "root"

    @property
    def address(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return (self.folder / "sshd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "SSHServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> str | None:
    """Why an sshd cannot be started here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (apt-get install openssh-server)"
    if os.geteuid() != 0:
        return "sshd must start as root to log in as root"
    return None


def start_sshd(folder: Path, sftp: str = "/usr/lib/openssh/sftp-server", timeout: float = 10,
               bashrc: str | None = None, read_only_tmp: Path | None = None) -> SSHServer:
    """Start sshd with its keys and config under ``folder``. ``sftp`` is the SFTP
    subsystem: the external server (run through root's login shell, as on most
    hosts) or "internal-sftp".

    A host that misbehaves, without touching this machine: sshd then runs in a
    mount namespace of its own (unshare -m), where ``bashrc`` (the text of an rc
    file) is bound over root's ~/.bashrc, and ``read_only_tmp`` is a read-only
    tmpfs that sessions get as TMPDIR."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    for key in (host_key, client_key):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "xenrun-test", "-f", str(key)],
                           check=True, capture_output=True)
    authorized = folder / "authorized_keys"
    authorized.write_text((folder / "client_ed25519.pub").read_text())
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation folder
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
PidFile {folder / 'sshd.pid'}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
MaxSessions 50
MaxStartups 200
Subsystem sftp {sftp}
""" + (f"SetEnv TMPDIR={read_only_tmp}\n" if read_only_tmp else ""))
    command = [SSHD, "-D", "-e", "-f", str(config)]
    if bashrc is not None or read_only_tmp is not None:
        mounts = []
        if bashrc is not None:
            (folder / "bashrc").write_text(bashrc)
            mounts.append(f"mount --bind {folder / 'bashrc'} {Path.home() / '.bashrc'}")
        if read_only_tmp is not None:
            Path(read_only_tmp).mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount -t tmpfs -o ro,size=64k xenrun-test-ro {read_only_tmp}")
        command = ["unshare", "-m", "--propagation", "private", "sh", "-ec",
                   " && ".join(mounts) + ' && exec "$@"', "sshd", *command]
    log = open(folder / "sshd.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=log,
                               stdin=subprocess.DEVNULL)
    log.close()
    server = SSHServer(port, client_key, folder, process)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {server.log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"sshd did not answer on port {port}: {server.log}")
        time.sleep(0.05)
