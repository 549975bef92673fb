"""Facts about a host: read-only, gathered once, parsed by pure functions.

The parsers take the text of a file or a command's output and return plain values;
they are tested on real samples in tests/samples/. The ``facts`` plugin
(xenrun/plugins/facts.py) reads the files through a Probe and calls them.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Iterator


class Facts(Mapping):
    """The merged, read-only facts of one host. ``facts.uplink`` or
    ``facts["uplink"]``; a missing key is an AttributeError / KeyError."""

    def __init__(self, data: dict[str, Any]):
        self._data = MappingProxyType(dict(data))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"no fact {key!r} (known: {', '.join(sorted(self._data))})") from None

    def to_json(self) -> dict:
        return json.loads(json.dumps(dict(self._data), default=sorted))


# where installed programs are looked for (probe.installed)
BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class Probe:
    """The read-only view of a target that detect_hardware gets: files, folders and
    read-only commands. Nothing here can change the host."""

    def __init__(self, target):
        self._target = target
        self._bin_dirs: list[str] | None = None

    @property
    def target_name(self) -> str:
        return str(self._target)

    @property
    def live(self) -> bool:
        """True on a running machine (local or SSH), False on a --root folder."""
        return self._target.live

    def link(self, path: str) -> str | None:
        info = self._target.lstat(path)
        return info.link if info and info.kind == "link" else None

    def text(self, path: str) -> str | None:
        data = self._target.read(path)
        return None if data is None else data.decode("utf-8", errors="replace")

    def exists(self, path: str) -> bool:
        return self._target.exists(path)

    def listdir(self, path: str) -> list[str]:
        return self._target.listdir(path) or []

    def installed(self, program: str) -> bool:
        """Whether ``program`` is in one of BIN_DIRS."""
        return any(self.exists(f"{d}/{program}") for d in self.bin_dirs())

    def bin_dirs(self) -> list[str]:
        """BIN_DIRS with each folder that is a symlink replaced by the folder it
        names, and none twice: on a merged /usr (/bin -> usr/bin) /bin/x is
        /usr/bin/x, so it is looked up once (an SSH host's facts are read several
        times per run, and these lookups were most of their client time)."""
        if self._bin_dirs is None:
            dirs: list[str] = []
            for d in BIN_DIRS:
                target = self.link(d)
                if target is not None and ".." not in target.split("/"):
                    d = posixpath.normpath(posixpath.join(posixpath.dirname(d), target))
                if d not in dirs:
                    dirs.append(d)
            self._bin_dirs = dirs
        return self._bin_dirs

    def command(self, argv: list[str]) -> str | None:
        """stdout of a read-only command, or None when it cannot run here (a --root
        folder without the program) or fails."""
        if self._target.cannot_execute(tuple(argv)):
            return None
        result = self._target.execute(argv, timeout=30)
        return result.stdout if result.rc == 0 else None


# -- parsers (pure) -------------------------------------------------------------------

def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo -> cpus, vendor, model, flags (sorted list), hvm ("vmx", "svm"
    or None): step S1."""
    cpus, vendor, model, flags = 0, None, None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor":
            cpus += 1
        elif key == "vendor_id" and vendor is None:
            vendor = value
        elif key == "model name" and model is None:
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
    hvm = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    return {"cpus": cpus, "cpu_vendor": vendor, "cpu_model": model,
            "cpu_flags": sorted(flags), "hvm": hvm}


def parse_os_release(text: str) -> dict:
    """/etc/os-release (shell-style KEY=value) -> dict with lower-case keys."""
    return {k.lower(): v for k, v in parse_shell_vars(text).items()}


def parse_shell_vars(text: str) -> dict:
    """Plain ``KEY=value`` assignments of a shell fragment (/etc/default/grub,
    os-release), quotes removed; lines that are not plain assignments are skipped."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            continue
        try:
            words = shlex.split(value, comments=True)
        except ValueError:
            words = [value.strip("\"'")]
        out[key.strip()] = words[0] if words else ""
    return out


def parse_meminfo(text: str) -> int | None:
    """/proc/meminfo -> MemTotal in MiB."""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) // 1024 if m else None


def parse_default_route(text: str) -> str | None:
    """/proc/net/route -> the interface of the IPv4 default route with the lowest
    metric, or None."""
    best = None
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000":
            metric = int(f[6])
            if best is None or metric < best[0]:
                best = (metric, f[0])
    return best[1] if best else None


def parse_modules(text: str) -> list[str]:
    """/proc/modules -> loaded module names."""
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def parse_cmdline(text: str) -> dict:
    """/proc/cmdline -> {"root": ..., "options": [...]} (options without BOOT_IMAGE,
    root= and initrd=, in order)."""
    words = text.split()
    root = next((w[5:] for w in words if w.startswith("root=")), None)
    rest = [w for w in words if not w.startswith(("BOOT_IMAGE=", "root=", "initrd="))]
    return {"root": root, "options": rest}


def parse_fstab(text: str) -> list[dict]:
    """/etc/fstab -> entries {spec, file, vfstype, options}."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        f = line.split()
        if len(f) >= 3:
            entries.append({"spec": f[0], "file": f[1], "vfstype": f[2],
                            "options": f[3] if len(f) > 3 else "defaults"})
    return entries


def parse_dpkg_status(text: str) -> dict[str, str]:
    """/var/lib/dpkg/status -> {package: version} of installed packages."""
    packages = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            packages[fields["Package"]] = fields.get("Version", "")
    return packages


def parse_pacman_local(entries: list[str]) -> dict[str, str]:
    """Folder names of /var/lib/pacman/local ("xen-4.5.0-2") -> {package: version}."""
    packages = {}
    for entry in entries:
        m = re.fullmatch(r"(.+)-([^-]+-[^-]+)", entry)
        if m:
            packages[m.group(1)] = m.group(2)
    return packages


def parse_vgs_json(text: str) -> list[dict]:
    """``vgs --reportformat json --units b --nosuffix -o vg_name,vg_size,vg_free``
    -> [{name, size, free}] in bytes."""
    data = json.loads(text)
    out = []
    for report in data.get("report", []):
        for vg in report.get("vg", []):
            out.append({"name": vg["vg_name"], "size": int(float(vg["vg_size"])),
                        "free": int(float(vg["vg_free"]))})
    return out


def hypervisor_state(hyp_type: str | None, capabilities: str | None) -> dict:
    """/sys/hypervisor/type and /proc/xen/capabilities -> xen_running, xen_dom0, xen_domu.
    vmx/svm vanish from cpuinfo under Xen (S1), so this is read first."""
    running = (hyp_type or "").strip() == "xen" or capabilities is not None
    # a guest's xenfs has the file without control_d; without xenfs it cannot be told
    return {"xen_running": running, "xen_dom0": "control_d" in (capabilities or ""),
            "xen_domu": capabilities is not None and "control_d" not in capabilities}
