"""The network stacks a host may run, read without running anything (S11).

Pure functions over file contents: Debian's interfaces(5) files (ifupdown),
systemd-networkd's .network/.netdev files, and which stack is in charge of an
interface. The core facts plugin feeds them through the probe
(``network_stack``); the network plugins plan with them (``xenrun.api.netconf``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re

from xenrun import settings as check
from xenrun.errors import PlanError
from xenrun.settings import Setting

STACKS = ("ifupdown", "networkd", "netctl", "NetworkManager")
IFUPDOWN_FILE = "/etc/network/interfaces"
# the administrator's and the runtime's files (those in /usr/lib match containers and wifi only)
NETWORKD_DIRS = ("/etc/systemd/network", "/run/systemd/network")
WANTS = "/etc/systemd/system/multi-user.target.wants"


# -- the settings every network plugin takes -------------------------------------------------

def ipv4_list(value) -> list[str]:
    """A list of IPv4 addresses, as ["192.168.1.1", "9.9.9.9"]."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of IPv4 addresses, got {check._kind(value)}")
    return [check.ipv4_address(v) for v in value]


def bridge_settings(written_to: str) -> dict[str, Setting]:
    """The bridge's settings, the same keys and checks for every network plugin."""
    return {
        "bridge": Setting(check.interface, "xenbr0", "the bridge guests attach to"),
        "interface": Setting(check.interface, None,
                             "the uplink moved into the bridge; default: the interface of the default route"),
        "ip": Setting(check.choice("dhcp", "static"), "dhcp", "how the bridge gets its IPv4 address"),
        "address": Setting(check.ipv4_interface, None, "the bridge's address with prefix (ip = \"static\")",
                           examples=("192.168.1.10/24",)),
        "gateway": Setting(check.ipv4_address, None,
                           "default gateway (static); with dhcp only the address the safety check pings"),
        "dns": Setting(ipv4_list, [], f"name servers written to {written_to}"),
        "timeout": Setting(check.positive_int, 30, "seconds the bridge has to come up before the old"
                           " network is put back (live hosts)"),
    }


def bridge_plan(facts, host, plugin: str) -> tuple[dict, str]:
    """The start of every network plugin's configure_network: its settings and the
    "HOST: [plugin.NAME]" its errors begin with, once the stack and the addresses
    are checked."""
    s, where = host.settings[plugin], f"{host.name}: [plugin.{plugin}]"
    check_stack(facts, plugin, host.name)
    check_addresses(s, where)
    return s, where


def check_addresses(s, where: str) -> None:
    if s["ip"] == "static":
        if not s["address"]:
            raise PlanError(f"{where} address is required when ip = \"static\" (as \"192.168.1.10/24\")")
        net = ipaddress.IPv4Interface(s["address"])
        if s["gateway"]:
            gw = ipaddress.IPv4Address(s["gateway"])
            if gw not in net.network:
                raise PlanError(f"{where} gateway: {gw} is not in {net.network}, the network of {net}")
            if gw == net.ip:
                raise PlanError(f"{where} gateway: {gw} is the bridge's own address")
    elif s["address"]:
        raise PlanError(f"{where} address is only for ip = \"static\" (ip is \"dhcp\")")


def find_uplink(facts, s, where: str, own_ports: list[str] = ()) -> str:
    """The interface moved into the bridge: the setting, else the default route's
    interface, else (when that is already our bridge: a second run) the port our
    own configuration names (``own_ports``) or the bridge's one physical port."""
    interfaces = {i["name"]: i for i in facts.get("interfaces") or []}
    bridge = s["bridge"]
    uplink = s["interface"]
    if uplink is None:
        found = facts.get("uplink")
        if found == bridge:
            found = own_ports[0] if len(own_ports) == 1 else facts.get("bridge_port")
        if found is None:
            raise PlanError(f"{where} interface: cannot tell the uplink (no IPv4 default route"
                            f" on {'this host' if facts.get('live') else 'the target'}): set it, as interface = \"eth0\"")
        try:
            uplink = check.interface(found)
        except ValueError as e:
            raise PlanError(f"{where} interface: the default route's interface: {e}") from None
        if interfaces.get(uplink, {}).get("bridge"):
            raise PlanError(f"{where} interface: the default route goes through bridge {uplink}, not"
                            f" {bridge}: set the uplink to move into {bridge}")
    info = interfaces.get(uplink)
    if facts.get("live") and interfaces and info is None:
        raise PlanError(f"{where} interface: no interface {uplink} on this host"
                        f" (has: {', '.join(sorted(interfaces))})")
    if info and info.get("wireless"):
        raise PlanError(f"{where} interface: {uplink} is wireless; a wireless uplink cannot be a bridge port")
    if uplink == bridge:
        raise PlanError(f"{where} interface: the uplink cannot be the bridge {bridge} itself")
    return uplink


# -- ifupdown ------------------------------------------------------------------------

def interfaces_lines(text: str) -> list[str]:
    """interfaces(5) text as logical lines: comment lines (those starting with #)
    gone, backslash continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = "" if raw.lstrip().startswith("#") else raw
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out + ([pending] if pending else [])


def parse_interfaces(text: str) -> dict:
    """{"auto": [names brought up at boot, auto and allow-hotplug], "ifaces": {name:
    {family: method}}, "options": {name: {option: value}}, "sources": [globs of source
    lines], "source_dirs": [folders of source-directory lines]}."""
    auto: list[str] = []
    ifaces: dict[str, dict[str, str]] = {}
    options: dict[str, dict[str, str]] = {}
    sources, source_dirs = [], []
    current = None
    for line in interfaces_lines(text):
        words = line.split()
        if not words:
            continue
        head = words[0]
        if head == "iface" and len(words) >= 4:
            current = words[1]
            ifaces.setdefault(current, {})[words[2]] = words[3]
            options.setdefault(current, {})
        elif head == "auto" or head.startswith("allow-"):
            auto += [w for w in words[1:] if w not in auto]
            current = None
        elif head == "source" and len(words) > 1:
            sources.append(words[1])
            current = None
        elif head in ("source-directory", "source-dir") and len(words) > 1:
            source_dirs.append(words[1])
            current = None
        elif head in ("mapping", "rename"):
            current = None
        elif current is not None:
            options[current][head] = " ".join(words[1:])
    return {"auto": auto, "ifaces": ifaces, "options": options, "sources": sources, "source_dirs": source_dirs}


def without_interface(text: str, name: str, note: str) -> str:
    """``text`` with the stanzas of interface ``name`` commented out (its ``iface``
    blocks and its word on ``auto``/``allow-*`` lines), each commented line led by
    ``note``, so the file still shows what it was. Other lines are kept as they are."""
    out: list[str] = []
    in_block = False
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        head = words[0] if words else ""
        if head in ("iface", "mapping", "auto", "source", "source-directory", "rename") or head.startswith("allow-"):
            in_block = head == "iface" and len(words) > 1 and words[1] == name
            if (head == "auto" or head.startswith("allow-")) and name in words[1:]:
                rest = [w for w in words[1:] if w != name]
                out.append(f"# {note}: {line.strip()}")
                if rest:
                    out.append(" ".join([head, *rest]))
                continue
        if in_block and words:
            out.append(f"# {note}: {line}")
        else:
            out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") or not text else "")


def stanza_files(main_text: str, listdir) -> list[str]:
    """The files ifupdown reads: /etc/network/interfaces, then what its ``source``
    globs (relative to /etc/network) and ``source-directory`` folders name.
    ``listdir(folder)`` lists a folder of the target."""
    parsed = parse_interfaces(main_text)
    files = [IFUPDOWN_FILE]
    for pattern in parsed["sources"]:
        pattern = pattern if pattern.startswith("/") else f"/etc/network/{pattern}"
        folder, _, glob = pattern.rpartition("/")
        files += sorted(f"{folder}/{n}" for n in listdir(folder) if fnmatch.fnmatch(n, glob) and not n.startswith("."))
    for folder in parsed["source_dirs"]:
        folder = folder if folder.startswith("/") else f"/etc/network/{folder}"
        # run-parts names only: letters, digits, _ and -
        files += sorted(f"{folder}/{n}" for n in listdir(folder) if re.fullmatch(r"[A-Za-z0-9_-]+", n))
    return list(dict.fromkeys(files))


def render_stanza(bridge: str, uplink: str, ip: str, address: str | None = None, gateway: str | None = None,
                  dns: list[str] | tuple = ()) -> str:
    """The bridge's stanza for ifupdown with bridge-utils (bridge_ports), wearing the
    uplink's MAC (bridge_hw), so DHCP hands it the address the host already had."""
    lines = ["# Written by xenrun (S11): the bridge Xen guests attach to. Edits here are replaced.",
             f"auto {bridge}", f"iface {bridge} inet {ip}",
             f"    bridge_ports {uplink}", f"    bridge_hw {uplink}",
             "    bridge_stp off", "    bridge_fd 0", "    bridge_maxwait 0"]
    if ip == "static":
        lines.append(f"    address {address}")
        if gateway:
            lines.append(f"    gateway {gateway}")
    if dns:
        lines.append(f"    dns-nameservers {' '.join(dns)}")
    return "\n".join(lines) + "\n"


# -- systemd-networkd -------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """An INI-style systemd file: {section: {key: [values, in order]}}."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
        elif section is not None and "=" in line:
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
    return out


def network_matches(text: str, name: str) -> bool:
    """Does the [Match] section of a .network file match interface ``name`` by its
    Name= globs (only Name is read: a file matching by MAC or type counts too,
    since it may take the interface)?"""
    match = parse_unit(text).get("Match", {})
    names = " ".join(match.get("Name", [])).split()
    if not names:
        return True  # no Name: every interface, or those of a MAC or a type, which may be ours
    negate = names[0].startswith("!")
    hit = any(fnmatch.fnmatchcase(name, n.lstrip("!")) for n in names)
    return hit != negate


def render_netdev(bridge: str, mac: str | None) -> str:
    lines = ["# Written by xenrun (S11): the bridge Xen guests attach to. Edits here are replaced.",
             "[NetDev]", f"Name={bridge}", "Kind=bridge"]
    if mac:  # the uplink's MAC, so DHCP hands the bridge the address the host already had
        lines.append(f"MACAddress={mac}")
    lines += ["", "[Bridge]", "STP=no", "ForwardDelaySec=0"]
    return "\n".join(lines) + "\n"


def render_port_network(bridge: str, uplink: str) -> str:
    return "\n".join(["# Written by xenrun (S11): the uplink is a port of the bridge. Edits here are replaced.",
                      "[Match]", f"Name={uplink}", "", "[Network]", f"Bridge={bridge}"]) + "\n"


def render_bridge_network(bridge: str, ip: str, address: str | None = None, gateway: str | None = None,
                          dns: list[str] | tuple = ()) -> str:
    lines = ["# Written by xenrun (S11): the bridge's address. Edits here are replaced.",
             "[Match]", f"Name={bridge}", "", "[Network]"]
    if ip == "dhcp":
        lines.append("DHCP=ipv4")
    else:
        lines.append(f"Address={address}")
        if gateway:
            lines.append(f"Gateway={gateway}")
    lines += [f"DNS={d}" for d in dns]
    return "\n".join(lines) + "\n"


# -- systemd unit names ------------------------------------------------------------------

def systemd_escape(text: str) -> str:
    """What ``systemd-escape`` makes of ``text`` (the instance part of a unit name)."""
    out = []
    for i, byte in enumerate(text.encode()):
        c = chr(byte)
        if c == "/":
            out.append("-")
        elif (c.isascii() and c.isalnum()) or c in ":_" or (c == "." and i > 0):
            out.append(c)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def systemd_unescape(text: str) -> str:
    """The reverse of systemd_escape."""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text.startswith("\\x", i) and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2:i + 4]):
            raw.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            raw += b"/" if text[i] == "-" else text[i].encode()
            i += 1
    return raw.decode(errors="replace")


def check_stack(facts, mine: str, where: str) -> None:
    """Refuse (PlanError) a network plugin whose stack is not installed, or not the
    one in charge of the uplink, naming the right choice."""
    installed = facts.get("network_stacks")
    stack, why = facts.get("network_stack"), facts.get("network_stack_why")
    if stack and stack != mine:
        choice = (f"set network = \"{stack}\" in plugins.toml" if stack in PLUGINS else
                  f"xenrun has no plugin for {stack}: hand the uplink to one of {', '.join(PLUGINS)} first")
        raise PlanError(f"{where}: network = \"{mine}\", but {stack} is in charge of the uplink ({why}): {choice}")
    if installed is not None and mine not in installed:
        others = [s for s in installed if s in PLUGINS]
        raise PlanError(f"{where}: network = \"{mine}\", but {mine} is not installed here ({INSTALL[mine]})"
                        + (f"; installed: {', '.join(others)}" if others else ""))


PLUGINS = ("ifupdown", "networkd", "netctl")  # the builtin network plugins, by the stack they drive
INSTALL = {"ifupdown": "apt install ifupdown bridge-utils", "networkd": "it comes with systemd",
           "netctl": "pacman -S netctl, or apt install netctl"}


# -- which stack is in charge ---------------------------------------------------------------

def stack_in_charge(names: list[str], ifupdown: dict | None, networkd: list[tuple[str, str]] | None,
                    netctl: list[tuple[str, str]], wants: list[str]) -> tuple[str | None, str]:
    """The stack that brings up any of ``names`` (the uplink, and the bridge on a
    second run) at boot, and why: (stack, "FILE: what"), or (None, "") when none does.

    ``ifupdown``: parse_interfaces of the files ifupdown reads, merged, with the
    file of each interface (``"files"``); None when ifupdown is not installed.
    ``networkd``: (path, text) of the .network files when systemd-networkd is
    enabled, else None. ``netctl``: (profile, Interface=) of enabled profiles.
    ``wants``: the names in multi-user.target.wants."""
    for name in names:
        if ifupdown and name in ifupdown["ifaces"] and name in ifupdown["auto"]:
            return "ifupdown", f"{ifupdown['files'].get(name, IFUPDOWN_FILE)}: iface {name}"
        for path, text in networkd or ():
            if network_matches(text, name):
                return "networkd", f"{path} matches {name}"
        for profile, interface in netctl:
            if interface == name:
                return "netctl", f"netctl profile {profile} (Interface={name}) is enabled"
    if "NetworkManager.service" in wants:
        return "NetworkManager", f"{WANTS}/NetworkManager.service: NetworkManager is enabled"
    return None, ""
