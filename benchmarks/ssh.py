"""Facts + plan + apply of an example host over SSH to loopback (a real sshd on
127.0.0.1, root logging in to this machine, the example root as the SSH target's
prefix): first run and re-run, seconds and round trips.

Root's ~/.bashrc on these machines runs `pyenv init`, and Debian's bash reads it
for every command sshd starts (exec or subsystem), interactive or not. The first
lines below measure that cost; xenrun pays it twice per connection, in parallel
(once for its persistent shell, once for the SFTP server) and never per command.

    .venv/bin/python benchmarks/ssh.py [HOST]
"""

from __future__ import annotations

import shutil
import subprocess
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.sshd import start_sshd  # noqa: E402


def exec_cost(server, command: str, n: int = 5) -> float:
    """Mean seconds of one exec channel running ``command`` on an open connection."""
    import fabric
    conn = fabric.Connection("127.0.0.1", user="root", port=server.port, connect_kwargs={
        "key_filename": str(server.key), "look_for_keys": False, "allow_agent": False})
    conn.open()
    transport = conn.client.get_transport()
    started = time.perf_counter()
    for _ in range(n):
        chan = transport.open_session()
        chan.exec_command(command)
        while chan.recv(65536):
            pass
        chan.recv_exit_status()
        chan.close()
    conn.close()
    return (time.perf_counter() - started) / n


def main() -> None:
    host = sys.argv[1] if len(sys.argv) > 1 else "arch-grub"
    work = Path(tempfile.mkdtemp(prefix="xenrun-bench-ssh-"))
    os.environ["XENRUN_KNOWN_HOSTS"] = str(work / "known_hosts")  # this run's server, not root's file
    server = start_sshd(work / "sshd")
    try:
        from xenrun import run
        from xenrun.targets import ssh
        print(f"one exec channel through root's login shell (.bashrc):  {exec_cost(server, 'true') * 1000:6.0f} ms")
        target = ssh.SSHTarget(server.address, connect_kwargs={
            "key_filename": str(server.key), "look_for_keys": False, "allow_agent": False})
        started = time.perf_counter()
        target.execute(["true"])
        connect = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(20):
            target.execute(["true"])
        per_request = (time.perf_counter() - started) / 20
        started = time.perf_counter()
        for _ in range(50):
            target.sftp.lstat("/etc/hostname")
        per_stat = (time.perf_counter() - started) / 50
        target.close()
        print(f"connect + persistent shell + SFTP session (rc files paid in parallel): {connect * 1000:6.0f} ms")
        print(f"a command through the persistent shell:                   {per_request * 1000:6.1f} ms")
        print(f"an SFTP lstat:                                            {per_stat * 1000:6.2f} ms")

        site = work / "site"
        shutil.copytree(REPO / "examples", site, symlinks=True)
        text = (site / "plugins.toml").read_text()
        text = text.replace(f'root = "hosts/{host}"', f'address = "{server.address}"', 1)
        (site / "plugins.toml").write_text(text)
        root = str(site / "hosts" / host)
        made = []

        class Rooted(ssh.SSHTarget):
            def __init__(self, address, **kw):  # this benchmark's root and key over what plugins.toml says
                kw.update(root=root, connect_kwargs={
                    "key_filename": str(server.key), "look_for_keys": False, "allow_agent": False})
                super().__init__(address, **kw)
                made.append(self)
        ssh.SSHTarget = Rooted
        from xenrun import logs
        logs.configure()
        for label in ("first run", "re-run"):
            options = run.Options(config=str(site / "plugins.toml"), host=host, yes=True, files_only=True)
            started = time.perf_counter()
            result = run.setup(options, lambda r: True)
            seconds = time.perf_counter() - started
            made[-1].close()
            counts = dict(made[-1].stats)
            print(f"{host} {label}: {seconds:.3f} s, {result.status}, {result.summary()['changed']} changed;"
                  f" round trips: {counts.get('command', 0)} shell requests, {counts.get('sftp_waits', 0)} SFTP waits"
                  f" ({counts.get('sftp', 0)} requests), {counts.get('connect', 0)} connection")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import xenrun.targets.ssh, fabric"], capture_output=True)
        print(f"(python startup + import of xenrun.targets.ssh and fabric: {time.perf_counter() - started:.3f} s)")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
