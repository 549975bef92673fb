"""The e2e machine under QEMU: TCG, user networking restricted to the machine itself,
SSH forwarded to 127.0.0.1 only, the serial console in a log file.

``VM(image, workdir)`` boots on a qcow2 overlay over the cached raw image (the
base stays clean) plus an empty second disk (for LVM guests). ``wait_ssh`` polls
until root can log in; ``reboot`` asks the machine to reboot and waits for a new
boot id; ``stop`` powers off and always kills QEMU. Use it as a context manager.

The guest reaches nothing outside: ``-netdev user,restrict=on`` gives it DHCP
(10.0.2.15, gateway 10.0.2.2), the forwarded SSH port and, with
``guest_forward=("10.0.2.100", 80, PORT)``, its connections to 10.0.2.100:80
relayed (tests/e2e/relay.py, one process per connection) to the test's
repository on 127.0.0.1:PORT (tests/e2e/aptrepo.py); nothing else.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

QEMU = "qemu-system-x86_64"
RELAY = Path(__file__).resolve().with_name("relay.py")
SSH_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what ssh says when it could not connect at all (the command was not run)
CONNECT_FAILURES = ("during banner exchange", "connect to host 127.0.0.1 port")


class VMError(RuntimeError):
    """The machine did not do what was asked in time (the console's tail says why)."""


class VM:
    def __init__(self, base: Path, key: Path, workdir: Path, memory_mb: int = 2048, cpus: int = 2,
                 extra_disk_gb: int = 4, progress: Callable[[str], None] = print,
                 guest_forward: tuple[str, int, int] | None = None):
        """``guest_forward``: (address, port) the guest connects to, and the port on
        this machine's 127.0.0.1 that QEMU relays those connections to."""
        self.base, self.key, self.workdir = Path(base), Path(key), Path(workdir)
        # "unsafe": QEMU ignores the guest's flushes (fast); "writeback" honours them,
        # as a real disk does, so that killing QEMU is a power cut and not a torn overlay
        self.cache = "unsafe"
        self.guest_forward = guest_forward
        self.memory_mb, self.cpus, self.extra_disk_gb = memory_mb, cpus, extra_disk_gb
        self.progress = progress
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.console = self.workdir / "console.log"
        # ssh's control socket: a Unix socket path has at most 107 bytes (ssh adds a
        # temporary suffix of 17), too few under a deep work folder
        self.control_path = f"{tempfile.mkdtemp(prefix='xenrun-e2e-')}/%C"
        self.boots = 0

    @property
    def address(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    # -- life cycle -------------------------------------------------------------------
    def start(self, keep_disks: bool = False) -> None:
        """Start QEMU on a new overlay of the base image (``keep_disks``: on the
        disks as the last power-off or power cut left them)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.makedirs(os.path.dirname(self.control_path), exist_ok=True)  # kill() removed it
        overlay = self.workdir / "disk.qcow2"
        if not keep_disks:
            overlay.unlink(missing_ok=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.base), "-F", "raw",
                            str(overlay)], check=True, capture_output=True)
        argv = [QEMU, "-machine", "pc", "-accel", "tcg", "-cpu", "qemu64", "-smp", str(self.cpus),
                "-m", str(self.memory_mb), "-display", "none", "-monitor", "none", "-vga", "none",
                "-drive", f"file={overlay},format=qcow2,if=virtio,cache={self.cache}",
                "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port or free_port()}-:22"
                           + self._guestfwd(),
                "-device", "virtio-net-pci,netdev=n0",
                # entropy from the machine: without it the guest's CRNG takes minutes to
                # start under TCG, and sshd waits for it
                "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
                "-serial", f"file:{self.console}"]
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)-", " ".join(argv)).group(1))
        if self.extra_disk_gb:
            extra = self.workdir / "lvm.qcow2"
            if not keep_disks:
                extra.unlink(missing_ok=True)
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), f"{self.extra_disk_gb}G"],
                               check=True, capture_output=True)
            argv += ["-drive", f"file={extra},format=qcow2,if=virtio,cache={self.cache}"]
        (self.workdir / "qemu.argv").write_text(shlex.join(argv) + "\n")
        self.console.write_bytes(b"")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.workdir / "qemu.out", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        forward = ""
        if self.guest_forward:
            address, guest_port, host_port = self.guest_forward
            forward = f", {address}:{guest_port} relayed to 127.0.0.1:{host_port}"
        self.progress(f"vm: QEMU pid {self.process.pid}, SSH on 127.0.0.1:{self.port}{forward}, console {self.console}")

    def _guestfwd(self) -> str:
        """QEMU's guestfwd option: libslirp runs the command (split like a shell
        line) for each connection, its stdin and stdout the connection."""
        if self.guest_forward is None:
            return ""
        address, guest_port, host_port = self.guest_forward
        command = shlex.join([sys.executable, str(RELAY), str(int(host_port))])
        if "," in command or "," in address:  # QEMU's option syntax: a comma ends the value
            raise ValueError(f"a comma in the relay's command line: {command!r}")
        return f",guestfwd=tcp:{address}:{int(guest_port)}-cmd:{command}"

    def kill(self) -> None:
        p = self.process
        subprocess.run(["ssh", "-o", f"ControlPath={self.control_path}", "-p", str(self.port), "-O", "exit",
                        "root@127.0.0.1"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        shutil.rmtree(os.path.dirname(self.control_path), ignore_errors=True)
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)

    def power_cut(self) -> None:
        """Pull the plug: QEMU killed at once, the guest's page cache lost with it."""
        self.kill()

    def power_on(self, cache: str | None = None, timeout: float = 900) -> float:
        """Start again on the same disks and wait for SSH; returns the seconds."""
        started = time.monotonic()
        self.cache = cache or self.cache
        self.start(keep_disks=True)
        self.wait_ssh(timeout=timeout)
        return time.monotonic() - started

    def stop(self, timeout: float = 90) -> None:
        """Power off through SSH, then make sure QEMU is gone."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        try:
            self.ssh("systemctl poweroff", timeout=15, check=False)
            p.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            pass
        finally:
            self.kill()

    def __enter__(self) -> "VM":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- SSH --------------------------------------------------------------------------
    def ssh_argv(self, command: str) -> list[str]:
        # one master connection carries every command: a key exchange costs
        # seconds on an emulated CPU; a reboot ends it and the next command
        # makes a new one
        mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}", "-o", "ControlPersist=60"]
        return ["ssh", *SSH_OPTIONS, *mux, "-i", str(self.key), "-p", str(self.port), "root@127.0.0.1", command]

    def ssh(self, command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        for attempt in range(3):
            proc = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
            # ssh never got to run the command (a busy emulated machine answers its banner late):
            # safe to ask again; anything else is the command's own answer
            if proc.returncode != 255 or not any(s in proc.stderr for s in CONNECT_FAILURES) or attempt == 2:
                break
            self.progress(f"vm: ssh did not connect ({proc.stderr.strip()[-120:]}); trying again")
            time.sleep(5)
        if check and proc.returncode != 0:
            raise VMError(f"ssh {command!r}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
        return proc

    def put(self, local: Path, remote: str, mode: str = "644", timeout: float = 300) -> None:
        """Copy a file of this machine to ``remote`` on the VM (through ssh's stdin)."""
        command = f"mkdir -p {shlex.quote(remote.rpartition('/')[0] or '/')} && cat > {shlex.quote(remote)}.part" \
                  f" && chmod {mode} {shlex.quote(remote)}.part && mv {shlex.quote(remote)}.part {shlex.quote(remote)}"
        with open(local, "rb") as f:
            proc = subprocess.run(self.ssh_argv(command), stdin=f, capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise VMError(f"copying {local} to {remote}: exit {proc.returncode}: {proc.stderr.decode()[-2000:]}")

    def out(self, command: str, timeout: float = 120) -> str:
        return self.ssh(command, timeout=timeout).stdout.strip()

    def _alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise VMError(f"QEMU exited ({None if self.process is None else self.process.returncode}):"
                          f" {self.console_tail()}")

    def wait_ssh(self, timeout: float = 900, not_boot_id: str | None = None) -> tuple[str, float]:
        """Wait until root logs in (and, after a reboot, the boot id changed).
        Returns (boot id, seconds waited)."""
        started = time.monotonic()
        deadline = started + timeout
        next_note = started + 60
        why = "no SSH banner yet"
        while True:
            self._alive()
            if self._banner():
                try:
                    proc = self.ssh("cat /proc/sys/kernel/random/boot_id", timeout=30, check=False)
                    why = f"ssh: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"
                except subprocess.TimeoutExpired:
                    proc, why = None, "ssh: no answer within 30 s"
                if proc is not None and proc.returncode == 0:
                    boot_id = proc.stdout.strip()
                    if boot_id and boot_id != not_boot_id:
                        self.boots += 1
                        return boot_id, time.monotonic() - started
            now = time.monotonic()
            if now > deadline:
                raise VMError(f"no SSH login within {timeout:.0f} s ({why}); console:\n{self.console_tail()}")
            if now > next_note:
                self.progress(f"vm: still waiting for SSH ({now - started:.0f} s; {why}); console: {self.last_line()}")
                next_note = now + 60
            time.sleep(2)

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=3) as s:
                s.settimeout(5)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def reboot(self, timeout: float = 900) -> float:
        """Reboot through SSH and wait for the new boot's SSH; returns the seconds."""
        old = self.out("cat /proc/sys/kernel/random/boot_id")
        started = time.monotonic()
        try:
            self.ssh("systemctl reboot", timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pass
        _, _ = self.wait_ssh(timeout=timeout, not_boot_id=old)
        return time.monotonic() - started

    # -- the console ------------------------------------------------------------------
    def console_text(self) -> str:
        try:
            return self.console.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.console_text())
        return "\n".join(text.splitlines()[-lines:])

    def last_line(self) -> str:
        tail = [line for line in self.console_tail(5).splitlines() if line.strip()]
        return tail[-1][:160] if tail else "(nothing yet)"
