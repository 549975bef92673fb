"""facts: the core's own detect_hardware (steps S1 to S5). Always selected.

Reads files through the probe (so it works the same on the running machine, a
--root folder and an SSH host) and hands the text to the pure parsers of
xenrun.facts."""

from __future__ import annotations

import fnmatch
import re

from xenrun.api import hookimpl, netconf
from xenrun.api import parsers as parse

PROGRAMS = ("grub-mkconfig", "update-grub", "grub-install", "grub-reboot", "grub-set-default",
            "grub-editenv", "syslinux", "extlinux", "efibootmgr", "netctl", "xl", "yay", "paru",
            "pacman", "apt-get", "dpkg", "vgs", "lvcreate", "systemctl", "ip", "chroot")
_HYPERVISORS = {  # another hypervisor beside Xen can freeze the machine (S4)
    "virtualbox": ("/usr/lib/virtualbox", "/usr/bin/VirtualBox", "/opt/VirtualBox"),
    "vmware": ("/usr/lib/vmware", "/usr/bin/vmware"),
}
_HYPERVISOR_MODULES = {"vboxdrv": "virtualbox", "vmmon": "vmware"}


@hookimpl
def detect_hardware(probe):
    text = lambda p: probe.text(p) or ""
    facts = {"live": probe.live, "hostname": text("/etc/hostname").strip() or None}
    facts["distro"] = parse.parse_os_release(probe.text("/etc/os-release") or text("/usr/lib/os-release"))

    facts.update(parse.hypervisor_state(probe.text("/sys/hypervisor/type"),
                                        probe.text("/proc/xen/capabilities")))
    facts.update(parse.parse_cpuinfo(text("/proc/cpuinfo")))
    acpi = set(probe.listdir("/sys/firmware/acpi/tables"))
    facts["iommu"] = "vt-d" if "DMAR" in acpi else "amd-vi" if "IVRS" in acpi else None
    facts["memory_mib"] = parse.parse_meminfo(text("/proc/meminfo"))

    facts["firmware"] = "uefi" if probe.exists("/sys/firmware/efi") else "bios"
    fstab = parse.parse_fstab(text("/etc/fstab"))
    facts["fstab"] = fstab
    facts["root_device"] = next((e["spec"] for e in fstab if e["file"] == "/"), None)
    facts["esp"] = next((e["file"] for e in fstab if e["vfstype"] == "vfat"
                         and e["file"] in ("/boot", "/efi", "/boot/efi")), None)
    facts["kernel_cmdline"] = parse.parse_cmdline(text("/proc/cmdline"))
    programs = {p for p in PROGRAMS if probe.installed(p)}
    facts["programs"] = sorted(programs)
    facts["bootloaders"] = sorted(_bootloaders(probe, programs))

    boot = probe.listdir("/boot")
    facts["kernels"] = [f"/boot/{n}" for n in boot if n.startswith("vmlinuz")]
    facts["xen_images"] = [f"/boot/{n}" for n in boot if fnmatch.fnmatch(n, "xen*.gz") or fnmatch.fnmatch(n, "xen*.efi")]
    facts["xen_images"] += [f"/usr/lib/efi/{n}" for n in probe.listdir("/usr/lib/efi") if fnmatch.fnmatch(n, "xen*.efi")]

    modules = parse.parse_modules(text("/proc/modules"))
    found = {name for name, paths in _HYPERVISORS.items() if any(probe.exists(p) for p in paths)}
    found |= {_HYPERVISOR_MODULES[m] for m in modules if m in _HYPERVISOR_MODULES}
    facts["other_hypervisors"] = sorted(found)

    facts["interfaces"] = [_interface(probe, n) for n in probe.listdir("/sys/class/net") if n != "lo"]
    facts["uplink"] = parse.parse_default_route(text("/proc/net/route"))
    facts["bridge_port"] = _bridge_port(facts["interfaces"], facts["uplink"])
    facts.update(_network_stack(probe, _stack_candidates(facts["interfaces"], facts["bridge_port"], facts["uplink"])))

    vgs = probe.command(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix",
                         "-o", "vg_name,vg_size,vg_free"]) if "vgs" in programs else None
    facts["volume_groups"] = parse.parse_vgs_json(vgs) if vgs else None

    if probe.exists("/var/lib/dpkg/status"):
        facts["packages"] = parse.parse_dpkg_status(text("/var/lib/dpkg/status"))
    else:
        facts["packages"] = parse.parse_pacman_local(probe.listdir("/var/lib/pacman/local"))
    return facts


def _bootloaders(probe, programs: set[str]) -> set[str]:
    found = set()
    if probe.exists("/boot/grub/grub.cfg") or "grub-mkconfig" in programs or "update-grub" in programs:
        found.add("grub")
    if probe.exists("/boot/syslinux/syslinux.cfg") or probe.exists("/boot/syslinux/extlinux.conf"):
        found.add("syslinux")
    if probe.exists("/boot/loader/loader.conf") or probe.exists("/efi/loader/loader.conf"):
        found.add("systemd-boot")
    if "efibootmgr" in programs:
        found.add("efibootmgr")
    return found


def _interface(probe, name: str) -> dict:
    base = f"/sys/class/net/{name}"
    return {"name": name, "mac": (probe.text(f"{base}/address") or "").strip() or None,
            "bridge": probe.exists(f"{base}/bridge"), "wireless": probe.exists(f"{base}/wireless"),
            "bridge_port_of": _master(probe, base)}


def _stack_candidates(interfaces: list[dict], bridge_port: str | None, uplink: str | None) -> list[str]:
    """The interfaces whose stack is the one in charge: the uplink (and the port
    behind it); on a machine with no default route (an isolated lab network), its
    physical ones, in order."""
    named = [n for n in (bridge_port, uplink) if n]
    return named or [i["name"] for i in interfaces if not i["bridge"] and not i["name"].startswith(("vif", "tap"))]


def _bridge_port(interfaces: list[dict], uplink: str | None) -> str | None:
    """When the default route already goes through a bridge (a network plugin's
    second run), the physical port behind it: the bridge's one port that is not a
    guest's (vif, tap). None otherwise, or when it cannot be told."""
    if not any(i["name"] == uplink and i["bridge"] for i in interfaces):
        return None
    ports = [i["name"] for i in interfaces
             if i["bridge_port_of"] == uplink and not i["name"].startswith(("vif", "tap"))]
    return ports[0] if len(ports) == 1 else None


def _master(probe, base: str) -> str | None:
    link = probe.link(f"{base}/master")
    return link.rsplit("/", 1)[-1] if link else None


# what each stack needs installed, as the network plugins do
_STACK_PROGRAMS = {"ifupdown": ("ifup",), "netctl": ("netctl",), "NetworkManager": ("NetworkManager",)}
_NETWORKD = ("/usr/lib/systemd/systemd-networkd", "/lib/systemd/systemd-networkd")


def _network_stack(probe, names: list[str]) -> dict:
    """Which network stack brings the uplink up at boot (network_stack, with
    network_stack_why), and which stacks are installed (network_stacks)."""
    installed = [stack for stack, programs in _STACK_PROGRAMS.items() if any(probe.installed(p) for p in programs)]
    if any(probe.exists(p) for p in _NETWORKD):
        installed.append("networkd")
    wants = probe.listdir(netconf.WANTS)
    ifupdown = None
    if "ifupdown" in installed:
        main = probe.text(netconf.IFUPDOWN_FILE) or ""
        ifupdown = {"auto": [], "ifaces": {}, "files": {}}
        for path in netconf.stanza_files(main, probe.listdir):
            parsed = netconf.parse_interfaces(main if path == netconf.IFUPDOWN_FILE else probe.text(path) or "")
            ifupdown["auto"] += parsed["auto"]
            for name, families in parsed["ifaces"].items():
                ifupdown["ifaces"].setdefault(name, {}).update(families)
                ifupdown["files"].setdefault(name, path)
    networkd = None
    if "networkd" in installed and "systemd-networkd.service" in wants:
        networkd = [(f"{d}/{n}", probe.text(f"{d}/{n}") or "") for d in netconf.NETWORKD_DIRS
                    for n in sorted(probe.listdir(d)) if n.endswith(".network")]
    netctl = []
    for unit in wants:
        m = re.fullmatch(r"netctl@(.+)\.service", unit)
        if m and "netctl" in installed:
            profile = netconf.systemd_unescape(m.group(1))
            found = re.search(r"^\s*Interface=['\"]?([^'\"\s]+)", probe.text(f"/etc/netctl/{profile}") or "", re.MULTILINE)
            if found:
                netctl.append((profile, found.group(1)))
    stack, why = netconf.stack_in_charge(names, ifupdown, networkd, netctl, wants)
    return {"network_stack": stack, "network_stack_why": why, "network_stacks": sorted(installed)}
