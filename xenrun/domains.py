"""Guests (domU): domain specs in domains.toml, checked before anything runs, and the
guest media xenrun reads without mounting (an ISO's label and files, a guest disk's
mkinitcpio.conf).

Shape of domains.toml (beside plugins.toml; see examples/domains.toml)::

    [defaults]                 any domain key, for every domain below
    [domain.NAME]              one guest: type = "pv" | "pvh" | "hvm", memory, vcpus, host(s),
                               iso, kernel/ramdisk/extra, bootloader, iso_boot, autostart
    [[domain.NAME.disks]]      backend = "image" | "lvm" | "phy", size, vdev, ...
    [[domain.NAME.vif]]        bridge, mac
    [domain.NAME.vnc]          HVM display: listen, display, password

Every error is a ConfigError naming file, line and key, like plugins.toml's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import re
import struct
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from xenrun import settings as check
from xenrun.config import KeyLines, parse_toml
from xenrun.errors import ConfigError

XEN_OUI = "00:16:3e"  # the MAC block reserved for Xen guests (S17)
DEFAULT_BRIDGE = "xenbr0"
DEFAULT_BOOT_DIR = "/var/lib/xen/boot"
CONFIG_DIR = "/etc/xen"
AUTO_DIR = "/etc/xen/auto"
BACKENDS = ("image", "lvm", "phy")
# where Arch ISOs keep the PV kernel and initramfs: the article's (2013) names first,
# then today's; the first one the ISO holds is used
ISO_KERNELS = ("/arch/boot/x86_64/vmlinuz", "/arch/boot/x86_64/vmlinuz-linux")
ISO_RAMDISKS = ("/arch/boot/x86_64/archiso.img", "/arch/boot/x86_64/initramfs-linux.img")
GUEST_MODULES = ("xen-blkfront", "xen-fbfront", "xen-netfront", "xen-kbdfront")  # S20

_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_VDEV = re.compile(r"(?:xvd|sd|hd|vd)[a-z]{1,2}[0-9]{0,2}")
_ISO_VDEV = re.compile(r"(?:xvd|sd|hd|vd)[a-z]{1,2}[0-9]{0,2}(?::cdrom)?")
# values that end up inside a quoted xl string: printable, no quotes or backslashes
_XL_TEXT = re.compile(r"[^'\"\\\x00-\x1f\x7f]*")

DOMAIN_KEYS = ("host", "type", "memory", "vcpus", "disks", "vif", "iso", "iso_vdev", "kernel", "ramdisk",
               "extra", "bootloader", "iso_boot", "iso_kernel", "iso_ramdisk", "vnc", "allow_open_vnc",
               "autostart", "boot_dir")
MAX_DISKS = 16  # xvda..xvdp: beyond, xl and the guest's kernel name disks in ways plans cannot tell apart
DISK_KEYS = ("backend", "size", "vdev", "path", "vg", "lv", "device", "grow", "access")
VIF_KEYS = ("bridge", "mac")
VNC_KEYS = ("listen", "display", "password")


# -- the spec --------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskSpec:
    """One guest disk. ``backend`` names the plugin that makes it (image, lvm) or
    "phy" for an existing device; ``key`` is its place in domains.toml (for errors)."""

    backend: str
    vdev: str
    size: int | None = None
    path: str | None = None  # image: the file (default: the image plugin's folder)
    vg: str | None = None  # lvm: the volume group (default: the lvm plugin's vg)
    lv: str | None = None  # lvm: the volume's name (default: NAME or NAME-VDEV)
    device: str | None = None  # phy: an existing block device or partition
    grow: bool = False  # image: grow an existing, smaller image
    access: str = "w"
    key: str = ""


@dataclass(frozen=True)
class Vif:
    mac: str
    bridge: str = DEFAULT_BRIDGE


@dataclass(frozen=True)
class Vnc:
    listen: str = "127.0.0.1"  # safer than the article's 0.0.0.0 (S18)
    display: int | None = None
    password: str | None = None


@dataclass(frozen=True)
class Domain:
    """One validated guest spec. ``error(key, message)`` makes the file:line error
    for a value that is well-formed but wrong for the host (found while planning)."""

    name: str
    type: str  # "pv", "pvh" (PV drivers in an HVM container, no device model) or "hvm"
    memory_mib: int
    disks: tuple[DiskSpec, ...]
    vifs: tuple[Vif, ...]
    vcpus: int | None = None
    hosts: tuple[str, ...] = ()
    iso: str | None = None
    iso_vdev: str | None = None
    kernel: str | None = None
    ramdisk: str | None = None
    extra: str | None = None
    bootloader: str | None = None
    iso_boot: bool = False  # PV install: kernel and initramfs taken from the ISO
    iso_kernel: str | None = None
    iso_ramdisk: str | None = None
    vnc: Vnc | None = None
    allow_open_vnc: bool = False
    autostart: bool = False
    boot_dir: str = DEFAULT_BOOT_DIR
    source: "DomainFile | None" = field(default=None, compare=False, repr=False)

    @property
    def config_path(self) -> str:
        return f"{CONFIG_DIR}/{self.name}.cfg"

    @property
    def auto_path(self) -> str:
        return f"{AUTO_DIR}/{self.name}.cfg"

    @property
    def guest_boot_dir(self) -> str:
        return f"{self.boot_dir}/{self.name}"

    def for_host(self, host: str) -> bool:
        return not self.hosts or host in self.hosts

    def finished(self) -> "Domain":
        """The spec after the PV installation (S21): boot through pygrub, no ISO."""
        return replace(self, kernel=None, ramdisk=None, extra=None, iso_boot=False, iso=None,
                       bootloader="pygrub")

    def error(self, key: str, message: str) -> ConfigError:
        if self.source is None:
            return ConfigError("<domain>", f"domain.{self.name}.{key}", message)
        return self.source.error(("domain", self.name) + tuple(key.split(".")), message)


@dataclass(frozen=True)
class DomainDisk:
    """What a disk plugin answers for one disk (create_domain): the Changes that
    make the disk, the xl ``disk=`` entry, and notes for the plan (such as "free
    space unknown")."""

    changes: tuple = ()
    entry: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "changes", tuple(self.changes))
        object.__setattr__(self, "notes", tuple(self.notes))
        if not self.entry or "'" in self.entry or '"' in self.entry or "\n" in self.entry:
            raise ValueError(f"DomainDisk: entry must be a non-empty xl disk spec without quotes, got {self.entry!r}")


# -- reading domains.toml --------------------------------------------------------------

class _Lines(KeyLines):
    """KeyLines that also tells apart the items of ``[[domain.X.disks]]``: the
    second disk's keys are found under ("domain", "X", "disks", "1", key)."""

    def __init__(self, text: str):
        self.lines: dict[tuple[str, ...], int] = {}
        counts: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            if m := self._HEADER.match(line):
                table = self._split(m.group(1))
                for n in range(1, len(table)):  # [a.b] also places a table "a" never written alone
                    self.lines.setdefault(table[:n], number)
                if line.lstrip().startswith("[["):
                    counts[table] = counts.get(table, -1) + 1
                    self.lines.setdefault(table, number)
                    table = table + (str(counts[table]),)
                self.lines.setdefault(table, number)
            elif m := self._KEY.match(line):
                self.lines.setdefault(table + self._split(m.group(1)), number)


@dataclass
class DomainFile:
    file: Path | None
    data: dict
    lines: KeyLines

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        key = ".".join(path)
        key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)  # disks.1.size -> disks[1].size
        return ConfigError(self.file or "<domains>", key, message, self.lines.find(path))


def load_domains(path: str | Path | None, site_hosts: list[str] | None = None) -> list[Domain]:
    """Read and check a domains.toml. ``path`` None or missing: no domains. Names
    are checked to be unique and MACs unique per host; ``site_hosts`` (the hosts
    plugins.toml names) makes an unknown ``host`` an error."""
    if path is None:
        return []
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    return parse_domains(text, path.resolve(), site_hosts)


def parse_domains(text: str, file: Path | None = None, site_hosts: list[str] | None = None) -> list[Domain]:
    data = parse_toml(text, file or "<domains>")
    src = DomainFile(file, data, _Lines(text))
    for key in data:
        if key not in ("defaults", "domain"):
            raise src.error((key,), "unknown table (known: defaults, domain)")
        if not isinstance(data[key], dict):
            raise src.error((key,), f"must be a table, as [{key}]")
    defaults = data.get("defaults", {})
    for key in defaults:
        if key not in DOMAIN_KEYS:
            raise src.error(("defaults", key), f"unknown key (known: {', '.join(DOMAIN_KEYS)})")
    domains = []
    for name, table in data.get("domain", {}).items():
        where = ("domain", name)
        try:
            check.name(name)
        except ValueError as e:
            raise src.error(where, str(e)) from None
        if not isinstance(table, dict):
            raise src.error(where, "must be a table, as [domain.NAME]")
        domains.append(_domain(src, name, defaults, table, site_hosts))
    _check_unique(src, domains)
    return domains


def _domain(src: DomainFile, name: str, defaults: dict, table: dict, site_hosts) -> Domain:
    where = ("domain", name)
    origin = {k: ("defaults", k) for k in defaults}
    origin.update({k: where + (k,) for k in table})
    values = {**defaults, **table}

    def err(key: str, message: str) -> ConfigError:
        return src.error(origin.get(key, where + (key,)), message)

    def get(key: str, fn: Callable[[Any], Any], default=None):
        if key not in values:
            return default
        try:
            return fn(values[key])
        except ValueError as e:
            raise err(key, str(e)) from None

    for key in values:
        if key not in DOMAIN_KEYS:
            raise err(key, f"unknown key (known: {', '.join(DOMAIN_KEYS)})")
    if "type" not in values:
        raise src.error(where, 'type is missing: "pv", "pvh" or "hvm"')
    kind = get("type", check.choice("pv", "pvh", "hvm"))
    hosts = get("host", _hosts, ())
    if site_hosts:
        for h in hosts:
            if h not in site_hosts:
                raise err("host", f"no host {h!r} in plugins.toml (hosts: {', '.join(site_hosts)})")
    memory = get("memory", _memory, 512)
    vcpus = get("vcpus", check.positive_int)
    iso = get("iso", check.absolute_path)
    text = lambda v: _xl_text(v)  # noqa: E731
    boot = {k: get(k, text) for k in ("kernel", "ramdisk", "extra", "bootloader")}
    for k in ("kernel", "ramdisk"):
        if boot[k] is not None:
            get(k, check.absolute_path)
    iso_boot = get("iso_boot", check.boolean, False)
    iso_kernel = get("iso_kernel", check.absolute_path)
    iso_ramdisk = get("iso_ramdisk", check.absolute_path)
    if kind == "hvm":
        for k in ("kernel", "ramdisk", "extra", "bootloader", "iso_boot", "iso_kernel", "iso_ramdisk"):
            if k in values:
                raise err(k, "an HVM guest boots from its disk or ISO through its own firmware;"
                             " kernel, ramdisk, extra, bootloader and iso_boot are for PV guests")
    elif kind == "pvh":
        for k in ("bootloader", "iso_boot", "iso_kernel", "iso_ramdisk", "vnc"):
            if k in values:
                raise err(k, "a PVH guest boots its kernel directly (kernel, ramdisk, extra); pygrub, iso_boot"
                             " and vnc are for PV or HVM guests")
        if not boot["kernel"]:
            raise src.error(where, "a PVH guest needs kernel (with ramdisk and extra): it boots it directly")
    else:
        if "vnc" in values:
            raise err("vnc", "vnc is for HVM guests (a PV guest has a text console: xl console)")
        if boot["bootloader"] is not None and boot["bootloader"] != "pygrub":
            raise err("bootloader", f"{boot['bootloader']!r}: the article's PV guests boot with \"pygrub\"")
        ways = [k for k in ("kernel", "bootloader", "iso_boot") if values.get(k)]
        if len(ways) > 1:
            raise err(ways[1], f"give one way to boot a PV guest, not {' and '.join(ways)}")
        if not ways:
            raise src.error(where, "a PV guest needs a way to boot: kernel (with ramdisk and extra),"
                                   ' bootloader = "pygrub", or iso_boot = true to install from its iso (S19)')
        if (boot["ramdisk"] or boot["extra"]) and not boot["kernel"]:
            raise err("ramdisk" if boot["ramdisk"] else "extra", "needs kernel (ramdisk and extra go with a kernel)")
        if iso_boot and not iso:
            raise err("iso_boot", "needs iso: the kernel and initramfs are taken from the installation ISO")
        if (iso_kernel or iso_ramdisk) and not iso_boot:
            raise err("iso_kernel" if iso_kernel else "iso_ramdisk", "only with iso_boot = true")
    iso_vdev = get("iso_vdev", _iso_vdev)
    if iso_vdev and not iso:
        raise err("iso_vdev", "only with iso")
    disks = _disks(src, name, values.get("disks"), origin.get("disks", where + ("disks",)))
    taken = [d.vdev for d in disks]
    if iso:
        iso_vdev = iso_vdev or ("hdc:cdrom" if kind == "hvm" else _next_vdev(taken))
        if iso_vdev.split(":")[0] in taken:
            raise err("iso_vdev", f"{iso_vdev} is also a disk's vdev")
    vifs = _vifs(src, name, values.get("vif"), origin.get("vif", where + ("vif",)))
    vnc = None
    if kind == "hvm":
        vnc = _vnc(src, values.get("vnc", {}), origin.get("vnc", where + ("vnc",)),
                   get("allow_open_vnc", check.boolean, False))
    return Domain(
        name=name, type=kind, memory_mib=memory, disks=disks, vifs=vifs, vcpus=vcpus, hosts=hosts,
        iso=iso, iso_vdev=iso_vdev if iso else None, kernel=boot["kernel"], ramdisk=boot["ramdisk"],
        extra=boot["extra"], bootloader=boot["bootloader"], iso_boot=iso_boot, iso_kernel=iso_kernel,
        iso_ramdisk=iso_ramdisk, vnc=vnc, allow_open_vnc=get("allow_open_vnc", check.boolean, False),
        autostart=get("autostart", check.boolean, False),
        boot_dir=get("boot_dir", check.absolute_path, DEFAULT_BOOT_DIR), source=src)


def _disks(src: DomainFile, name: str, raw, where: tuple[str, ...]) -> tuple[DiskSpec, ...]:
    if raw is None:
        raise src.error(where[:2], "disks is missing: give at least one disk, as [[domain.NAME.disks]] (S16)")
    if not isinstance(raw, list) or not raw:
        raise src.error(where, "must be a list of disk tables, as [[domain.NAME.disks]]")
    if len(raw) > MAX_DISKS:
        raise src.error(where, f"{len(raw)} disks: a domain takes at most {MAX_DISKS} (xvda to xvd{chr(96 + MAX_DISKS)})")
    out: list[DiskSpec] = []
    for i, item in enumerate(raw):
        at = where + (str(i),)
        if not isinstance(item, dict):
            raise src.error(at, "must be a table with backend, size, ...")

        def get(key, fn, default=None, item=item, at=at):
            if key not in item:
                return default
            try:
                return fn(item[key])
            except ValueError as e:
                raise src.error(at + (key,), str(e)) from None
        for key in item:
            if key not in DISK_KEYS:
                raise src.error(at + (key,), f"unknown disk key (known: {', '.join(DISK_KEYS)})")
        backend = get("backend", check.choice(*BACKENDS), "image")
        vdev = get("vdev", _vdev) or _next_vdev([d.vdev for d in out])
        if vdev in [d.vdev for d in out]:
            raise src.error(at + ("vdev",), f"{vdev} is already another disk's vdev")
        size = get("size", check.size)
        allowed = {"image": {"size", "path", "grow"}, "lvm": {"size", "vg", "lv"}, "phy": {"device"}}[backend]
        for key in ("size", "path", "grow", "vg", "lv", "device"):
            if key in item and key not in allowed:
                raise src.error(at + (key,), f"not a key of a {backend!r} disk (its keys: {', '.join(sorted(allowed))})")
        if backend in ("image", "lvm") and size is None:
            raise src.error(at, f"size is missing: an {backend} disk needs a size such as \"10G\"")
        if backend == "phy" and "device" not in item:
            raise src.error(at, "device is missing: a phy disk is an existing device such as \"/dev/sdb1\"")
        lv = get("lv", check.name)
        if backend == "lvm" and lv is None:
            lv = name if not out else f"{name}-{vdev}"
        out.append(DiskSpec(
            backend=backend, vdev=vdev, size=size, path=get("path", _disk_path), vg=get("vg", check.name),
            lv=lv, device=get("device", check.absolute_path), grow=get("grow", check.boolean, False),
            access=get("access", check.choice("w", "r"), "w"),
            key=f"disks.{i}"))
    return tuple(out)


def _disk_path(value) -> str:
    """An image's own path: absolute, and nothing xl's disk spec would read as a
    separator or a quote."""
    path = check.absolute_path(value)
    if any(c in path for c in ",'\" \t") or path.endswith("/"):
        raise ValueError(f"{path!r} cannot be a disk image's path: no commas, quotes, spaces or trailing '/'")
    return path


def _vifs(src: DomainFile, name: str, raw, where: tuple[str, ...]) -> tuple[Vif, ...]:
    if raw is None:
        return (Vif(mac="", bridge=DEFAULT_BRIDGE),)  # the MAC is filled in per host
    if not isinstance(raw, list):
        raise src.error(where, "must be a list of tables, as [[domain.NAME.vif]]")
    out = []
    for i, item in enumerate(raw):
        at = where + (str(i),)
        if not isinstance(item, dict):
            raise src.error(at, "must be a table with bridge and mac")
        for key in item:
            if key not in VIF_KEYS:
                raise src.error(at + (key,), f"unknown vif key (known: {', '.join(VIF_KEYS)})")
        try:
            bridge = check.interface(item.get("bridge", DEFAULT_BRIDGE))
        except ValueError as e:
            raise src.error(at + ("bridge",), str(e)) from None
        mac = item.get("mac", "")
        if mac != "" and mac != "random":
            try:
                mac = xen_mac(mac)
            except ValueError as e:
                raise src.error(at + ("mac",), str(e)) from None
        out.append(Vif(mac=mac, bridge=bridge))
    return tuple(out)


def _vnc(src: DomainFile, raw, where: tuple[str, ...], allow_open: bool) -> Vnc:
    if not isinstance(raw, dict):
        raise src.error(where, "must be a table, as [domain.NAME.vnc]")
    for key in raw:
        if key not in VNC_KEYS:
            raise src.error(where + (key,), f"unknown vnc key (known: {', '.join(VNC_KEYS)})")
    listen = raw.get("listen", "127.0.0.1")
    try:
        check.ipv4_address(listen) if ":" not in str(listen) else ipaddress.ip_address(listen)
    except ValueError:
        raise src.error(where + ("listen",), f"{listen!r} is not an IP address") from None
    display = raw.get("display")
    if display is not None and (isinstance(display, bool) or not isinstance(display, int) or not 0 <= display <= 99):
        raise src.error(where + ("display",), f"expected a display number 0-99 (port 5900+N), got {display!r}")
    password = raw.get("password")
    if password is not None:
        if not isinstance(password, str) or not password or not _XL_TEXT.fullmatch(password):
            raise src.error(where + ("password",), "must be a non-empty string without quotes, backslashes"
                                                   " or control characters")
    if not is_loopback(listen) and not password and not allow_open:
        raise src.error(where + ("listen",), f"VNC on {listen} without a password lets anyone on the network"
                                             " take the guest's screen (the article warns its example is unsafe):"
                                             " set a password, listen on 127.0.0.1, or set allow_open_vnc = true")
    return Vnc(listen=listen, display=display, password=password)


def _check_unique(src: DomainFile, domains: list[Domain]) -> None:
    """Per host: names (TOML already refuses a table twice; case-folded here, since
    file systems and LVM may fold), MACs, VNC displays, image paths and LVs."""
    seen: dict[str, str] = {}
    for d in domains:
        folded = d.name.lower()
        if folded in seen:
            raise d.error("type", f"domain {seen[folded]!r} differs only in letter case; names must be unique")
        seen[folded] = d.name
    for i, a in enumerate(domains):
        for b in domains[:i]:
            if a.hosts and b.hosts and not set(a.hosts) & set(b.hosts):
                continue  # never on the same host
            macs = {v.mac for v in b.vifs if v.mac not in ("", "random")}
            for j, v in enumerate(a.vifs):
                if v.mac in macs:
                    raise a.error(f"vif.{j}.mac", f"{v.mac} is also domain {b.name!r}'s MAC; MACs must be unique")
            if a.vnc and b.vnc and a.vnc.display is not None and a.vnc.display == b.vnc.display:
                raise a.error("vnc.display", f"display {a.vnc.display} is also domain {b.name!r}'s (port 590N)")
            for j, disk in enumerate(a.disks):
                for other in b.disks:
                    same = ((disk.path and disk.path == other.path) or
                            (disk.device and disk.device == other.device) or
                            (disk.backend == other.backend == "lvm" and disk.lv == other.lv and disk.vg == other.vg))
                    if same:
                        raise a.error(f"disks.{j}", f"the same disk as domain {b.name!r}'s")
    for d in domains:
        macs = [v.mac for v in d.vifs if v.mac not in ("", "random")]
        for j, v in enumerate(d.vifs):
            if v.mac and macs.count(v.mac) > 1 and macs.index(v.mac) < j:
                raise d.error(f"vif.{j}.mac", f"{v.mac} is given twice")


# -- value checks ----------------------------------------------------------------------

def _hosts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (check.name(value),)
    if isinstance(value, list) and value:
        return tuple(check.name(v) for v in value)
    raise ValueError(f"expected a host name or a list of them, got {check._kind(value)}")


def _memory(value: Any) -> int:
    """Guest memory in MiB, from "256M", "1G" or a number of MiB (xl's unit)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        nbytes = check.size(value)
        if nbytes % (1 << 20):
            raise ValueError(f"{value!r} is not a whole number of MiB (xl counts memory in MiB)")
        n = nbytes >> 20
    if n < 32:
        raise ValueError(f"{value!r} is too little memory for a guest (at least 32M)")
    return n


def _vdev(value: Any) -> str:
    if not isinstance(value, str) or not _VDEV.fullmatch(value):
        raise ValueError(f"{value!r} is not a virtual disk name such as xvda, xvdb or sda1")
    return value


def _iso_vdev(value: Any) -> str:
    if not isinstance(value, str) or not _ISO_VDEV.fullmatch(value):
        raise ValueError(f"{value!r} is not a virtual disk name such as xvdb or hdc:cdrom")
    return value


def _xl_text(value: Any) -> str:
    if not isinstance(value, str) or not value or not _XL_TEXT.fullmatch(value):
        raise ValueError("must be a non-empty string without quotes, backslashes or control characters")
    return value


def _next_vdev(taken: list[str]) -> str:
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vdev = f"xvd{letter}"
        if vdev not in taken:
            return vdev
    raise ValueError("too many disks")


def xen_mac(value: Any) -> str:
    """A MAC in Xen's block 00:16:3e, lower case."""
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        raise ValueError(f"{value!r} is not a MAC address such as 00:16:3e:12:34:56")
    mac = value.lower()
    if not mac.startswith(XEN_OUI + ":"):
        raise ValueError(f"{value} is outside Xen's block {XEN_OUI} (S17): use {XEN_OUI}:XX:XX:XX")
    return mac


def derived_mac(name: str, taken: set[str], salt: str = "") -> str:
    """A MAC derived from the guest's name, so a re-run gives the same one; the next
    free one when another guest has it already."""
    for n in range(1000):
        digest = hashlib.sha256(f"xenrun:{salt}:{name}:{n}".encode()).digest()
        mac = f"{XEN_OUI}:{digest[0]:02x}:{digest[1]:02x}:{digest[2]:02x}"
        if mac not in taken:
            return mac
    raise ValueError(f"no free MAC for {name}")


def random_mac(taken: set[str]) -> str:
    while True:
        mac = f"{XEN_OUI}:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
        if mac not in taken:
            return mac


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# -- ISO 9660: the label and files of an installation ISO, without mounting ---------------

SECTOR = 2048


class Iso9660:
    """Reads an ISO 9660 image through ``read_at(offset, length) -> bytes``.
    Names are matched through Rock Ridge (NM) when present, else through the plain
    ISO name (upper case, ";1" dropped), case-insensitively."""

    def __init__(self, read_at: Callable[[int, int], bytes]):
        self.read_at = read_at
        pvd = read_at(16 * SECTOR, SECTOR)
        if len(pvd) < SECTOR or pvd[0] != 1 or pvd[1:6] != b"CD001":
            raise ValueError("not an ISO 9660 image (no primary volume descriptor at sector 16)")
        self.pvd = pvd

    @property
    def label(self) -> str:
        """The volume identifier (bytes 40..72 of the primary volume descriptor):
        what archiso puts in archisolabel=."""
        return self.pvd[40:72].decode("ascii", errors="replace").strip()

    def _records(self, extent: int, length: int):
        data = self.read_at(extent * SECTOR, length)
        pos = 0
        while pos < len(data):
            size = data[pos]
            if size == 0:  # records never cross a sector: skip to the next one
                pos = (pos // SECTOR + 1) * SECTOR
                continue
            rec = data[pos:pos + size]
            pos += size
            if len(rec) < 34:
                break
            name_len = rec[32]
            raw = rec[33:33 + name_len]
            if raw in (b"\x00", b"\x01"):
                continue  # . and ..
            use = rec[33 + name_len + (1 - name_len % 2):]
            name = _rock_ridge_name(use) or raw.decode("ascii", errors="replace").split(";")[0].rstrip(".")
            yield name, struct.unpack_from("<I", rec, 2)[0], struct.unpack_from("<I", rec, 10)[0], bool(rec[25] & 2)

    def find(self, path: str) -> tuple[int, int] | None:
        """(offset, size) in bytes of the file at ``path`` inside the ISO, or None."""
        root = self.pvd[156:156 + 34]
        extent, length, is_dir = struct.unpack_from("<I", root, 2)[0], struct.unpack_from("<I", root, 10)[0], True
        for part in [p for p in path.split("/") if p]:
            if not is_dir:
                return None
            for name, ext, size, folder in self._records(extent, length):
                if name.lower() == part.lower():
                    extent, length, is_dir = ext, size, folder
                    break
            else:
                return None
        return None if is_dir else (extent * SECTOR, length)

    def read(self, path: str) -> bytes | None:
        found = self.find(path)
        return None if found is None else self.read_at(*found)


def _rock_ridge_name(use: bytes) -> str | None:
    """The NM (alternate name) entry of a record's System Use area, if any."""
    pos, parts = 0, []
    while pos + 4 <= len(use):
        sig, length = use[pos:pos + 2], use[pos + 2]
        if length < 4:
            break
        if sig == b"NM":
            flags = use[pos + 4]
            if flags & 0x06:  # "." or ".." names
                return None
            parts.append(use[pos + 5:pos + length].decode("utf-8", errors="replace"))
            if not flags & 0x01:  # no continuation
                break
        elif sig == b"ST":
            break
        pos += length
    return "".join(parts) or None


def iso_reader(target, path: str) -> Iso9660:
    """An Iso9660 over a file of the target. On a local target (the machine or a
    --root folder) only the sectors needed are read; elsewhere the whole file."""
    host_path = target.local_path(path)
    if host_path is not None:

        def read_at(offset: int, length: int) -> bytes:
            with open(host_path, "rb") as f:
                f.seek(offset)
                return f.read(length)
        return Iso9660(read_at)
    data = target.read(path)
    if data is None:
        raise FileNotFoundError(path)
    return Iso9660(lambda offset, length: data[offset:offset + length])


def archiso_extra(label: str) -> str:
    """The kernel line the article gives a PV install from an Arch ISO (S19)."""
    return f"archisobasedir=arch archisolabel={label}"


# -- the guest's own disk: its mkinitcpio.conf, without mounting (S20, S26) ----------------

def mkinitcpio_missing(text: str) -> list[str]:
    """The Xen front-end modules (S20) the MODULES=(...) line of a guest's
    mkinitcpio.conf lacks. Comments ignored; the last MODULES line wins."""
    modules: list[str] = []
    joined = re.sub(r"#[^\n]*", "", text)
    for m in re.finditer(r"^\s*MODULES\s*=\s*(\(([^)]*)\)|\"([^\"]*)\"|'([^']*)'|(\S*))", joined, re.M):
        body = next(g for g in m.groups()[1:] if g is not None)
        modules = [w.strip("\"'") for w in body.split()]
    have = {m.replace("_", "-") for m in modules}
    return [m for m in GUEST_MODULES if m not in have]


def partition_offsets(head: bytes) -> list[int]:
    """Byte offsets of the partitions of a disk image, from its MBR or GPT (first
    34 sectors); [0] when it has no partition table (a bare filesystem)."""
    if len(head) >= 1024 and head[512:520] == b"EFI PART":
        start, count, size = struct.unpack_from("<QII", head, 512 + 72)
        offsets = []
        for i in range(min(count, 128)):
            pos = start * 512 + i * size
            if pos + 48 > len(head):
                break
            if head[pos:pos + 16] != b"\0" * 16:
                offsets.append(struct.unpack_from("<Q", head, pos + 32)[0] * 512)
        return offsets or [0]
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        offsets = []
        for i in range(4):
            entry = head[446 + 16 * i:462 + 16 * i]
            kind, lba = entry[4], struct.unpack_from("<I", entry, 8)[0]
            if kind and lba and kind not in (0x05, 0x0F, 0x85, 0xEE):
                offsets.append(lba * 512)
        return offsets or [0]
    return [0]


def read_guest_file(image: str | Path, path: str) -> bytes | None:
    """A file of the guest's ext2/3/4 root filesystem inside a disk image on this
    machine, read with debugfs (e2fsprogs): no mount, no root needed. None when no
    partition of the image holds it (or debugfs is missing)."""
    try:
        with open(image, "rb") as f:
            head = f.read(34 * 512)
    except OSError:
        return None
    for offset in partition_offsets(head):
        spec = f"{image}?offset={offset}" if offset else str(image)
        try:
            p = subprocess.run(["debugfs", "-R", f"cat {path}", spec], capture_output=True, timeout=60,
                               env={**os.environ, "LC_ALL": "C"})
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        # debugfs prints errors on stderr and exits 0; an empty stdout means "not there"
        if p.returncode == 0 and p.stdout and b"File not found" not in p.stderr:
            return p.stdout
    return None


def guest_notes(domain: Domain, images: list[str], read=read_guest_file) -> list[str]:
    """S20/S26: what the guest itself still needs, for the disks xenrun can read
    (image files on this machine). Empty when all is well or nothing can be read."""
    notes = []
    for image in images:
        conf = read(image, "/etc/mkinitcpio.conf")
        if conf is None:
            continue
        missing = mkinitcpio_missing(conf.decode("utf-8", errors="replace"))
        if missing:
            notes.append(f"{domain.name}: the guest's /etc/mkinitcpio.conf (in {image}) lacks {', '.join(missing)}"
                         " in MODULES=(...): add them and run `mkinitcpio -P` in the guest, or it will stop at a"
                         " ctrl-d prompt (S20, S26)")
        else:
            notes.append(f"{domain.name}: the guest's mkinitcpio.conf has the Xen front-end modules (S20)")
        break
    return notes


def lacks_boot_config(images: list[str], read=read_guest_file) -> str | None:
    """The first readable guest disk (one holding a Linux /etc) without
    /boot/grub/grub.cfg, which pygrub boots from; None when all have one or none
    can be read."""
    for image in images:
        if read(image, "/etc/mkinitcpio.conf") is None and read(image, "/etc/fstab") is None:
            continue  # not a filesystem xenrun can read: cannot tell
        return None if read(image, "/boot/grub/grub.cfg") is not None else image
    return None
