"""xl domain configuration files (/etc/xen/NAME.cfg): render, parse, lint.

The format (xl.cfg(5)) is Python-like: ``key = value`` statements, one per line or
separated by ';', with strings in single or double quotes, numbers, and lists of
them in brackets (which may span lines); '#' starts a comment.

``render`` writes a guest's config in the article's order and quoting (S17 to S19),
``parse`` reads any config with line numbers, and ``lint`` (a pure function) finds
the mistakes the article warns about (S25): unknown keys, ``initrd`` for
``ramdisk``, a kernel that is not there, MACs outside 00:16:3e or given twice, VNC
open to the network without a password.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from xenrun.domains import PVGRUB2, XEN_OUI, Domain, is_loopback

# xl.cfg(5) keys (Xen 4.2 to 4.19); anything else is a typo or a key of another tool
KNOWN_KEYS = frozenset("""
name type builder memory maxmem vcpus maxvcpus cpus cpus_soft cpu_weight cap pool uuid seclabel
init_seclabel on_poweroff on_reboot on_watchdog on_crash on_soft_reset kernel ramdisk cmdline extra
root bootloader bootloader_args bootloader_restrict bootloader_user disk vif vfb vnc vnclisten vncdisplay
vncunused vncpasswd vkb sdl opengl display xauthority keymap serial usb usbdevice usbctrl usbdev pci
pci_permissive pci_msitranslate pci_seize pci_power_mgmt irqs iomem ioports vtpm p9 pvcalls channel rdm
rdm_mem_boundary vdispl vsnd virtio device_model_version device_model_override
device_model_stubdomain_override device_model_stubdomain_seclabel device_model_args
device_model_args_hvm device_model_args_pv device_model_user stdvga vga videoram boot acpi acpi_s3
acpi_s4 acpi_laptop_slate apic pae hap nestedhvm hpet viridian timer_mode tsc_mode localtime
rtc_timeoffset vpt_align soundhw xen_platform_pci gfx_passthru spice spicehost spiceport
spicetls_port spicedisable_ticketing spicepasswd spiceagent_mouse spicevdagent spice_clipboard_sharing
spiceusbredirection spice_image_compression spice_streaming_video nographic max_grant_frames
max_maptrack_frames max_grant_version max_event_channels e820_host claim_mode driver_domain
device_tree dtdev gic_version vuart passthrough altp2m altp2mhvm shadow_memory mmio_hole firmware
bios bios_path_override smbios_firmware acpi_firmware ms_vm_genid dm_restrict tee cpuid
vcpu_hard_affinity vcpu_soft_affinity vnuma vmtrace_buf_kb nomigrate event_channels
trap_unmapped_accesses dom0_mem vif2 vscsi vusb usbversion vga_passthrough
""".split())

# the article's examples: PV in double quotes (its vif in single), HVM all single
ORDER = ("name", "type", "builder", "bootloader", "kernel", "ramdisk", "extra", "memory", "vcpus",
         "disk", "vif", "vnc", "vnclisten", "vncdisplay", "vncpasswd")


class XlSyntaxError(ValueError):
    def __init__(self, line: int, message: str):
        self.line = line
        super().__init__(f"line {line}: {message}")


@dataclass(frozen=True)
class Entry:
    key: str
    value: object  # str, int, float or a list of them
    line: int


@dataclass(frozen=True)
class Finding:
    line: int | None
    key: str
    message: str

    def format(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


# -- render ------------------------------------------------------------------------------

def settings_of(domain: Domain, disk_entries: list[str], kernel: str | None = None,
                ramdisk: str | None = None, extra: str | None = None) -> list[tuple[str, object]]:
    """The (key, value) pairs of a guest's config, in the article's order (S17 to
    S19). ``disk_entries`` are the disk plugins' entries; the ISO is added after
    them. ``kernel``/``ramdisk``/``extra`` replace the spec's (an ISO boot)."""
    pairs: list[tuple[str, object]] = [("name", domain.name)]
    if domain.type in ("hvm", "pvh"):
        pairs.append(("type", domain.type))  # builder= is deprecated since xl 4.10
    if domain.bootloader:
        pairs.append(("bootloader", domain.bootloader))
    for key, value in (("kernel", kernel or domain.kernel), ("ramdisk", ramdisk or domain.ramdisk),
                       ("extra", extra or domain.extra)):
        if value:
            pairs.append((key, value))
    pairs.append(("memory", domain.memory_mib))
    if domain.vcpus:
        pairs.append(("vcpus", domain.vcpus))
    disks = list(disk_entries)
    if domain.iso:
        disks.append(f"file:{domain.iso},{domain.iso_vdev},r")
    pairs.append(("disk", disks))
    if domain.vifs:
        pairs.append(("vif", [f"mac={v.mac},bridge={v.bridge}" for v in domain.vifs]))
    if domain.vnc is not None:
        pairs += [("vnc", 1), ("vnclisten", domain.vnc.listen)]
        if domain.vnc.display is not None:
            pairs.append(("vncdisplay", domain.vnc.display))
        if domain.vnc.password:
            pairs.append(("vncpasswd", domain.vnc.password))
    return pairs


def render(pairs: list[tuple[str, object]], style: str = "pv") -> str:
    """The config text: one ``key = value`` per line. ``style`` "pv" quotes as the
    article's PV example (double quotes, the vif list in single), "hvm" as its HVM
    example (single quotes throughout)."""
    lines = []
    for key, value in pairs:
        quote = "'" if style == "hvm" or key == "vif" else '"'
        lines.append(f"{key} = {_value(value, quote)}")
    return "\n".join(lines) + "\n"


def _value(value: object, quote: str) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[ " + ", ".join(_value(v, quote) for v in value) + " ]" if value else "[]"
    text = str(value)
    if any(c in text for c in "'\"\\\n"):
        raise ValueError(f"xl value {text!r} has a quote, backslash or newline")
    return f"{quote}{text}{quote}"


def render_domain(domain: Domain, disk_entries: list[str], **boot) -> str:
    return render(settings_of(domain, disk_entries, **boot), style=domain.type)


# -- parse -------------------------------------------------------------------------------

def parse(text: str) -> list[Entry]:
    """Every ``key = value`` of a config, in order, with its line. Raises
    XlSyntaxError (with the line) for what xl itself would refuse."""
    entries = []
    p = _Parser(text)
    while True:
        p.skip(newlines=True, semicolons=True)
        if p.done():
            break
        line = p.line
        key = p.word()
        if not key:
            raise XlSyntaxError(line, f"expected a key, found {p.peek()!r}")
        p.skip()
        if p.peek() == "+" and p.text.startswith("+=", p.pos):  # xl allows "key += [...]"
            p.pos += 1
        if p.peek() != "=":
            raise XlSyntaxError(p.line, f"expected '=' after {key}")
        p.pos += 1
        p.skip()
        value = p.value()
        p.skip()
        if not p.done() and p.peek() not in "\n;":
            raise XlSyntaxError(p.line, f"unexpected {p.peek()!r} after the value of {key}")
        entries.append(Entry(key, value, line))
    return entries


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if not self.done() else ""

    def skip(self, newlines: bool = False, semicolons: bool = False) -> None:
        while not self.done():
            c = self.peek()
            if c == "#":
                while not self.done() and self.peek() != "\n":
                    self.pos += 1
            elif c in " \t\r" or (c == "\n" and newlines) or (c == ";" and semicolons):
                self.line += c == "\n"
                self.pos += 1
            else:
                return

    def word(self) -> str:
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(self.text, self.pos)
        if not m:
            return ""
        self.pos = m.end()
        return m.group()

    def value(self):
        c = self.peek()
        if c in "'\"":
            return self.string()
        if c == "[":
            return self.list()
        m = re.compile(r"-?(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?)").match(self.text, self.pos)
        if m:
            self.pos = m.end()
            s = m.group()
            return int(s, 16) if "x" in s else float(s) if "." in s else int(s)
        raise XlSyntaxError(self.line, f"expected a string, number or list, found {c!r}" if c else
                            "expected a value, found the end of the file")

    def string(self) -> str:
        quote, start = self.peek(), self.line
        self.pos += 1
        out = []
        while True:
            if self.done() or self.peek() == "\n":
                raise XlSyntaxError(start, f"string not closed (missing {quote})")
            c = self.peek()
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c == "\\":
                nxt = self.peek()
                self.pos += 1
                out.append({"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}.get(nxt, "\\" + nxt))
            else:
                out.append(c)

    def list(self) -> list:
        start = self.line
        self.pos += 1
        items = []
        while True:
            self.skip(newlines=True)
            if self.done():
                raise XlSyntaxError(start, "list not closed (missing ])")
            if self.peek() == "]":
                self.pos += 1
                return items
            items.append(self.value())
            self.skip(newlines=True)
            if self.done():
                raise XlSyntaxError(start, "list not closed (missing ])")
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise XlSyntaxError(self.line, f"expected ',' or ']' in a list, found {self.peek()!r}")


# -- lint --------------------------------------------------------------------------------

def spec_pairs(value: object) -> dict[str, str]:
    """'mac=00:16:3e:..,bridge=xenbr0' -> {"mac": ..., "bridge": ...}."""
    out = {}
    for part in str(value).split(","):
        key, sep, val = part.partition("=")
        if sep:
            out[key.strip()] = val.strip()
    return out


def macs_of(entries: list[Entry]) -> list[tuple[str, int]]:
    """(mac, line) of every vif that names one."""
    out = []
    for e in entries:
        if e.key == "vif" and isinstance(e.value, list):
            out += [(spec_pairs(v)["mac"].lower(), e.line) for v in e.value if "mac" in spec_pairs(v)]
    return out


def lint(text: str, exists: Callable[[str], bool] | None = None, allow_open_vnc: bool = False,
         other_macs: dict[str, str] | None = None) -> list[Finding]:
    """The mistakes in a config, each with its line. ``exists(path)`` says whether
    a path exists on the host the guest runs on (None: not checked);
    ``other_macs`` maps MACs of the host's other guests to where they are."""
    try:
        entries = parse(text)
    except XlSyntaxError as e:
        return [Finding(e.line, "", f"syntax: {str(e).split(': ', 1)[1]}")]
    found: list[Finding] = []
    seen: dict[str, int] = {}
    values = {}
    for e in entries:
        if e.key in seen and e.key not in ("vif", "disk"):
            found.append(Finding(e.line, e.key, f"given twice (first on line {seen[e.key]}); xl uses the last one"))
        seen.setdefault(e.key, e.line)
        values[e.key] = e
        if e.key == "initrd":
            found.append(Finding(e.line, e.key, "xl has no initrd key: the initramfs is given as ramdisk (S25)"))
        elif e.key not in KNOWN_KEYS:
            close = difflib.get_close_matches(e.key, sorted(KNOWN_KEYS), n=1)
            found.append(Finding(e.line, e.key, "unknown key" + (f" (did you mean {close[0]}?)" if close else "")))
    for key in ("kernel", "ramdisk"):
        e = values.get(key)
        if e is not None and exists is not None:
            if not isinstance(e.value, str) or not e.value.startswith("/"):
                found.append(Finding(e.line, key, f"{e.value!r} is not an absolute path"))
            elif not exists(e.value):
                pvgrub = "/grub-xen/" in e.value  # Debian's pvgrub2 images
                found.append(Finding(e.line, key, f"{e.value} does not exist on the host (S25)"
                                     + ("; pvgrub2 comes with grub-xen-host (apt-get install grub-xen-host)"
                                        if pvgrub else "")))
    hvm = any(values.get(k) is not None and values[k].value == "hvm" for k in ("builder", "type"))
    if not hvm and "kernel" not in values and "bootloader" not in values:
        found.append(Finding(values["name"].line if "name" in values else None, "kernel",
                             "a PV guest needs kernel = or bootloader = \"pygrub\" (S19, S21)"))
    if "name" not in values:
        found.append(Finding(None, "name", "missing: every guest needs a unique name (S17)"))
    found += _lint_vifs(entries, other_macs or {})
    found += _lint_vnc(values, entries, allow_open_vnc)
    found += _lint_disks(values)
    return sorted(found, key=lambda f: (f.line or 0, f.key))


def _lint_vifs(entries: list[Entry], other_macs: dict[str, str]) -> list[Finding]:
    found, mine = [], {}
    for e in entries:
        if e.key != "vif":
            continue
        if not isinstance(e.value, list):
            found.append(Finding(e.line, "vif", "must be a list, as [ 'mac=...,bridge=xenbr0' ]"))
            continue
        for item in e.value:
            mac = spec_pairs(item).get("mac")
            if mac is None:
                continue
            if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", mac):
                found.append(Finding(e.line, "vif", f"mac {mac} is not a MAC address (fill in the XX: S17)"))
                continue
            mac = mac.lower()
            if not mac.startswith(XEN_OUI + ":"):
                found.append(Finding(e.line, "vif", f"mac {mac} is outside Xen's block {XEN_OUI} (S17)"))
            if mac in mine:
                found.append(Finding(e.line, "vif", f"mac {mac} is given twice (line {mine[mac]})"))
            elif mac in other_macs:
                found.append(Finding(e.line, "vif", f"mac {mac} is also used by {other_macs[mac]}"))
            mine.setdefault(mac, e.line)
    return found


def _lint_vnc(values: dict[str, Entry], entries: list[Entry], allow_open: bool) -> list[Finding]:
    """VNC reachable from the network without a password (the article's HVM
    example, which it calls unsafe): refused unless allowed explicitly."""
    displays = []
    if "vnc" in values and values["vnc"].value not in (0, "0"):
        displays.append((values["vnc"].line, values.get("vnclisten"), values.get("vncpasswd")))
    for e in entries:
        if e.key == "vfb" and isinstance(e.value, list):
            for item in e.value:
                kv = spec_pairs(item)
                if kv.get("vnc", "0") != "0":
                    displays.append((e.line, Entry("vnclisten", kv["vnclisten"], e.line) if "vnclisten" in kv else None,
                                     Entry("vncpasswd", kv["vncpasswd"], e.line) if "vncpasswd" in kv else None))
    found = []
    for line, listen, password in displays:
        address = str(listen.value).split(":")[0] if listen is not None else "127.0.0.1"  # xl's default
        if not is_loopback(address) and not (password is not None and str(password.value)) and not allow_open:
            found.append(Finding(listen.line if listen else line, "vnclisten",
                                 f"VNC listens on {address} without a password: anyone on the network gets the"
                                 " guest's screen (S18); listen on 127.0.0.1, set vncpasswd, or allow it explicitly"))
    return found


def _lint_disks(values: dict[str, Entry]) -> list[Finding]:
    e = values.get("disk")
    if e is None:
        return []
    if not isinstance(e.value, list):
        return [Finding(e.line, "disk", "must be a list, as [ 'file:/path,xvda,w' ]")]
    found, vdevs = [], {}
    for item in e.value:
        parts = [p.strip() for p in str(item).split(",")]
        if "=" in parts[0]:  # the key=value form: vdev=..., target=...
            vdev = spec_pairs(item).get("vdev")
        elif len(parts) >= 3:
            vdev = parts[1].split(":")[0]
            if parts[2] not in ("r", "w", "ro", "rw", "w!", "!"):
                found.append(Finding(e.line, "disk", f"{item!r}: access must be r or w"))
        else:
            found.append(Finding(e.line, "disk", f"{item!r} is not TARGET,VDEV,ACCESS (S17)"))
            continue
        if vdev in vdevs:
            found.append(Finding(e.line, "disk", f"virtual disk {vdev} is given twice"))
        vdevs[vdev] = True
    return found


def without_install(text: str, loader: str = "pygrub") -> str:
    """The PV step after installation (S21) on a config's text: kernel, ramdisk and
    extra dropped, and where the kernel was, bootloader = "pygrub" (which runs in
    dom0) or, for ``loader`` "pvgrub2", kernel = the pvgrub2 image (GRUB inside the
    guest; a bootloader line is dropped then); read-only (ISO) disks removed.
    Other lines are kept as they are."""
    entries = parse(text)
    lines = text.splitlines(keepends=True)
    drop, replace_at = set(), {}
    spans = _spans(text, entries)
    have_bootloader = any(e.key == "bootloader" for e in entries)
    have_kernel = any(e.key == "kernel" for e in entries)
    for e in entries:
        first, last = spans[e.line]
        if e.key in ("kernel", "ramdisk", "extra") or (e.key == "bootloader" and loader == "pvgrub2"):
            drop.update(range(first, last + 1))
            if loader == "pvgrub2" and (e.key == "kernel" or (e.key == "bootloader" and not have_kernel)):
                replace_at[first] = f'kernel = "{PVGRUB2}"\n'
            elif e.key == "kernel" and not have_bootloader:
                replace_at[first] = 'bootloader = "pygrub"\n'
        elif e.key == "disk" and isinstance(e.value, list):
            kept = [d for d in e.value if not _read_only(d)]
            if len(kept) != len(e.value):
                drop.update(range(first, last + 1))
                quote = "'" if lines[first - 1].count("'") > lines[first - 1].count('"') else '"'
                replace_at[first] = f"disk = {_value(kept, quote)}\n"
    out = []
    for n, line in enumerate(lines, 1):
        if n in replace_at:
            out.append(replace_at[n])
        elif n not in drop:
            out.append(line)
    return "".join(out)


def disk_target(disk: str) -> str | None:
    """The path an xl disk spec points at: ``target=`` of the key=value form, or
    the first field of the positional form (without its ``file:``/``phy:`` prefix)."""
    parts = [p.strip() for p in str(disk).split(",")]
    if "=" in parts[0]:
        return spec_pairs(disk).get("target") or None
    first = parts[0]
    return first.split(":", 1)[1] if ":" in first else first or None


def _read_only(disk: object) -> bool:
    parts = [p.strip() for p in str(disk).split(",")]
    if "=" in parts[0]:
        kv = spec_pairs(disk)
        return kv.get("access", "rw") in ("r", "ro") or "devtype=cdrom" in str(disk)
    return len(parts) >= 3 and (parts[2] in ("r", "ro") or parts[1].endswith(":cdrom"))


def _spans(text: str, entries: list[Entry]) -> dict[int, tuple[int, int]]:
    """First and last line of each entry (a list may span lines)."""
    starts = [e.line for e in entries]
    total = text.count("\n") + (0 if text.endswith("\n") else 1)
    spans = {}
    for i, start in enumerate(starts):
        end = (starts[i + 1] - 1) if i + 1 < len(starts) else total
        # stop before trailing blank or comment lines that belong to no entry
        lines = text.splitlines()
        while end > start and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        spans[start] = (start, end)
    return spans
