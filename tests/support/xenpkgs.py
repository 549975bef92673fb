"""Test support: real Xen and dom0 kernel from Debian 12 packages, and a tiny dom0 initramfs.

Not a test module.  ``fetch()`` downloads the packages with ``apt-get download``
(no root install, nothing lands in the host's /boot) and unpacks them with
``dpkg -x`` into a cache directory; later calls reuse what is already unpacked.
``make_busybox_initramfs()`` builds a gzip'd newc cpio whose /init reports the
hypervisor type on the console and powers the machine off.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# XENRUN_CACHE (set by .ci/run to a folder outside the clone) keeps downloads
# between CI runs on the same machine; <repo>/.cache (git-ignored) otherwise.
DEFAULT_CACHE_DIR = Path(os.environ.get("XENRUN_CACHE") or REPO_ROOT / ".cache") / "debs"

XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
XEN_VERSION = "4.17"
# The metapackage tracks the current ABI; the -cloud flavour has no
# CONFIG_XEN_DOM0, so only the plain amd64 flavour is usable as dom0.
KERNEL_METAPACKAGE = "linux-image-amd64"
_KERNEL_RE = re.compile(r"\blinux-image-(6\.1\.0-\d+-amd64)(-unsigned)?\b")

BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
MARKER_PREFIX = "XENRUN-HYPERVISOR-TYPE="


class FetchError(RuntimeError):
    """A package could not be found, downloaded or unpacked."""


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(
            f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def current_kernel_abi() -> str:
    """ABI of the kernel that linux-image-amd64 depends on, e.g. ``6.1.0-56-amd64``."""
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    for line in out.splitlines():
        if "Depends:" in line:
            m = _KERNEL_RE.search(line)
            if m:
                return m.group(1)
    raise FetchError(f"no linux-image-6.1.0-*-amd64 dependency in `apt-cache depends {KERNEL_METAPACKAGE}`:\n{out}")


@contextlib.contextmanager
def cache_lock(cache_dir: Path):
    """Hold ``<cache_dir>/.lock``: two pytest processes may run at once, and
    two builders of one ``*.partial`` folder would tear it. Check what is cached
    again inside the lock (the other process may have built it meanwhile)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _apt_download(package: str, cache_dir: Path) -> Path:
    argv = ["apt-get", "download"]
    if os.geteuid() == 0:
        # As root apt drops to _apt, which usually cannot write to the cache
        # dir; downloading as root avoids the noisy sandbox warning.
        argv += ["-o", "APT::Sandbox::User=root"]
    _run(argv + [package], cwd=cache_dir)
    debs = sorted(cache_dir.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise FetchError(f"apt-get download {package} left no .deb in {cache_dir}")
    return debs[-1]


def _paths(root: Path, abi: str) -> dict:
    return {
        "root": root,
        "kernel_abi": abi,
        "xen_gz": root / "boot" / f"xen-{XEN_VERSION}-amd64.gz",
        "xen_efi": root / "boot" / f"xen-{XEN_VERSION}-amd64.efi",
        "vmlinuz": root / "boot" / f"vmlinuz-{abi}",
        "modules_dir": root / "lib" / "modules" / abi,
    }


def _complete(p: dict) -> bool:
    return all(p[k].is_file() for k in ("xen_gz", "xen_efi", "vmlinuz")) and p["modules_dir"].is_dir()


def _cached_abi(root: Path) -> str | None:
    # Newest already-unpacked kernel wins, so a cache keeps working offline
    # even after the archive moved on to a newer ABI.
    abis = [p.name[len("vmlinuz-"):] for p in (root / "boot").glob("vmlinuz-6.1.0-*-amd64")]
    abis.sort(key=lambda a: int(a.split("-")[1]))
    return abis[-1] if abis else None


def fetch(cache_dir: Path = DEFAULT_CACHE_DIR) -> dict:
    """Make Xen 4.17 and a dom0 kernel available under ``cache_dir``.

    Returns a dict with Paths ``xen_gz`` (multiboot, gzipped), ``xen_efi``,
    ``vmlinuz``, ``modules_dir`` (``lib/modules/<abi>``), ``root`` (the
    unpack root) and the string ``kernel_abi``.  Downloads only when nothing
    usable is unpacked there yet.
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / "root"
    with cache_lock(cache_dir):
        abi = _cached_abi(root) if root.is_dir() else None
        if abi and _complete(_paths(root, abi)):
            return _paths(root, abi)
        return _unpack(cache_dir, root)


def _unpack(cache_dir: Path, root: Path) -> dict:
    abi = current_kernel_abi()
    debs = [_apt_download(XEN_PACKAGE, cache_dir)]
    try:
        debs.append(_apt_download(f"linux-image-{abi}", cache_dir))
    except FetchError:
        # Same vmlinuz and modules, just without the Secure Boot signature.
        debs.append(_apt_download(f"linux-image-{abi}-unsigned", cache_dir))

    # Unpack into a scratch dir first so an interrupted run never looks complete.
    tmp = cache_dir / "root.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(tmp)])
    paths = _paths(tmp, abi)
    if not _complete(paths):
        raise FetchError(f"unpacked packages lack expected files: {paths}")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return _paths(root, abi)


# --- initramfs -------------------------------------------------------------

def _is_static_elf(path: Path) -> bool:
    """True if the ELF at ``path`` has no PT_INTERP (i.e. needs no ld.so)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    little = data[5] == 1
    order = "little" if little else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off:off + 4], order) == 3:  # PT_INTERP
            return False
    return True


def find_static_busybox() -> Path:
    for p in BUSYBOX_PATHS:
        if p.is_file() and _is_static_elf(p):
            return p
    raise FileNotFoundError(
        "no statically linked busybox found (install the Debian package busybox-static)"
    )


INIT_TEMPLATE = """#!/bin/busybox sh
# xenrun test dom0 init: report the hypervisor type on the console, power off.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
# console=hvc0 makes /dev/console the Xen console; reopen it in case the
# kernel could not hand us one.
exec </dev/console >/dev/console 2>&1
{extra}
echo "{marker}$(cat /sys/hypervisor/type 2>/dev/null)"
poweroff -f
"""


class _Cpio:
    """Minimal writer for the newc ("070701") format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    @staticmethod
    def _pad(n: int) -> bytes:
        return b"\0" * ((4 - n % 4) % 4)

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        bname = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(bname), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf += hdr + bname
        self.buf += self._pad(len(hdr) + len(bname))
        self.buf += data + self._pad(len(data))
        self.ino += 1

    def finish(self) -> bytes:
        self.ino = 0
        self.add("TRAILER!!!", 0)
        return bytes(self.buf)


def make_busybox_initramfs(out: Path, cmdline_script: str | None = None) -> Path:
    """Write a gzip'd newc initramfs to ``out`` and return ``out``.

    It holds a static /bin/busybox and an /init that mounts proc, sysfs and
    devtmpfs, runs ``cmdline_script`` (optional extra shell commands, busybox
    applets on PATH), prints ``XENRUN-HYPERVISOR-TYPE=<contents of
    /sys/hypervisor/type>`` on the console (hvc0 in dom0) and runs
    ``poweroff -f``.  /sys/hypervisor/type exists because Debian's kernel has
    CONFIG_XEN_SYS_HYPERVISOR=y built in: no modules needed.
    """
    out = Path(out)
    busybox = find_static_busybox().read_bytes()
    init = INIT_TEMPLATE.format(extra=cmdline_script or "", marker=MARKER_PREFIX)
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        c.add(d, 0o040755)
    # Without /dev/console in the archive the kernel gives init no stdio.
    c.add("dev/console", 0o020600, rdev=(5, 1))
    c.add("bin/busybox", 0o100755, busybox)
    c.add("bin/sh", 0o120777, b"busybox")
    c.add("init", 0o100755, init.encode())
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the image reproducible; level 6 is plenty for ~2 MB.
    out.write_bytes(gzip.compress(c.finish(), compresslevel=6, mtime=0))
    return out


if __name__ == "__main__":  # manual use: python tests/support/xenpkgs.py
    import pprint

    pprint.pprint(fetch())
