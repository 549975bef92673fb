"""Shared test helpers (imported as ``support.helpers``): where the repository and
its example site are, the xenrun command run as a real process, tree hashes and
file maps, busybox inside a machine root so commands really run there with
chroot, a lab host selecting the sample plugin, and a pseudo-terminal dialogue."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
SAMPLES = TESTS / "samples"
EXAMPLES = REPO / "examples"
HOSTS = ("arch-grub", "arch-uefi", "arch-syslinux", "debian-grub")
STATE = "var/lib/xenrun"


def tree_hash(root: Path, skip_state: bool = False) -> str:
    """A hash of every path under ``root``: names, kinds, modes, link targets and
    file contents. ``skip_state`` leaves out xenrun's own state folder."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        if skip_state and (rel_dir == STATE or rel_dir.startswith(STATE + "/")):
            dirnames[:] = []
            continue
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            rel = os.path.relpath(p, root)
            if skip_state and (rel == STATE or rel.startswith(STATE + "/")):
                continue
            st = p.lstat()
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def file_map(root: Path, skip_state: bool = True) -> dict[str, bytes | str]:
    """Every file's content (links as "-> target"), by path relative to root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            p = Path(dirpath, name)
            rel = os.path.relpath(p, root)
            if skip_state and rel.startswith(STATE):
                continue
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes()
    return out


def run_xenrun(*args, cwd=None, env=None, input=None, timeout=120) -> subprocess.CompletedProcess:
    """The xenrun command as a real process."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("XENRUN_CRASH_AT", None) if "XENRUN_CRASH_AT" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", "xenrun", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, input=input, timeout=timeout)


def add_busybox(root: Path, *applets: str) -> None:
    """Put the static busybox in a machine root, with links for ``applets``, so that
    chroot can run them there."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")


def lab_host(site: Path, settings: str, applets=("true", "false", "sleep")) -> Path:
    """A host "lab" (a copy of the arch-grub root, no boot or network plugin) that
    selects the third-party sample plugin with ``settings``; its root gets busybox
    so the sample's command really runs there with chroot."""
    root = site / "hosts" / "lab"
    shutil.copytree(site / "hosts" / "arch-grub", root, symlinks=True)
    (root / "etc/hostname").write_text("lab\n")
    text = (site / "plugins.toml").read_text()
    text += '\n[hosts.lab]\nroot = "hosts/lab"\nboot = "none"\nnetwork = "none"\nplugins = ["sample"]\n'
    text += f"\n[hosts.lab.plugin.sample]\n{settings}\n"
    (site / "plugins.toml").write_text(text)
    add_busybox(root, *applets)
    return root


def talk(argv, *answers: bytes, timeout=60) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal, answering its questions ("[y/N]") in
    turn with ``answers``; return (exit code, everything it showed)."""
    import pty
    import select
    import time
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(argv[0], argv)
    screen, asked, deadline = b"", 0, time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
            if asked < len(answers) and screen.count(b"[y/N]") > asked:
                os.write(fd, answers[asked])
                asked += 1
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")
