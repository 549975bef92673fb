"""The e2e machine's disk: Debian 12 built once from Debian's packages, then cached.

``ensure(progress)`` returns a ready :class:`Image` (a raw disk image with one
ext4 partition, GRUB in its MBR, the SSH key that logs in as root, and
``repo/``: an apt repository of Debian's own packages for installing Xen),
building it when the cache has none for the current recipe. The cache folder is
$XENRUN_CACHE/e2e (CI keeps it between runs on the same machine) or
<repo>/.cache/e2e (git-ignored); each image lives in ``base-<stamp>/`` where the
stamp hashes this file, so any change to the recipe builds a new one (older ones
are removed). Downloaded packages are kept in ``debs/`` beside it.

How it is built (root needed; no device-mapper on these machines, and loop
devices here do not show partitions, so nothing relies on either):

1. ``debootstrap --variant=minbase --include=...`` bookworm into a folder: a
   stock Debian machine (the kernel, grub-pc, systemd, OpenSSH, ifupdown with
   dhclient, LVM) with no Xen: xenrun's install step (S6) installs it.
2. apt repository: the machine reaches no mirror once it runs (QEMU user
   networking with restrict=on), so the packages that installing
   xen-system-amd64 on that tree needs are gathered here from Debian's mirror.
   The build machine's apt-get resolves them against the tree's dpkg status
   (its own lists, configuration and cache in a temporary folder; the tree is
   only read) and downloads them; the ones the tree has not installed at that
   version go to ``repo/``, a flat repository (``apt-ftparchive`` Packages,
   Packages.gz, Release). The test serves it on 127.0.0.1 (tests/e2e/aptrepo.py)
   and QEMU forwards the guest's connections to 10.0.2.100:80 to it
   (tests/e2e/relay.py); the machine's /etc/apt/sources.list names only it,
   and the image has no apt lists: its first ``apt-get update`` fetches them.
3. The folder is configured: hostname, fstab by a fixed UUID, root's
   authorized_keys, a serial console (GRUB, Linux ttyS0; dom0 hvc0 under Xen),
   ``net.ifnames=0`` so the NIC is eth0, /etc/network/interfaces as Debian's
   installer writes it (eth0 on DHCP with ifupdown: what xenrun's bridge takes
   over), and sources.list for the repository above.
4. A sparse raw disk gets an MBR partition table (sfdisk); the partition is
   reached through a loop device with an offset, formatted with the tree
   inside (``mkfs.ext4 -d``) and mounted; ``update-grub`` runs in a chroot
   whose /dev is a private tmpfs holding only what grub-probe needs. The
   machine boots plain Linux (it has no Xen).
5. GRUB's core image (grub-mkimage: biosdisk, part_msdos, ext2, prefix
   (hd0,msdos1)/boot/grub) goes right after the MBR and boot.img into the MBR's
   code area, which is what grub-install does for such a disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
HOSTNAME = "xen-e2e"
FS_UUID = "5e2e0e2e-0000-4000-8000-00000000e2e0"
DISK_BYTES = 6 << 30  # sparse; the tree takes about 1.3 GiB
PART_START = 1 << 20  # sector 2048
PACKAGES = (
    "systemd-sysv", "udev", "kmod", "linux-image-amd64", "initramfs-tools", "grub-pc",
    "openssh-server", "ifupdown", "isc-dhcp-client", "iproute2", "iputils-ping", "bridge-utils",
    "lvm2", "procps", "util-linux", "e2fsprogs", "less",
    "dbus",  # as on any installed Debian (systemd recommends it): networkctl talks to networkd over it
)
XEN_PACKAGE = "xen-system-amd64"  # installed by xenrun (S6) from the repository below
# the repository's address as the machine sees it: QEMU relays its connections to
# REPO_ADDRESS:80 to the test's server on 127.0.0.1 (tests/e2e/aptrepo.py)
REPO_ADDRESS = "10.0.2.100"
SOURCES_LIST = f"""# The e2e test's repository of Debian's own packages (bookworm main, the ones
# installing {XEN_PACKAGE} needs), served by the test on its 127.0.0.1 and
# forwarded by QEMU to {REPO_ADDRESS}:80; the machine reaches no other mirror.
deb [trusted=yes] http://{REPO_ADDRESS}/ ./
"""
# what Debian's installer writes for a machine with one NIC on DHCP
INTERFACES = """# This file describes the network interfaces available on your system
# and how to activate them. For more information, see interfaces(5).

source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback

# The primary network interface
allow-hotplug eth0
iface eth0 inet dhcp
"""
LINUX_CMDLINE = "console=ttyS0,115200 net.ifnames=0"
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen net.ifnames=0"

Progress = Callable[[str], None]


def cache_root() -> Path:
    return Path(os.environ.get("XENRUN_CACHE") or REPO / ".cache") / "e2e"


def stamp() -> str:
    """The recipe's stamp: a hash of this file's code (any change to it builds a
    new image; the module's docstring is left out)."""
    code = Path(__file__).read_text().split('"""', 2)[2]
    return hashlib.sha256(code.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Image:
    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "base.raw"

    @property
    def key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def info(self) -> dict:
        return json.loads((self.folder / "info.json").read_text())

    @property
    def repo(self) -> Path:
        """The flat apt repository the machine installs Xen from."""
        return self.folder / "repo"

    @property
    def build_log(self) -> Path:
        return self.folder / "build.log"


TOOLS = ("debootstrap", "apt-get", "apt-ftparchive", "dpkg-deb", "sfdisk", "mkfs.ext4", "losetup", "mount",
         "umount", "chroot", "qemu-img", "qemu-system-x86_64", "grub-mkimage", "ssh-keygen", "ssh")


def missing() -> str | None:
    """Why the image cannot be built or used here, or None."""
    if os.geteuid() != 0:
        return "building the e2e image needs root (debootstrap, loop devices, mount)"
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return (f"missing: {', '.join(absent)} (apt-get install debootstrap apt-utils fdisk e2fsprogs"
                " qemu-system-x86 qemu-utils grub-common openssh-client)")
    return None


def ensure(progress: Progress = print) -> tuple[Image, float]:
    """The cached image for the current recipe, built first if needed.
    Returns it and the seconds spent building (0 when it was cached)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    image = Image(root / f"base-{stamp()}")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse
        if (image.folder / "info.json").exists():
            progress(f"image: cached {image.disk} (recipe {stamp()}, built in"
                     f" {image.info['build_seconds']:.0f} s)")
            return image, 0.0
        for old in root.glob("base-*"):
            progress(f"image: removing {old.name} (an older recipe)")
            shutil.rmtree(old, ignore_errors=True)
        started = time.monotonic()
        build(image, progress)
        return image, time.monotonic() - started


class Builder:
    def __init__(self, image: Image, progress: Progress):
        self.image = image
        self.progress = progress
        self.work = image.folder / "work"
        self.tree = self.work / "tree"
        self.mnt = self.work / "mnt"
        self.log = open(image.build_log, "a")
        self.times: dict[str, float] = {}

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        self.log.write(f"$ {' '.join(map(str, argv))}\n")
        self.log.flush()
        proc = subprocess.run(list(map(str, argv)), stdout=self.log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, **kw)
        if proc.returncode != 0:
            raise RuntimeError(f"image build: {' '.join(map(str, argv))} failed (exit {proc.returncode});"
                               f" see {self.image.build_log}:\n{_tail(self.image.build_log)}")
        return proc

    def output(self, argv: list[str], **kw) -> str:
        self.log.write(f"$ {' '.join(map(str, argv))}\n")
        self.log.flush()
        proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              check=False, **kw)
        if proc.returncode != 0:
            self.log.write(proc.stdout + proc.stderr)
            raise RuntimeError(f"image build: {' '.join(map(str, argv))} failed (exit {proc.returncode}):"
                               f" {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def stage(self, name: str, fn):
        self.progress(f"image: {name} ...")
        t = time.monotonic()
        result = fn()
        self.times[name] = round(time.monotonic() - t, 1)
        self.progress(f"image: {name} done in {self.times[name]:.0f} s")
        return result


def build(image: Image, progress: Progress) -> None:
    if image.folder.exists():
        shutil.rmtree(image.folder)
    image.folder.mkdir(parents=True)
    b = Builder(image, progress)
    loop = None
    try:
        b.stage("debootstrap", lambda: _debootstrap(b))
        repo = b.stage("apt repository", lambda: _apt_repository(b))
        b.stage("configure", lambda: _configure(b))
        disk = image.folder / "base.partial"
        with open(disk, "wb") as f:
            f.truncate(DISK_BYTES)
        subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\nstart=2048, type=83, bootable\n",
                       text=True, check=True, capture_output=True)
        part_bytes = DISK_BYTES - PART_START
        loop = b.output(["losetup", "--find", "--show", "--offset", str(PART_START), "--sizelimit",
                         str(part_bytes), disk]).strip()
        b.stage("mkfs.ext4 -d", lambda: b.run(["mkfs.ext4", "-q", "-F", "-U", FS_UUID, "-L", "root", "-d",
                                               b.tree, loop]))
        b.mnt.mkdir(parents=True, exist_ok=True)
        b.run(["mount", loop, b.mnt])
        try:
            b.stage("update-grub", lambda: _grub_config(b, loop))
            _grub_files(b)
        finally:
            subprocess.run(["umount", str(b.mnt)], check=False)
        b.run(["losetup", "-d", loop])
        loop = None
        b.stage("grub core", lambda: _grub_core(b, disk))
        disk.rename(image.disk)
        info = {"recipe": stamp(), "suite": SUITE, "kernel": _kernel_abi(b.tree), "xen": repo["xen"],
                "stages": b.times, "build_seconds": round(sum(b.times.values()), 1),
                "packages": list(PACKAGES), "xen_package": XEN_PACKAGE, "repo": repo["repo"],
                "hostname": HOSTNAME, "fs_uuid": FS_UUID}
        shutil.rmtree(b.work)
        (image.folder / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        progress(f"image: ready {image.disk} (kernel {info['kernel']}; no Xen: its repository {image.repo} has"
                 f" {info['repo']['packages']} packages, Xen {info['xen']}), {info['build_seconds']:.0f} s")
    except BaseException:
        if loop:
            subprocess.run(["umount", str(b.mnt)], check=False, capture_output=True)
            subprocess.run(["losetup", "-d", loop], check=False, capture_output=True)
        raise
    finally:
        b.log.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _debootstrap(b: Builder) -> None:
    """debootstrap's tree, kept in the cache by its package list (so a change to
    the configuration below does not fetch and unpack everything again), copied
    into the work folder."""
    key = hashlib.sha256(repr((SUITE, MIRROR, PACKAGES)).encode()).hexdigest()[:12]
    kept = cache_root() / f"debootstrap-{key}"
    if not (kept / ".done").exists():
        for old in cache_root().glob("debootstrap-*"):
            shutil.rmtree(old, ignore_errors=True)
        debs = cache_root() / "debs"  # debootstrap's package cache
        debs.mkdir(parents=True, exist_ok=True)
        b.progress(f"image: debootstrap {SUITE}, a stock machine without Xen; log: {b.image.build_log}")
        b.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}",
               SUITE, kept / "tree", MIRROR])
        (kept / ".done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    else:
        b.progress(f"image: debootstrap's tree is kept in {kept}")
    b.work.mkdir(parents=True, exist_ok=True)
    b.run(["cp", "-a", kept / "tree", b.tree])


def _dpkg_status(tree: Path) -> dict[str, str]:
    """Package -> Version of what the tree has installed (its var/lib/dpkg/status)."""
    installed = {}
    for para in (tree / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status", "").endswith(" installed"):
            installed[fields["Package"]] = fields["Version"]
    return installed


def _apt_repository(b: Builder) -> dict:
    """The packages installing XEN_PACKAGE on the tree needs, from Debian's mirror,
    as a flat repository in ``repo/``. This machine's apt-get works on the tree's
    dpkg status, everything else its own (APT_CONFIG replaces this machine's
    configuration: its lists, cache and sources in work/apt, the packages kept in
    cache_root()/debs beside debootstrap's), so the tree is only read.
    Recommends are left out: the repository holds what debootstrap put in
    earlier images, which had Xen preinstalled; apt on the machine skips a
    recommended package its sources do not have. Returns info.json's parts."""
    apt = b.work / "apt"
    debs = cache_root() / "debs"
    (debs / "partial").mkdir(parents=True, exist_ok=True)
    for sub in ("apt.conf.d", "sources.list.d", "preferences.d", "trusted.gpg.d", "lists/partial", "cache",
                "log"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    keyring = b.tree / "usr/share/keyrings/debian-archive-keyring.gpg"
    (apt / "sources.list").write_text(f"deb [signed-by={keyring}] {MIRROR} {SUITE} main\n")
    conf = {
        "Dir::Etc::Parts": apt / "apt.conf.d", "Dir::Etc::Main": apt / "apt.conf",
        "Dir::Etc::SourceList": apt / "sources.list", "Dir::Etc::SourceParts": apt / "sources.list.d",
        "Dir::Etc::Preferences": apt / "preferences", "Dir::Etc::PreferencesParts": apt / "preferences.d",
        "Dir::Etc::Trusted": apt / "trusted.gpg", "Dir::Etc::TrustedParts": apt / "trusted.gpg.d",
        "Dir::State": apt, "Dir::State::Lists": apt / "lists", "Dir::State::extended_states": apt / "extended_states",
        "Dir::State::status": b.tree / "var/lib/dpkg/status",
        "Dir::Cache": apt / "cache", "Dir::Cache::Archives": debs, "Dir::Log": apt / "log",
        "APT::Architecture": "amd64", "APT::Architectures": "amd64", "APT::Install-Recommends": "false",
        "APT::Sandbox::User": "root", "Acquire::Languages": "none",
    }
    (apt / "apt.conf").write_text("".join(f'{k} "{v}";\n' for k, v in conf.items()))
    env = {**os.environ, "APT_CONFIG": str(apt / "apt.conf"), "DEBIAN_FRONTEND": "noninteractive"}
    b.run(["apt-get", "-q", "update"], env=env)
    plan = b.output(["apt-get", "-s", "install", XEN_PACKAGE], env=env)
    b.log.write(plan)
    b.run(["apt-get", "-q", "-y", "--download-only", "install", XEN_PACKAGE], env=env)
    wanted = re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) .*\[(\S+)\]\)$", plan, re.MULTILINE)
    if not any(name.split(":")[0] == XEN_PACKAGE for name, _, _ in wanted):
        raise RuntimeError(f"image build: apt-get plans no {XEN_PACKAGE}:\n{plan[-3000:]}")
    installed = _dpkg_status(b.tree)
    repo = b.image.repo
    repo.mkdir()
    xen = "?"
    for name, version, arch in wanted:
        name = name.split(":")[0]
        deb = debs / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
        fields = b.output(["dpkg-deb", "--show", "--showformat", "${Package} ${Version}", deb]).split()
        if fields != [name, version]:
            raise RuntimeError(f"image build: {deb} is {' '.join(fields)}, apt-get planned {name} {version}")
        if installed.get(name) == version:
            continue  # the machine has it already
        shutil.copy2(deb, repo / deb.name)
        if re.fullmatch(r"xen-hypervisor-\d[\d.]*-amd64", name):
            xen = version  # the Xen version, as dpkg-query shows it on the machine once installed
    b.run(["sh", "-c", "apt-ftparchive packages . > Packages && gzip -9nk Packages"], cwd=repo)
    release = b.output(["apt-ftparchive", "-o", "APT::FTPArchive::Release::Origin=xenrun-e2e",
                        "-o", "APT::FTPArchive::Release::Label=Debian packages for the e2e machine",
                        "release", "."], cwd=repo)
    (repo / "Release").write_text(release)
    count = len(list(repo.glob("*.deb")))
    size = sum(f.stat().st_size for f in repo.iterdir())
    b.progress(f"image: repository {repo}: {count} packages ({size / 2**20:.1f} MiB) for {XEN_PACKAGE},"
               f" Xen {xen}")
    return {"xen": xen, "repo": {"packages": count, "bytes": size, "address": REPO_ADDRESS,
                                 "folder": repo.name}}


def _write(tree: Path, path: str, text: str, mode: int = 0o644) -> None:
    p = tree / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)


def _set_vars(text: str, values: dict[str, str]) -> str:
    """/etc/default/grub with each VAR=... line replaced (or appended)."""
    lines = text.splitlines()
    for var, value in values.items():
        new = f'{var}="{value}"'
        for i, line in enumerate(lines):
            if line.lstrip("# ").startswith(f"{var}="):
                lines[i] = new
                break
        else:
            lines.append(new)
    return "\n".join(lines) + "\n"


def _configure(b: Builder) -> None:
    t = b.tree
    _write(t, "/etc/hostname", f"{HOSTNAME}\n")
    _write(t, "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    _write(t, "/etc/fstab", f"# written by xenrun's e2e image builder\nUUID={FS_UUID} / ext4 errors=remount-ro 0 1\n")
    # root logs in with the image's own key only
    key = b.image.key
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "xenrun-e2e", "-f", str(key)],
                   check=True, capture_output=True)
    (t / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    _write(t, "/root/.ssh/authorized_keys", Path(f"{key}.pub").read_text(), 0o600)
    _write(t, "/etc/ssh/sshd_config.d/xenrun-e2e.conf",
           "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n")
    subprocess.run(["passwd", "-R", str(t), "-l", "root"], check=False, capture_output=True)
    # GRUB and Linux on the serial console; under Xen dom0 talks through hvc0
    grub = t / "etc/default/grub"
    grub.write_text(_set_vars(grub.read_text(), {
        "GRUB_TIMEOUT": "1", "GRUB_CMDLINE_LINUX_DEFAULT": "", "GRUB_CMDLINE_LINUX": LINUX_CMDLINE,
        "GRUB_CMDLINE_LINUX_XEN_REPLACE": DOM0_CMDLINE, "GRUB_TERMINAL": "serial",
        "GRUB_SERIAL_COMMAND": "serial --unit=0 --speed=115200", "GRUB_DISABLE_OS_PROBER": "true",
    }))
    # the uplink: ifupdown with DHCP on eth0, as Debian's installer leaves it (xenrun's bridge takes it over)
    _write(t, "/etc/network/interfaces", INTERFACES)
    # apt: the test's repository only; no lists yet (the machine's first apt-get update fetches them)
    _write(t, "/etc/apt/sources.list", SOURCES_LIST)
    # (debootstrap leaves the mirror's lists it used; only this copy loses them, the kept tree is untouched)
    for f in (t / "var/lib/apt/lists").rglob("*"):
        if f.is_file() and f.name != "lock":
            f.unlink()
    with ChrootMounts(b, t):
        # nothing in the machine may try to reach a network it does not have
        for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"):
            subprocess.run(["chroot", str(t), "systemctl", "disable", unit], capture_output=True)


class ChrootMounts:
    """proc, sysfs and a private tmpfs /dev for a chroot: null, zero, random, the
    /dev/fd links bash needs, and optionally the partition's loop device. The
    loop device is named /dev/vda1 (a link to a node with its numbers): GRUB's
    10_linux writes no entry for a root on a file-backed loop device, and
    /dev/disk/by-uuid/UUID lets grub-mkconfig write root=UUID=...; nothing of
    the machine's own /dev is touched."""

    def __init__(self, b: Builder, root: Path, loop: str | None = None):
        self.b, self.root, self.loop = b, root, loop
        self.mounts: list[Path] = []

    def __enter__(self) -> "ChrootMounts":
        b, root = self.b, self.root
        dev = root / "dev"
        b.run(["mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "e2e-dev", dev])
        self.mounts.append(dev)
        for name in ("null", "zero", "random", "urandom", "full", "tty"):
            os.mknod(dev / name, 0o666 | 0o020000, os.stat(f"/dev/{name}").st_rdev)
        for i, name in enumerate(("stdin", "stdout", "stderr")):
            (dev / name).symlink_to(f"/proc/self/fd/{i}")
        (dev / "fd").symlink_to("/proc/self/fd")
        if self.loop:
            os.mknod(dev / "vda1", 0o660 | 0o060000, os.stat(self.loop).st_rdev)
            (dev / Path(self.loop).name).symlink_to("vda1")
            (dev / "disk/by-uuid").mkdir(parents=True)
            (dev / "disk/by-uuid" / FS_UUID).symlink_to("../../vda1")
        for kind, where in (("proc", "proc"), ("sysfs", "sys")):
            b.run(["mount", "-t", kind, kind, root / where])
            self.mounts.append(root / where)
        return self

    def __exit__(self, *exc) -> None:
        for mount in reversed(self.mounts):
            subprocess.run(["umount", str(mount)], check=False)


def _grub_config(b: Builder, loop: str) -> None:
    m = b.mnt
    with ChrootMounts(b, m, loop):
        b.run(["chroot", m, "update-grub"])  # no Xen on the machine: Linux entries only
    # grub-probe finds no UUID through the renamed loop device, so this first
    # grub.cfg says root=/dev/vda1: right in the VM (the first virtio disk);
    # update-grub on the machine itself writes root=UUID=... later
    cfg = (m / "boot/grub/grub.cfg").read_text()
    if not re.search(rf"^\s*linux\s+/boot/vmlinuz-\S+ root=(/dev/vda1|UUID={FS_UUID}) ", cfg, re.M):
        raise RuntimeError(f"image build: grub.cfg has no Linux entry for the root file system:\n{cfg[-3000:]}")


def _grub_files(b: Builder) -> None:
    """What grub-install puts in /boot/grub: the modules, and an empty grubenv."""
    src = b.mnt / "usr/lib/grub/i386-pc"
    dest = b.mnt / "boot/grub/i386-pc"
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".mod", ".lst", ".img", ".o") or f.name == "modinfo.sh":
            shutil.copy2(f, dest / f.name)
    b.run(["grub-editenv", b.mnt / "boot/grub/grubenv", "create"])


def _grub_core(b: Builder, disk: Path) -> None:
    """grub-install's work on a disk image: core.img in the gap after the MBR,
    boot.img's code in the MBR (its partition table kept)."""
    mods = b.tree / "usr/lib/grub/i386-pc"
    core = b.image.folder / "core.img"
    b.run(["grub-mkimage", "-O", "i386-pc", "-d", mods, "-o", core, "-p", "(hd0,msdos1)/boot/grub",
           "biosdisk", "part_msdos", "ext2"])
    code = (mods / "boot.img").read_bytes()
    data = core.read_bytes()
    if 512 + len(data) > PART_START:
        raise RuntimeError(f"image build: core.img ({len(data)} bytes) does not fit before the partition")
    with open(disk, "r+b") as f:
        mbr = bytearray(f.read(512))
        mbr[:440] = code[:440]  # code (and the kernel sector, 1); partition table and signature kept
        f.seek(0)
        f.write(mbr)
        f.seek(512)
        f.write(data)
    core.unlink()


def _kernel_abi(tree: Path) -> str:
    names = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    return names[-1] if names else "?"
