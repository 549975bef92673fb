"""Test support: a local repository of Debian's own packages for installed guests.

The debootstrap plugin installs a guest from a mirror; the tests give it a
``file://`` repository built here, so an installation reads no network. The
packages are what ``debootstrap --download-only`` fetches for the plugin's base
system (xenrun.plugins.debootstrap.BASE_PACKAGES) from Debian's mirror, once,
into the package cache ($XENRUN_CACHE, kept between CI runs); the repository
(``dists/bookworm/main/binary-amd64/Packages`` and an unsigned Release made by
apt-ftparchive, the .debs under ``pool/``) is rebuilt from them when the package
list changes. debootstrap reads it with --no-check-gpg (the plugin's
``check_gpg = false``).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from xenrun.plugins.debootstrap import BASE_PACKAGES

from .xenpkgs import DEFAULT_CACHE_DIR

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"


def ensure(packages: tuple[str, ...] = BASE_PACKAGES, cache: Path = DEFAULT_CACHE_DIR.parent) -> Path:
    """The repository's folder (give it as file://FOLDER), built when missing."""
    key = hashlib.sha256(repr((SUITE, sorted(packages))).encode()).hexdigest()[:12]
    base = Path(cache) / "guest"
    repo = base / f"repo-{key}"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:  # two test processes building at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (repo / ".done").exists():
            return repo
        debs = base / "debs"
        debs.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="guestrepo-") as tmp:
            subprocess.run(["debootstrap", "--download-only", "--variant=minbase",
                            f"--include={','.join(packages)}", f"--cache-dir={debs}", SUITE, f"{tmp}/tree", MIRROR],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for old in base.glob("repo-*"):
            shutil.rmtree(old, ignore_errors=True)
        pool = repo / "pool/main"
        lists = repo / f"dists/{SUITE}/main/binary-amd64"
        pool.mkdir(parents=True)
        lists.mkdir(parents=True)
        for deb in debs.glob("*.deb"):
            shutil.copy2(deb, pool / deb.name)
        packages_text = subprocess.run(["apt-ftparchive", "packages", "pool"], cwd=repo, check=True,
                                       capture_output=True).stdout
        (lists / "Packages").write_bytes(packages_text)
        subprocess.run(["gzip", "-9nk", "Packages"], cwd=lists, check=True)
        release = subprocess.run(
            ["apt-ftparchive", "-o", f"APT::FTPArchive::Release::Suite={SUITE}",
             "-o", f"APT::FTPArchive::Release::Codename={SUITE}",
             "-o", "APT::FTPArchive::Release::Components=main",
             "-o", "APT::FTPArchive::Release::Architectures=amd64", "release", "."],
            cwd=repo / f"dists/{SUITE}", check=True, capture_output=True).stdout
        (repo / f"dists/{SUITE}/Release").write_bytes(release)
        (repo / ".done").write_text("")
        return repo


def grub_xen(cache: Path = DEFAULT_CACHE_DIR) -> Path:
    """Debian's pvgrub2 images (package grub-xen-host, unpacked once into the cache):
    the folder holding grub-x86_64-xen.bin (PV) and grub-i386-xen_pvh.bin (PVH)."""
    from .xenpkgs import _apt_download, cache_lock

    out = Path(cache) / "grub-xen-host"
    folder = out / "usr/lib/grub-xen"
    with cache_lock(Path(cache)):
        if not (folder / "grub-x86_64-xen.bin").exists():
            deb = _apt_download("grub-xen-host", Path(cache))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
    return folder
