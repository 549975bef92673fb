"""Test support: an emulated Xen host (dom0) under QEMU that really runs ``xl create``.

Not a test module.  The pieces:

* :func:`fetch_xen_tools` downloads the Xen 4.17 userspace (xl, xenstored,
  xenconsoled, the libxen* libraries, the hotplug scripts) and lvm2 from
  Debian 12 with ``apt-get download`` and unpacks them with ``dpkg -x`` into
  the package cache (``xenpkgs.DEFAULT_CACHE_DIR``), once.
* :func:`build_guest_initramfs` makes the PV guest's busybox initramfs: it
  loads xen-blkfront and xen-netfront and prints ``GUEST-DISK``/``GUEST-NIC``
  lines for what the guest sees.
* :func:`build_dom0_initramfs` makes a dom0 initramfs with busybox, the Xen
  tools, the host's bash/flock/stat/losetup/ip (the hotplug scripts need the
  real ones), the kernel modules a backend needs, and an /init that starts the
  toolstack, creates bridge ``xenbr0``, runs a caller's script and powers off.
* :func:`boot_xen_host` boots Xen + that dom0 directly with QEMU's multiboot
  loader (TCG) and follows the serial console.
* :func:`run_guest` ties it together: an xl config text, files for dom0, an
  optional setup script and extra QEMU disks in; the guest's console out.

Console protocol (dom0 prints these on hvc0, i.e. Xen's COM1):
``XENHOST-DOM0-READY``, ``XENHOST-XL-CREATE``, ``XENHOST-XL-CREATE-RC=<n>`` (one retry
after a libxl timeout: ``XENHOST-XL-CREATE-RETRY``),
``XENHOST-GUEST-CONSOLE-BEGIN`` / ``-END`` around the guest's console log
(each line prefixed ``GUEST| ``), ``XENHOST-DONE rc=<n>`` last.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from xenrun import bootcheck

from . import xenpkgs

# --- packages ------------------------------------------------------------------

# Downloaded with `apt-get download`; everything else the binaries link
# against (glibc, libuuid, zlib, libsystemd, ...) is copied from this machine.
XEN_TOOL_PACKAGES = (
    "xen-utils-4.17", "xen-utils-common", "xenstore-utils",
    "libxenmisc4.17", "libxencall1", "libxenevtchn1", "libxenforeignmemory1",
    "libxengnttab1", "libxenstore4", "libxentoollog1", "libxentoolcore1",
    "libxenhypfs1", "libxendevicemodel1", "libyajl2",
)
# lvm2 is not installed on the machine (there is no device-mapper here), so
# it comes from the archive too, with the libraries the machine lacks.
LVM_PACKAGES = ("lvm2", "libdevmapper1.02.1", "libdevmapper-event1.02.1", "libaio1")

XEN_LIBEXEC = "/usr/lib/xen-4.17/bin"
# Binaries from the unpacked packages that dom0 needs (paths inside the packages).
XEN_BINARIES = tuple(f"{XEN_LIBEXEC}/{b}" for b in (
    "xl", "xenstored", "xenconsoled", "xenconsole", "xen-init-dom0", "libxl-save-helper",
)) + ("/usr/bin/xenstore",)
LVM_BINARY = "/sbin/lvm"
LVM_COMMANDS = ("pvcreate", "pvs", "vgcreate", "vgchange", "vgs", "lvcreate", "lvremove", "lvs", "lvchange")
# Real tools from this machine: the hotplug scripts are bash and rely on
# util-linux/coreutils options busybox lacks (stat -L -c, losetup -f,
# flock on an fd), and vif-bridge on `ip link set ... master`.
HOST_TOOLS = ("bash", "flock", "stat", "losetup", "ip")
# dlopen'ed by glibc for pthread_cancel, which xl uses: ldd cannot see it.
HOST_EXTRA_LIBS = ("/lib/x86_64-linux-gnu/libgcc_s.so.1",)

# Backend side (dom0).  virtio_blk + virtio_pci let extra QEMU disks appear as
# /dev/vdX: Debian's kernel has no disk driver built in.
DOM0_MODULES = (
    "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs",
    "xen-blkback", "xen-netback", "bridge", "loop", "dm-mod", "virtio_pci", "virtio_blk",
)
GUEST_MODULES = ("xen-blkfront", "xen-netfront")

# Where the guest's kernel and initramfs sit inside dom0, for xl configs.
GUEST_KERNEL = "/var/lib/xen/images/vmlinuz"
GUEST_RAMDISK = "/var/lib/xen/images/guest-initrd.gz"
GUEST_CONFIG = "/etc/xen/guest.cfg"


def guest_domain_toml(name: str, host: str, disk: str, mac: str | None = None, kind: str = "pv") -> str:
    """A [domain.NAME] of domains.toml for a PV guest booting the reporting kernel
    and initramfs above, with ``disk`` (TOML lines of its one disk) and a vif on
    xenbr0 (the MAC derived from the name by xenrun when ``mac`` is None)."""
    return f"""
[domain.{name}]
host = "{host}"
type = "{kind}"
memory = "128M"
vcpus = 1
kernel = "{GUEST_KERNEL}"
ramdisk = "{GUEST_RAMDISK}"
extra = "console=hvc0"

[[domain.{name}.disks]]
{disk}

[[domain.{name}.vif]]
bridge = "xenbr0"
""" + (f'mac = "{mac}"\n' if mac else "")

# bootscrub=0: zeroing all free RAM is pure TCG work a throwaway host never needs.
XEN_OPTIONS = "console=com1 com1=115200,8n1 dom0_mem=512M,max:512M bootscrub=0 loglvl=info guest_loglvl=info"
DOM0_OPTIONS = "console=hvc0"
MEMORY_MB = 1024

_TOOLS_READY = ".xenhost-complete"


class HarnessError(RuntimeError):
    """The emulated host could not be built (missing tool, package or library)."""


def fetch_xen_tools(cache_dir: Path = xenpkgs.DEFAULT_CACHE_DIR) -> Path:
    """Download and unpack :data:`XEN_TOOL_PACKAGES` and :data:`LVM_PACKAGES`
    into ``<cache_dir>/xentools`` (once) and return that root."""
    cache_dir = Path(cache_dir)
    root = cache_dir / "xentools"
    with xenpkgs.cache_lock(cache_dir):
        if not (root / _TOOLS_READY).is_file():
            _unpack_tools(cache_dir, root)
    return root


def _unpack_tools(cache_dir: Path, root: Path) -> None:
    tmp = cache_dir / "xentools.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for pkg in XEN_TOOL_PACKAGES + LVM_PACKAGES:
        debs = sorted(cache_dir.glob(f"{pkg}_*.deb"), key=lambda p: p.stat().st_mtime)
        deb = debs[-1] if debs else xenpkgs._apt_download(pkg, cache_dir)
        xenpkgs._run(["dpkg", "-x", str(deb), str(tmp)])
    (tmp / _TOOLS_READY).write_text("\n".join(XEN_TOOL_PACKAGES + LVM_PACKAGES) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def xen_elf(pkgs: dict, cache_dir: Path = xenpkgs.DEFAULT_CACHE_DIR) -> Path:
    """The gunzipped Xen ELF (QEMU's -kernel multiboot loader cannot gunzip)."""
    src = Path(pkgs["xen_gz"])
    out = Path(cache_dir) / f"{src.name[:-3]}.{src.stat().st_size}.elf"
    with xenpkgs.cache_lock(cache_dir):
        if not out.is_file():
            tmp = out.with_suffix(".partial")
            tmp.write_bytes(gzip.decompress(src.read_bytes()))
            tmp.rename(out)
    return out


# --- kernel modules ----------------------------------------------------------------

def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """Contents of the section named ``wanted`` in a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    u = lambda off, n: int.from_bytes(data[off:off + n], "little")  # noqa: E731
    shoff, shentsize, shnum, shstrndx = u(0x28, 8), u(0x3A, 2), u(0x3C, 2), u(0x3E, 2)
    def sh(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        return u(base, 4), u(base + 0x18, 8), u(base + 0x20, 8)  # name, offset, size
    _, stroff, _ = sh(shstrndx)
    for i in range(shnum):
        name_off, off, size = sh(i)
        end = data.index(b"\0", stroff + name_off)
        if data[stroff + name_off:end].decode() == wanted:
            return data[off:off + size]
    return None


def _mod_key(name: str) -> str:
    return name.replace("-", "_")


_MODULE_INDEX: dict[Path, dict[str, Path]] = {}


def _module_index(modules_dir: Path) -> dict[str, Path]:
    if modules_dir not in _MODULE_INDEX:
        _MODULE_INDEX[modules_dir] = {
            _mod_key(p.name[:-3]): p for p in (modules_dir / "kernel").rglob("*.ko")
        }
    return _MODULE_INDEX[modules_dir]


def module_load_order(modules_dir: Path, names: Iterable[str]) -> list[Path]:
    """The .ko files for ``names`` plus their dependencies, dependencies first.

    The packages ship no modules.dep (depmod runs at install time), so the
    ``depends=`` entry of each module's .modinfo section is read instead.
    """
    index = _module_index(Path(modules_dir))
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = _mod_key(name)
        if key in seen:
            return
        seen.add(key)
        if key not in index:
            raise HarnessError(f"kernel module {name!r} not found under {modules_dir}")
        path = index[key]
        info = _elf_section(path.read_bytes(), ".modinfo") or b""
        for entry in info.split(b"\0"):
            if entry.startswith(b"depends="):
                for dep in filter(None, entry[len(b"depends="):].decode().split(",")):
                    visit(dep)
        order.append(path)

    for n in names:
        visit(n)
    return order


# --- initramfs tree -------------------------------------------------------------------

class _Tree:
    """Files for a newc cpio, keyed by path; parents are added automatically."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (0o040755, b"", (0, 0)))

    def dir(self, path: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries.setdefault(path, (0o040755, b"", (0, 0)))

    def file(self, path: str, data: bytes | Path, mode: int = 0o100644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (mode, data if isinstance(data, bytes) else Path(data).read_bytes(), (0, 0))

    def link(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (0o120777, target.encode(), (0, 0))

    def chardev(self, path: str, major: int, minor: int) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (0o020600, b"", (major, minor))

    def write(self, out: Path, level: int = 6) -> Path:
        c = xenpkgs._Cpio()
        # Sorted so every directory comes before what is in it.
        for path in sorted(self.entries):
            mode, data, rdev = self.entries[path]
            c.add(path, mode, data, rdev=rdev)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.compress(c.finish(), compresslevel=level, mtime=0))
        return out


# Merged /usr, like Debian 12: package paths under /bin, /sbin, /lib land in /usr.
_MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def _usr(path: str) -> str:
    path = path.strip("/")
    head, _, rest = path.partition("/")
    return f"{_MERGED[head]}/{rest}" if head in _MERGED and rest else path


def _merged_usr(tree: _Tree) -> None:
    for top, target in _MERGED.items():
        tree.dir(target)
        tree.link(top, target)


def _shared_libs(binary: Path, search: list[Path]) -> list[Path]:
    """Libraries ``binary`` needs, as ldd resolves them with the unpacked
    package libraries searched first."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, search)))
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
    if "not a dynamic executable" in proc.stdout + proc.stderr:
        return []
    if proc.returncode != 0:
        raise HarnessError(f"ldd {binary} failed: {proc.stderr.strip()}")
    libs, missing = [], []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            missing.append(line.split()[0])
        elif "=>" in line:
            path = line.split("=>", 1)[1].split("(")[0].strip()
            if path:
                libs.append(Path(path))
        elif line.startswith("/"):
            libs.append(Path(line.split()[0]))  # the dynamic loader itself
    if missing:
        raise HarnessError(f"{binary} needs {', '.join(missing)}, found neither in the packages nor on this machine")
    return libs


def _add_with_libs(tree: _Tree, src: Path, dest: str, tools_root: Path, search: list[Path]) -> None:
    tree.file(_usr(dest), Path(src).read_bytes(), 0o100755)
    for lib in _shared_libs(src, search):
        try:
            inner = "/" + str(lib.relative_to(tools_root))  # from an unpacked package
        except ValueError:
            inner = str(lib)  # from this machine
        # Libraries are copied under their soname path with the real contents.
        tree.file(_usr(inner), lib.resolve().read_bytes(), 0o100755)


def _busybox(tree: _Tree) -> None:
    tree.file("usr/bin/busybox", xenpkgs.find_static_busybox().read_bytes(), 0o100755)
    tree.link("usr/bin/sh", "busybox")
    for d in ("dev", "proc", "sys", "tmp", "run", "root"):
        tree.dir(d)
    # Without /dev/console in the archive the kernel gives init no stdio.
    tree.chardev("dev/console", 5, 1)


def _add_modules(tree: _Tree, pkgs: dict, names: Iterable[str], listing: str) -> None:
    """The kernel modules ``names`` (with what they depend on) into the tree, and
    ``listing``: their paths in load order, for the init script's insmod loop."""
    paths = []
    for ko in module_load_order(pkgs["modules_dir"], names):
        inner = f"usr/lib/modules/{ko.name}"
        tree.file(inner, ko.read_bytes())
        paths.append("/" + inner)
    tree.file(listing, ("\n".join(paths) + "\n").encode())


# --- guest initramfs --------------------------------------------------------------

GUEST_INIT = r"""#!/bin/busybox sh
# PV guest init: load the Xen frontends, report the disks and NICs it sees.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
exec </dev/console >/dev/console 2>&1
echo "GUEST-INIT-START $(uname -r)"
for m in $(cat /etc/guest-modules); do insmod "$m" || echo "GUEST-INSMOD-FAILED $m"; done
# Frontends connect asynchronously once their backends are ready.
i=0
while [ $i -lt {wait} ]; do
    ls /sys/block | grep -q '^xvd' && ls /sys/class/net | grep -qv '^lo$' && break
    sleep 0.5; i=$((i+1))
done
sleep 1
for d in /sys/block/xvd*; do
    [ -e "$d/size" ] || continue
    s=$(cat "$d/size")
    echo "GUEST-DISK ${d##*/} $s sectors $((s * 512)) bytes"
done
for n in /sys/class/net/*; do
    [ "${n##*/}" = lo ] && continue
    echo "GUEST-NIC ${n##*/} $(cat "$n/address")"
done
echo GUEST-INIT-DONE
{end}
"""
# the guest powers off at once, or stays up until dom0 asks it to shut down: the
# kernel then runs /sbin/poweroff (orderly_poweroff), which powers off for real
GUEST_END = {"poweroff": "poweroff -f", "stay": "while :; do sleep 1; done"}
GUEST_POWEROFF = b"#!/bin/busybox sh\necho GUEST-SHUTDOWN-REQUESTED >/dev/console\nexec /bin/busybox poweroff -f\n"


def build_guest_initramfs(out: Path, pkgs: dict, wait_seconds: int = 20, end: str = "poweroff") -> Path:
    """The PV guest's initramfs (busybox, xen-blkfront, xen-netfront); ``end``:
    "poweroff" after its report, or "stay" up until shut down from dom0."""
    tree = _Tree()
    _merged_usr(tree)
    _busybox(tree)
    tree.file("usr/sbin/poweroff", GUEST_POWEROFF, 0o100755)
    _add_modules(tree, pkgs, GUEST_MODULES, "etc/guest-modules")
    init = GUEST_INIT.replace("{wait}", str(wait_seconds * 2)).replace("{end}", GUEST_END[end])
    tree.file("init", init.encode(), 0o100755)
    return tree.write(out)


# --- dom0 initramfs ----------------------------------------------------------------

LVM_CONF = """\
# No udev in this dom0: LVM makes the /dev nodes itself and waits for nobody.
devices { obtain_device_list_from_udev = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { use_lvmpolld = 0 locking_dir = "/run/lock/lvm" event_activation = 0 }
"""

DOM0_INIT = r"""#!/bin/busybox sh
# xenrun emulated-host dom0: start the Xen toolstack, run /etc/xenhost/script, power off.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:{libexec}
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/usr/lib/xen-4.17/lib/x86_64-linux-gnu
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# The hotplug scripts' lock loop needs /dev/stdin and /dev/fd.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs tmpfs /run
mkdir -p /run/xen /run/xenstored /run/lock/lvm /var/lib/xen /var/lib/xenstored /var/log/xen/console
echo "XENHOST-HYPERVISOR=$(cat /sys/hypervisor/type 2>/dev/null)"
for m in $(cat /etc/xenhost/modules); do insmod "$m" || echo "XENHOST-INSMOD-FAILED $m"; done
mount -t xenfs xenfs /proc/xen || echo "XENHOST-FAILED mount xenfs"
xenstored --pid-file=/run/xenstored.pid || echo "XENHOST-FAILED xenstored"
xen-init-dom0 || echo "XENHOST-FAILED xen-init-dom0"
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid || echo "XENHOST-FAILED xenconsoled"
ip link add xenbr0 type bridge && ip link set xenbr0 up || echo "XENHOST-FAILED xenbr0"
echo XENHOST-DOM0-READY
/bin/sh /etc/xenhost/script
echo "XENHOST-DONE rc=$?"
poweroff -f
"""


def build_dom0_initramfs(
    out: Path,
    pkgs: dict,
    script: str,
    files: Mapping[str, Path | bytes] | None = None,
    *,
    guest_initramfs: Path | None = None,
    tools_root: Path | None = None,
    host_tools: Iterable[str] = (),
) -> Path:
    """Write the dom0 initramfs to ``out`` and return it.

    ``script`` is run by /bin/sh (busybox ash, with bash, xl, lvm & co. on
    PATH) once xenstored, xen-init-dom0, xenconsoled (``--log=guest``) and
    bridge ``xenbr0`` are up.  ``files`` maps absolute dom0 paths to contents
    (bytes) or source files.  The guest kernel (``pkgs["vmlinuz"]``) is put
    at :data:`GUEST_KERNEL` and ``guest_initramfs`` (built with
    :func:`build_guest_initramfs` if None) at :data:`GUEST_RAMDISK`.
    ``host_tools``: more programs of this machine's (ssh ...), with their libraries.
    """
    tools_root = Path(tools_root) if tools_root else fetch_xen_tools()
    search = [tools_root / "usr/lib/x86_64-linux-gnu", tools_root / "lib/x86_64-linux-gnu",
              tools_root / "usr/lib/xen-4.17/lib/x86_64-linux-gnu"]
    tree = _Tree()
    _merged_usr(tree)
    _busybox(tree)
    for d in ("var/lib/xen/images", "var/log/xen", "etc/xen", "etc/lvm"):
        tree.dir(d)
    tree.link("var/run", "/run")
    tree.link("var/lock", "/run/lock")

    # Xen userspace: binaries plus the package libraries they pull in.
    for b in XEN_BINARIES:
        _add_with_libs(tree, tools_root / b.lstrip("/"), b, tools_root, search)
    for p in (tools_root / "usr/bin").glob("xenstore-*"):
        tree.link(f"usr/bin/{p.name}", "xenstore")  # multi-call binary
    for d in ("etc/xen",):
        for p in sorted((tools_root / d).rglob("*")):
            rel = str(p.relative_to(tools_root))
            if p.is_symlink():
                tree.link(rel, os.readlink(p))
            elif p.is_file():
                tree.file(rel, p.read_bytes(), p.stat().st_mode & 0o777 | 0o100000)
    _add_with_libs(tree, tools_root / LVM_BINARY.lstrip("/"), LVM_BINARY, tools_root, search)
    for cmd in LVM_COMMANDS:
        tree.link(f"usr/sbin/{cmd}", "lvm")
    tree.file("etc/lvm/lvm.conf", LVM_CONF.encode())

    for tool in (*HOST_TOOLS, *host_tools):
        found = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if not found:
            raise HarnessError(f"{tool} is not installed on this machine (needed by Xen's hotplug scripts)")
        real = Path(found).resolve()
        _add_with_libs(tree, real, f"/usr/bin/{tool}", tools_root, search)
    for lib in HOST_EXTRA_LIBS:
        tree.file(_usr(lib), Path(lib).resolve().read_bytes(), 0o100755)

    _add_modules(tree, pkgs, DOM0_MODULES, "etc/xenhost/modules")

    tree.file(GUEST_KERNEL, Path(pkgs["vmlinuz"]).read_bytes())
    if guest_initramfs is None:
        guest_initramfs = build_guest_initramfs(Path(out).parent / "guest-initrd.gz", pkgs)
    tree.file(GUEST_RAMDISK, Path(guest_initramfs).read_bytes())

    for path, content in (files or {}).items():
        if not path.startswith("/"):
            raise ValueError(f"dom0 file paths must be absolute: {path!r}")
        tree.file(path, content if isinstance(content, bytes) else Path(content).read_bytes(),
                  0o100755 if path.endswith(".sh") else 0o100644)
    tree.file("etc/xenhost/script", script.encode(), 0o100755)
    tree.file("init", DOM0_INIT.replace("{libexec}", XEN_LIBEXEC).encode(), 0o100755)
    # Most of the bytes (vmlinuz, gzip'd guest initramfs) are compressed already.
    return tree.write(out, level=1)


# --- booting --------------------------------------------------------------------------

MARKERS: tuple[tuple[str, str], ...] = (
    ("(XEN) Xen version", "xen started"),
    ("Booting kernel on Xen", "dom0 kernel"),
    ("Booting paravirtualized kernel on Xen", "dom0 kernel"),
    ("XENHOST-DOM0-READY", "dom0 ready"),
    ("XENHOST-XL-CREATE", "xl create"),
    # xl create returns once the domain is built and the hotplug scripts ran.
    ("XENHOST-XL-CREATE-RC=", "xl create returned"),
    ("XENHOST-GUEST-CONSOLE-BEGIN", "guest console"),
    ("XENHOST-DONE", "done"),
)
_FAILURES = (
    (re.compile(r"Panic on CPU \d+"), "Xen panicked"),
    (re.compile(r"Hardware Dom0 crashed"), "dom0 crashed"),
    (re.compile(r"Kernel panic - not syncing"), "dom0 kernel panicked"),
)
_GUEST_PREFIX = "GUEST| "
_DONE_RE = re.compile(r"XENHOST-DONE rc=(\d+)")


@dataclass
class HostBoot:
    """Outcome of :func:`boot_xen_host`; unpacks as ``ok, log, seconds``.

    ``ok``: dom0 ran its script to the end (``XENHOST-DONE``); ``script_rc``
    is the script's exit status.  ``marker_seconds``: when each of
    :data:`MARKERS` was first seen (seconds from QEMU start).
    """

    ok: bool
    log: str
    seconds: float
    marker_seconds: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    script_rc: int | None = None

    def __iter__(self) -> Iterator:
        return iter((self.ok, self.log, self.seconds))


def qemu_argv(xen: Path, kernel: Path, initramfs: Path, extra_drives: Iterable[Path] = (), *,
              xen_options: str = XEN_OPTIONS, dom0_options: str = DOM0_OPTIONS,
              memory_mb: int = MEMORY_MB, cpu: str = bootcheck.DEFAULT_CPU, smp: int = 2) -> list[str]:
    """QEMU argv for a direct multiboot boot of Xen with dom0 kernel + initramfs.
    Each of ``extra_drives`` (raw images) is a virtio disk: /dev/vda, vdb, ... in dom0."""
    def esc(p: Path) -> str:
        return str(p).replace(",", ",,")  # QEMU option syntax
    argv = [
        bootcheck.QEMU, "-accel", "tcg", "-machine", "pc", "-cpu", cpu, "-smp", str(smp),
        "-m", str(memory_mb),
        # No NIC, no VGA, no monitor: the guest network lives on xenbr0 inside.
        "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(xen), "-append", xen_options,
        # Multiboot modules: "file args,file" (commas in names doubled).
        "-initrd", f"{esc(kernel)} {dom0_options},{esc(initramfs)}",
    ]
    for d in extra_drives:
        argv += ["-drive", f"file={esc(Path(d))},format=raw,if=virtio"]
    return argv


def boot_xen_host(
    pkgs: dict,
    initramfs: Path,
    extra_drives: Iterable[Path] = (),
    timeout: float = 420.0,
    *,
    progress: Callable[[str, float], None] | None = None,
    **qemu_kw,
) -> HostBoot:
    """Boot Xen + dom0 (``initramfs`` from :func:`build_dom0_initramfs`) under
    QEMU and follow the console until dom0 says ``XENHOST-DONE``, a panic or
    crash, QEMU's exit or ``timeout``.  QEMU is always gone on return.
    ``progress(marker, seconds)`` is called as markers appear."""
    argv = qemu_argv(xen_elf(pkgs), Path(pkgs["vmlinuz"]), Path(initramfs), extra_drives, **qemu_kw)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []
    seen: dict[str, float] = {}
    reason = ""
    failed_at: float | None = None
    rc: int | None = None
    done = False
    in_guest = False
    pending = b""
    err = b""
    sel = bootcheck.watch_pipes(proc)
    try:
        open_streams = 2
        while open_streams and not done:
            now = time.monotonic() - start
            if failed_at is not None and now - failed_at > 2.0:
                break  # the failure's context lines had their chance
            if now >= timeout:
                reason = f"timeout after {timeout:g} s; last marker: {max(seen, key=seen.get) if seen else 'none'}"
                break
            for stream, chunk in bootcheck.read_pipes(sel, min(0.5, timeout - now)):
                if not chunk:
                    open_streams -= 1
                    continue
                if stream is proc.stderr:
                    err += chunk
                    continue
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    line = bootcheck._clean(raw.decode("utf-8", "replace"))
                    lines.append(line)
                    t = round(time.monotonic() - start, 2)
                    for text, name in MARKERS:
                        if name not in seen and text in line and not line.startswith(_GUEST_PREFIX):
                            seen[name] = t
                            if progress:
                                progress(name, t)
                    if "XENHOST-GUEST-CONSOLE-BEGIN" in line:
                        in_guest = True
                    elif "XENHOST-GUEST-CONSOLE-END" in line:
                        in_guest = False
                    m = _DONE_RE.search(line)
                    if m and failed_at is None:
                        rc, done = int(m.group(1)), True
                    # A guest's panic is reported inside its console dump: not ours.
                    if failed_at is None and not in_guest and not line.startswith(_GUEST_PREFIX):
                        for rx, what in _FAILURES:
                            if rx.search(line):
                                failed_at, reason = t, f"{what}: {line.strip()}"
        if not open_streams and not done and failed_at is None and not reason:
            reason = f"QEMU exited (status {proc.wait(timeout=5)}) before dom0 finished"
    finally:
        sel.close()
        bootcheck.kill_group(proc)
        for f in (proc.stdout, proc.stderr):
            f.close()
    if pending:
        lines.append(bootcheck._clean(pending.decode("utf-8", "replace")))
    log = "\n".join(lines)
    if err.strip():
        log += "\n--- qemu stderr ---\n" + err.decode("utf-8", "replace").strip()
        if not lines:
            reason += "\nqemu stderr: " + err.decode("utf-8", "replace").strip()[-1000:]
    ok = done and failed_at is None
    if ok:
        reason = f"dom0 finished its script (rc={rc})"
    return HostBoot(ok=ok, log=log, seconds=round(time.monotonic() - start, 2),
                    marker_seconds=seen, reason=reason, script_rc=rc)


# --- one guest, end to end ---------------------------------------------------------

# Run in dom0 after the caller's setup: create the guest, wait for it to end
# (its init powers off), dump its console log and the toolstack's logs.
RUN_GUEST_SCRIPT = r"""
echo XENHOST-XL-CREATE
logs=/var/log/xen/console/guest-*.log
# libxl gives a backend 10 s and a hotplug script 40 s (compiled in); on a
# loaded machine TCG can miss that, so a timeout (only) earns one more try.
attempt=1
while :; do
    xl create {cfg} >/tmp/xl-create.out 2>&1
    rc=$?
    cat /tmp/xl-create.out
    if [ $rc != 0 ] && [ $attempt -lt 2 ] && grep -qi -e 'timed out' -e timeout /tmp/xl-create.out; then
        echo "XENHOST-XL-CREATE-RETRY after timeout"
        attempt=$((attempt+1))
        for d in $(xl list 2>/dev/null | awk 'NR > 2 { print $1 }'); do xl destroy "$d"; done
        rm -f $logs
        continue
    fi
    break
done
echo "XENHOST-XL-CREATE-ATTEMPTS=$attempt"
echo "XENHOST-XL-CREATE-RC=$rc"
if [ $rc = 0 ]; then
    i=0
    while [ $i -lt {wait} ]; do
        grep -qs -e GUEST-INIT-DONE -e 'Kernel panic - not syncing' $logs && break
        # Every 5 s (xl is slow under TCG): only the header and Domain-0
        # left means the guest is gone (shut down or crashed).
        if [ $((i % 5)) = 4 ] && [ "$(xl list 2>/dev/null | wc -l)" -le 2 ]; then break; fi
        sleep 1
        i=$((i+1))
    done
    sleep 1
fi
echo XENHOST-GUEST-CONSOLE-BEGIN
for f in $logs; do
    [ -f "$f" ] && sed 's/^/GUEST| /' "$f"
done
echo XENHOST-GUEST-CONSOLE-END
if ! grep -qs GUEST-INIT-DONE $logs; then
    xl list
    for f in /var/log/xen/*.log; do
        [ -f "$f" ] && { echo "--- $f"; cat "$f"; }
    done
    # No `xl destroy` of a stuck guest: its hotplug scripts take tens of
    # seconds under TCG, and dom0's poweroff ends the whole machine anyway.
fi
exit $rc
"""

_DISK_RE = re.compile(r"^GUEST-DISK (\S+) (\d+) sectors (\d+) bytes")
_NIC_RE = re.compile(r"^GUEST-NIC (\S+) (\S+)")


@dataclass
class GuestRun:
    """Outcome of :func:`run_guest`.

    ``ok``: the guest's init ran to its end (``GUEST-INIT-DONE``).
    ``guest_console``: the guest's console log as xenconsoled wrote it in dom0.
    ``disks`` (name -> bytes) and ``nics`` (name -> MAC) are what the guest saw.
    """

    ok: bool
    guest_console: str
    dom0_log: str
    seconds: float
    host: HostBoot | None = None
    xl_create_rc: int | None = None
    xl_create_attempts: int = 0
    disks: dict[str, int] = field(default_factory=dict)
    nics: dict[str, str] = field(default_factory=dict)

    def problems(self, disk: str | None = "xvda", disk_bytes: int | None = None,
                 mac: str | None = None) -> list[str]:
        """What is wrong compared with the expectation (empty list: all fine)."""
        out = []
        if self.host is not None and not self.host.ok:
            out.append(f"host run failed: {self.host.reason}")
        if self.xl_create_rc not in (0, None):
            out.append(f"xl create exited with {self.xl_create_rc}")
        if not self.ok:
            out.append("guest init did not finish (no GUEST-INIT-DONE on its console)")
        if disk and disk not in self.disks:
            out.append(f"guest saw no disk {disk} (disks: {self.disks})")
        elif disk and disk_bytes is not None and self.disks[disk] != disk_bytes:
            out.append(f"guest disk {disk} has {self.disks[disk]} bytes, expected {disk_bytes}")
        if mac and mac.lower() not in (m.lower() for m in self.nics.values()):
            out.append(f"guest saw no NIC with MAC {mac} (NICs: {self.nics})")
        return out


def guest_script(dom0_setup: str = "", guest_wait_seconds: int = 150, cfg: str = GUEST_CONFIG) -> str:
    """The dom0 script of :func:`run_guest`: ``dom0_setup`` (traced with set -x),
    then ``xl create cfg``, wait for the guest, dump its console."""
    return ("set -x\n" + dom0_setup + "\nset +x\n" +
            RUN_GUEST_SCRIPT.replace("{cfg}", shlex.quote(cfg)).replace("{wait}", str(guest_wait_seconds)))


def parse_guest_console(dom0_log: str) -> str:
    return "\n".join(l[len(_GUEST_PREFIX):] for l in dom0_log.splitlines() if l.startswith(_GUEST_PREFIX))


def run_guest(
    pkgs: dict,
    xl_cfg_text: str,
    guest_files: Mapping[str, Path | bytes] | None = None,
    dom0_setup: str = "",
    extra_drives: Iterable[Path] = (),
    *,
    workdir: Path | None = None,
    timeout: float = 480.0,
    guest_wait_seconds: int = 150,
    progress: Callable[[str, float], None] | None = None,
    **qemu_kw,
) -> GuestRun:
    """Boot an emulated Xen host and ``xl create`` a PV guest in it.

    ``xl_cfg_text`` lands at /etc/xen/guest.cfg in dom0; it may use
    :data:`GUEST_KERNEL` and :data:`GUEST_RAMDISK` (the same Debian kernel
    and the reporting initramfs).  ``guest_files`` are extra dom0 files
    (absolute path -> bytes or source file), ``dom0_setup`` shell commands run
    before ``xl create`` (make disk images, volume groups, ...), and
    ``extra_drives`` raw images given to QEMU as /dev/vda, /dev/vdb, ...;
    ``qemu_kw`` go to :func:`qemu_argv` (``cpu=``, ``memory_mb=``).
    """
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="xenhost-")
        workdir = Path(own_tmp.name)
    try:
        workdir = Path(workdir)
        files = dict(guest_files or {})
        files[GUEST_CONFIG] = xl_cfg_text.encode()
        script = guest_script(dom0_setup, guest_wait_seconds)
        initrd = build_dom0_initramfs(workdir / "dom0-initrd.gz", pkgs, script, files)
        host = boot_xen_host(pkgs, initrd, extra_drives, timeout, progress=progress, **qemu_kw)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    console = parse_guest_console(host.log)
    rc = re.search(r"XENHOST-XL-CREATE-RC=(\d+)", host.log)
    attempts = re.search(r"XENHOST-XL-CREATE-ATTEMPTS=(\d+)", host.log)
    disks = {d.group(1): int(d.group(3)) for d in map(_DISK_RE.match, console.splitlines()) if d}
    nics = {n.group(1): n.group(2) for n in map(_NIC_RE.match, console.splitlines()) if n}
    return GuestRun(
        ok=host.ok and "GUEST-INIT-DONE" in console,
        guest_console=console, dom0_log=host.log, seconds=host.seconds, host=host,
        xl_create_rc=int(rc.group(1)) if rc else None,
        xl_create_attempts=int(attempts.group(1)) if attempts else 0, disks=disks, nics=nics,
    )
