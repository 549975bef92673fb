"""Test support: an installation ISO holding Debian's own installer (issue 14.4).

Not a test module.  ``fetch()`` downloads Debian 12's
``debian-installer-12-netboot-amd64`` with ``apt-get download`` (cached beside
the other packages, ``xenpkgs.DEFAULT_CACHE_DIR``) and takes out the text
installer's kernel and initrd, which boot as a Xen PV guest.  ``build_iso()``
puts them into an ISO 9660 image (Rock Ridge, a volume label) laid out as an
Arch ISO is: the kernel and initramfs where xenrun's iso_boot looks for them
(``guestmedia.ISO_KERNELS`` / ``ISO_RAMDISKS``, today's names).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from xenrun.guestmedia import ISO_KERNELS, ISO_RAMDISKS

from . import xenpkgs

PACKAGE = "debian-installer-12-netboot-amd64"
# inside the package: the text (newt) installer, not the gtk one
IMAGES = "usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64"
KERNEL_IN_ISO = ISO_KERNELS[1]  # /arch/boot/x86_64/vmlinuz-linux
RAMDISK_IN_ISO = ISO_RAMDISKS[1]  # /arch/boot/x86_64/initramfs-linux.img
LABEL = "ARCH_DI12_XENRUN"

_READY = ".complete"


def fetch(cache_dir: Path = xenpkgs.DEFAULT_CACHE_DIR) -> dict:
    """The installer's ``kernel`` and ``initrd`` (Paths), unpacked once under
    ``<cache_dir>/debian-installer``; ``version`` (its version.info) and ``deb``
    (the package file's name)."""
    cache_dir = Path(cache_dir)
    root = cache_dir / "debian-installer"
    with xenpkgs.cache_lock(cache_dir):
        if not (root / _READY).is_file():
            _unpack(cache_dir, root)
    info = root / Path(IMAGES).parents[1] / "version.info"
    return {"kernel": root / IMAGES / "linux", "initrd": root / IMAGES / "initrd.gz",
            "version": info.read_text().strip() if info.is_file() else "", "deb": (root / _READY).read_text().strip()}


def _unpack(cache_dir: Path, root: Path) -> None:
    debs = sorted(cache_dir.glob(f"{PACKAGE}_*.deb"), key=lambda p: p.stat().st_mtime)
    deb = debs[-1] if debs else xenpkgs._apt_download(PACKAGE, cache_dir)
    tmp = cache_dir / "debian-installer.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    xenpkgs._run(["dpkg", "-x", str(deb), str(tmp)])
    for name in ("linux", "initrd.gz"):
        if not (tmp / IMAGES / name).is_file():
            raise xenpkgs.FetchError(f"{deb.name} has no {IMAGES}/{name}")
    (tmp / _READY).write_text(deb.name + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def build_iso(out: Path, installer: dict, label: str = LABEL) -> Path:
    """An ISO 9660 image at ``out`` (Rock Ridge, volume label ``label``) with the
    installer's kernel and initrd at the Arch ISO's paths, made with xorriso (or
    genisoimage)."""
    out = Path(out)
    tree = out.parent / (out.name + ".tree")
    shutil.rmtree(tree, ignore_errors=True)
    for src, inside in ((installer["kernel"], KERNEL_IN_ISO), (installer["initrd"], RAMDISK_IN_ISO)):
        dest = tree / inside.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    (tree / "arch" / "version").write_text(f"{installer['deb']}\n")
    if shutil.which("xorriso"):
        argv = ["xorriso", "-as", "mkisofs"]
    elif shutil.which("genisoimage"):
        argv = ["genisoimage"]
    else:
        raise xenpkgs.FetchError("neither xorriso nor genisoimage is installed (apt-get install xorriso)")
    out.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([*argv, "-quiet", "-R", "-V", label, "-o", str(out), str(tree)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise xenpkgs.FetchError(f"{argv[0]} failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    shutil.rmtree(tree)
    return out
