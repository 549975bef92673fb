"""Guests (domU): domain specs in domains.toml, checked before anything runs (the
guest media xenrun reads without mounting are in xenrun.guestmedia).

Shape of domains.toml (beside plugins.toml; see examples/domains.toml)::

    [defaults]                 any domain key, for every domain below
    [domain.NAME]              one guest: type = "pv" | "pvh" | "hvm", memory, vcpus, host(s),
                               iso, kernel/ramdisk/extra, bootloader, iso_boot, autostart
    [[domain.NAME.disks]]      backend (a disk plugin: image, lvm ...; or "phy"), vdev, access,
                               and the keys its plugin declares (size, path, vg ...)
    [[domain.NAME.vif]]        bridge, mac
    [domain.NAME.vnc]          HVM display: listen, display, password
    [domain.NAME.install]      method (an installer plugin: debootstrap ...) and its keys
                               (xenrun.installs): a system put onto the first disk

Every error is a ConfigError naming file, line and key, like plugins.toml's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from xenrun import settings as check
from xenrun.config import KeyLines, parse_toml
from xenrun.errors import ConfigError
from xenrun.installs import InstallSpec, parse_install
from xenrun.settings import Setting, check_keys

XEN_OUI = "00:16:3e"  # the MAC block reserved for Xen guests (S17)
DEFAULT_BRIDGE = "xenbr0"
DEFAULT_BOOT_DIR = "/var/lib/xen/boot"
CONFIG_DIR = "/etc/xen"
AUTO_DIR = "/etc/xen/auto"
PHY = "phy"  # an existing device of the host's: the core's own backend, no plugin
# Debian's pvgrub2 (grub-xen-host): GRUB as a PV kernel, reading the guest's own grub.cfg
PVGRUB2 = "/usr/lib/grub-xen/grub-x86_64-xen.bin"
LOADERS = ("pygrub", "pvgrub2")  # how an installed PV guest boots from its disk (finish-install)

_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_VDEV = re.compile(r"(?:xvd|sd|hd|vd)[a-z]{1,2}[0-9]{0,2}")
_ISO_VDEV = re.compile(r"(?:xvd|sd|hd|vd)[a-z]{1,2}[0-9]{0,2}(?::cdrom)?")
# values that end up inside a quoted xl string: printable, no quotes or backslashes
_XL_TEXT = re.compile(r"[^'\"\\\x00-\x1f\x7f]*")

DOMAIN_KEYS = ("host", "type", "memory", "vcpus", "disks", "vif", "iso", "iso_vdev", "kernel", "ramdisk",
               "extra", "bootloader", "iso_boot", "iso_kernel", "iso_ramdisk", "vnc", "allow_open_vnc",
               "autostart", "boot_dir", "install")
MAX_DISKS = 16  # xvda..xvdp: beyond, xl and the guest's kernel name disks in ways plans cannot tell apart
# the keys of every disk; a disk plugin declares the others (declare_disk_keys), and
# they are checked when the guest is planned, once the plugins are loaded
DISK_KEYS = ("backend", "vdev", "access")
PHY_KEYS = ("device",)
VIF_KEYS = ("bridge", "mac")
VNC_KEYS = ("listen", "display", "password")


# -- the spec --------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskSpec:
    """One guest disk. ``backend`` names the plugin that makes it (image, lvm) or
    "phy" for an existing device. ``options`` holds the keys its plugin declares
    (declare_disk_keys): as written in domains.toml until the guest is planned, then
    checked, with the plugin's defaults filled in (``with_disk_keys``). ``key`` is
    the disk's name in errors ("disks.0"), ``where`` its TOML path (for the line)."""

    backend: str
    vdev: str
    device: str | None = None  # phy: an existing block device or partition
    access: str = "w"
    options: dict = field(default_factory=dict)
    key: str = ""
    where: tuple[str, ...] = field(default=(), compare=False, repr=False)


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
    install: InstallSpec | None = None  # an operating system put onto its first disk (xenrun.installs)
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

    def finished(self, loader: str = "pygrub") -> "Domain":
        """The spec after the PV installation (S21): boot through pygrub (or
        pvgrub2, PVGRUB2 as the kernel), no ISO."""
        if loader == "pvgrub2":
            return replace(self, kernel=PVGRUB2, ramdisk=None, extra=None, iso_boot=False, iso=None,
                           bootloader=None)
        return replace(self, kernel=None, ramdisk=None, extra=None, iso_boot=False, iso=None,
                       bootloader="pygrub")

    def error(self, key: str, message: str) -> ConfigError:
        if self.source is None:
            return ConfigError("<domain>", f"domain.{self.name}.{key}", message)
        return self.source.error(("domain", self.name) + tuple(key.split(".")), message)

    def disk_error(self, disk: DiskSpec, key: str, message: str) -> ConfigError:
        """The file:line error for ``key`` of one of the guest's disks ("" for the disk
        itself), found where the disk was written (its domain, or [defaults])."""
        if self.source is None or not disk.where:
            return self.error(f"{disk.key}.{key}" if key else disk.key, message)
        return self.source.error(disk.where + ((key,) if key else ()), message)


@dataclass(frozen=True)
class DomainDisk:
    """What a disk plugin answers for one disk (create_domain): the Changes that
    make the disk, the xl ``disk=`` entry, notes for the plan (such as "free
    space unknown"), and ``remove``: the argv that removes the disk for
    ``domain.delete --purge`` (empty: the plugin never removes its disks)."""

    changes: tuple = ()
    entry: str = ""
    notes: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "changes", tuple(self.changes))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "remove", tuple(self.remove))
        if not all(isinstance(a, str) and a for a in self.remove):
            raise ValueError(f"DomainDisk: remove must be an argv of non-empty strings, got {self.remove!r}")
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
    install = parse_install(values.get("install"), origin.get("install", where + ("install",)), src.error)
    if install is not None:
        if not disks:
            raise err("install", "needs a disk: the system is installed onto the first disk")
        if disks[0].access != "w":
            raise err("install", f"the first disk ({disks[0].vdev}) is read-only: the system is installed onto it")
        if iso_boot or kind == "hvm":
            raise err("install", "xenrun installs the system itself: not with iso_boot or an HVM guest"
                                 " (those install from their ISO)")
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
        boot_dir=get("boot_dir", check.absolute_path, DEFAULT_BOOT_DIR), install=install, source=src)


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
        backend = get("backend", check.name, "image")
        vdev = get("vdev", _vdev) or _next_vdev([d.vdev for d in out])
        if vdev in [d.vdev for d in out]:
            raise src.error(at + ("vdev",), f"{vdev} is already another disk's vdev")
        access = get("access", check.choice("w", "r"), "w")
        device = None
        if backend == PHY:
            for key in item:
                if key not in DISK_KEYS + PHY_KEYS:
                    raise src.error(at + (key,), f"not a key of a {PHY!r} disk (its keys: "
                                                 f"{', '.join(DISK_KEYS + PHY_KEYS)})")
            if "device" not in item:
                raise src.error(at, "device is missing: a phy disk is an existing device such as \"/dev/sdb1\"")
            device = get("device", check.absolute_path)
        elif "device" in item:
            raise src.error(at + ("device",), f"only a {PHY!r} disk has a device (backend = \"phy\"); a"
                                              f" {backend!r} disk is made by its plugin")
        options = {k: v for k, v in item.items() if k not in DISK_KEYS}
        out.append(DiskSpec(backend=backend, vdev=vdev, device=device, access=access, options=options,
                            key=f"disks.{i}", where=at))
    return tuple(out)


def with_disk_keys(domain: Domain, declared: dict[str, dict[str, Setting]]) -> Domain:
    """``domain`` with the options of its plugin disks checked against the keys their
    plugins declare (``declared``: backend -> {key: Setting}) and their defaults
    filled in. An unknown key, a bad value or a missing required key is a file:line
    error naming the key, raised before anything runs."""
    disks = []
    for disk in domain.disks:
        if disk.backend == PHY:
            disks.append(disk)
            continue
        keys = declared.get(disk.backend, {})
        options = check_keys(disk.options, keys, lambda key, msg, disk=disk: domain.disk_error(disk, key, msg),
                             f"not a key of a {disk.backend!r} disk (its keys: {', '.join(DISK_KEYS + tuple(keys))})",
                             lambda key, s, disk=disk: f"{key} is missing: a {disk.backend} disk needs {key}"
                                                       + (f" ({s.help})" if s.help else ""))
        disks.append(replace(disk, options=options))
    return replace(domain, disks=tuple(disks))


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
    file systems and LVM may fold), MACs, VNC displays and phy devices."""
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
                    # plugin disks are compared when the guest is planned, by the path its
                    # plugin gives (guests.plan_create)
                    if disk.device and disk.device == other.device:
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
