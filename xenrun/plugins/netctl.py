"""netctl: the bridge xenbr0 that guests attach to, with netctl (step S11).

Writes /etc/netctl/<profile> from the article's bridge example (DHCP or a static
address), disables any enabled profile that would take the uplink back at boot, and
enables the bridge profile. On a live host the core's lockout-safe switch
(xenrun.netswitch) makes it live: ``netctl stop`` of the old profile, the new
profile in place, ``netctl start`` of the bridge, and the way back (``netctl stop``
of the bridge, the old files, ``netctl start`` of the old profile) if the bridge is
not up with its address and gateway within ``timeout`` seconds.

Facts (netctl_*) come from /etc/netctl and the systemd wants folder, parsed by the
pure functions below; ``bridge_status`` checks ``ip -j link`` / ``ip -j addr`` the
same way the script's ``check`` does.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass

from xenrun.api import (
    RemoveFile,
    RunCommand,
    Setting,
    SwitchNetwork,
    TargetError,
    WriteFile,
    hookimpl,
    netconf,
    warn,
)
from xenrun.api import checks as check

PROFILE_DIR = "/etc/netctl"
WANTS_DIR = "/etc/systemd/system/multi-user.target.wants"
UNIT_DIR = "/etc/systemd/system"
STEP = "S11"
# what netctl's list_profiles skips in /etc/netctl (besides folders and dot files)
_NOT_PROFILES = (".action", ".conf", ".service")
DHCP_CLIENTS = ("dhclient", "dhcpcd")  # what netctl's IP=dhcp can run


# -- settings checks --------------------------------------------------------------------

def profile_name(value) -> str:
    """A netctl profile name that netctl itself lists (no .conf, .action, .service)."""
    value = check.name(value)
    if value.endswith(_NOT_PROFILES):
        raise ValueError(f"{value!r}: netctl ignores profiles ending in {', '.join(_NOT_PROFILES)}")
    return value


@hookimpl
def declare_settings():
    return {"netctl": {
        **netconf.bridge_settings("the profile"),
        "profile": Setting(profile_name, None,
                           "profile file name in /etc/netctl; default xenbridge-dhcp or xenbridge-static"),
    }}


# -- pure functions ----------------------------------------------------------------------

def sh_quote(value: str) -> str:
    """``value`` as one bash word in single quotes, whatever it holds."""
    return "'" + value.replace("'", "'\\''") + "'"


systemd_escape, systemd_unescape = netconf.systemd_escape, netconf.systemd_unescape


def unit_name(profile: str) -> str:
    """The systemd unit ``netctl enable`` makes for ``profile``."""
    return f"netctl@{systemd_escape(profile)}.service"


def render_profile(bridge: str, uplink: str, ip: str, address: str | None = None,
                   gateway: str | None = None, dns: list[str] | tuple = (),
                   dhcp_client: str | None = None) -> str:
    """The bridge profile of the article's example, every value quoted for bash."""
    lines = [
        "# Written by xenrun (S11): the bridge Xen guests attach to. Edits here are replaced.",
        "Description=" + sh_quote("Xen bridge connection"),
        # bare word: netctl's switch-to greps Interface= without quotes (names are validated)
        "Interface=" + shlex.quote(bridge),
        "Connection=bridge",
        f"BindsToInterfaces=({shlex.quote(uplink)})",
        # the bridge takes the uplink's MAC, so DHCP hands it the address the host
        # already had and an SSH session survives the switch
        "MACAddress=" + shlex.quote(uplink),
        f"IP={ip}",
    ]
    if ip == "dhcp" and dhcp_client:
        lines.append("DHCPClient=" + sh_quote(dhcp_client))
    if ip == "static":
        lines.append(f"Address=({sh_quote(address)})")
        if gateway:
            lines.append("Gateway=" + sh_quote(gateway))
    if dns:
        lines.append("DNS=(" + " ".join(sh_quote(d) for d in dns) + ")")
    return "\n".join(lines) + "\n"


_ASSIGN = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def parse_profile(text: str) -> dict[str, str | list[str]]:
    """The plain ``Key=value`` and ``Key=(a b)`` assignments of a netctl profile, read
    as bash would quote them but never run. Anything cleverer is skipped."""
    out: dict[str, str | list[str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _ASSIGN.fullmatch(lines[i])
        i += 1
        if not m:
            continue
        key, value = m.group(1), m.group(2)
        if value.startswith("("):
            while True:  # an array may span lines
                words = _words(value[1:], array=True)
                if words is not None or i >= len(lines):
                    break
                value += "\n" + lines[i]
                i += 1
            if words is not None:
                out[key] = words
        else:
            words = _words(value, array=False)
            if words is not None:
                out[key] = " ".join(words)
    return out


def _words(text: str, array: bool) -> list[str] | None:
    lexer = shlex.shlex(text, posix=True, punctuation_chars="()" if array else "")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an open quote: the value goes on
        return None
    if array:
        if ")" not in tokens:
            return None
        return tokens[:tokens.index(")")]
    return tokens


def profile_summary(text: str) -> dict:
    """What the plan needs of one profile: interface, connection, IP and the
    interfaces it binds (BindsToInterface, a common misspelling, counted too)."""
    p = parse_profile(text)
    binds = p.get("BindsToInterfaces", p.get("BindsToInterface", []))
    return {"interface": p.get("Interface") if isinstance(p.get("Interface"), str) else None,
            "connection": p.get("Connection") if isinstance(p.get("Connection"), str) else None,
            "ip": p.get("IP") if isinstance(p.get("IP"), str) else None,
            "binds_to": list(binds) if isinstance(binds, list) else [binds]}


def parse_wants(names: list[str]) -> dict[str, str]:
    """Names in multi-user.target.wants -> {profile: unit file name} of netctl units."""
    out = {}
    for n in names:
        m = re.fullmatch(r"netctl@(.+)\.service", n)
        if m:
            out[systemd_unescape(m.group(1))] = n
    return out


def parse_netctl_list(text: str) -> list[str]:
    """``netctl list`` -> the active profiles (marked with '*')."""
    return [line[1:].strip() for line in text.splitlines() if line.startswith("*")]


@dataclass(frozen=True)
class BridgeStatus:
    """What ``ip -j link`` and ``ip -j addr`` say about the bridge."""

    uplink_is_port: bool
    bridge_up: bool
    address_ok: bool
    addresses: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.uplink_is_port and self.bridge_up and self.address_ok

    def problems(self, bridge: str, uplink: str, expected: str) -> list[str]:
        out = []
        if not self.uplink_is_port:
            out.append(f"{uplink} is not a port of {bridge}")
        if not self.bridge_up:
            out.append(f"{bridge} is not up")
        if not self.address_ok:
            want = "an IPv4 address" if expected == "dhcp" else expected
            out.append(f"{bridge} has not {want} (has: {', '.join(self.addresses) or 'none'})")
        return out


def bridge_status(link_json: str, addr_json: str, bridge: str, uplink: str, expected: str) -> BridgeStatus:
    """Is ``uplink`` a port of ``bridge``, is the bridge up, and does it hold
    ``expected`` ("A.B.C.D/P", or "dhcp" for any global IPv4 address)? The same
    rules as the switch script's ``check``."""
    links = {x.get("ifname"): x for x in json.loads(link_json or "[]")}
    port = links.get(uplink, {}).get("master") == bridge
    br = links.get(bridge)
    up = bool(br) and "UP" in br.get("flags", []) and br.get("operstate") in ("UP", "UNKNOWN")
    addrs = []
    for entry in json.loads(addr_json or "[]"):
        if entry.get("ifname") == bridge:
            addrs += [f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])
                      if a.get("family") == "inet" and a.get("scope") == "global"]
    ok = bool(addrs) if expected == "dhcp" else expected in addrs
    return BridgeStatus(port, up, ok, tuple(addrs))


# -- facts -----------------------------------------------------------------------------

@hookimpl
def detect_hardware(probe):
    """netctl profiles (interface, enabled, active) and the DHCP clients netctl can run."""
    enabled = parse_wants(probe.listdir(WANTS_DIR))
    active = None
    if probe.live:
        listing = probe.command(["netctl", "list"])
        active = parse_netctl_list(listing) if listing is not None else None
    profiles = {}
    for name in probe.listdir(PROFILE_DIR):
        if name.startswith(".") or name.endswith("~") or name.endswith(_NOT_PROFILES):
            continue
        try:
            text = probe.text(f"{PROFILE_DIR}/{name}")
        except TargetError:  # a folder (hooks, interfaces, examples)
            continue
        if text is None:
            continue
        unit = enabled.get(name)
        dropin = f"{UNIT_DIR}/{unit_name(name)}.d/profile.conf"
        profiles[name] = {**profile_summary(text), "enabled": unit is not None,
                          "wants": f"{WANTS_DIR}/{unit}" if unit else None,
                          "dropin": dropin if probe.exists(dropin) else None,
                          "active": None if active is None else name in active}
    found = {c for c in DHCP_CLIENTS if probe.installed(c)}
    return {"netctl_profiles": profiles,
            "netctl_dhcp_clients": sorted(found),
            "netctl_ping": probe.installed("ping")}


# -- plan ------------------------------------------------------------------------------

@hookimpl
def configure_network(facts, host):
    s, where = netconf.bridge_plan(facts, host, "netctl")
    bridge, ip = s["bridge"], s["ip"]
    profile = s["profile"] or f"xenbridge-{ip}"
    profiles = facts.get("netctl_profiles") or {}
    uplink = netconf.find_uplink(facts, s, where, (profiles.get(profile) or {}).get("binds_to") or [])

    path = f"{PROFILE_DIR}/{profile}"
    content = render_profile(bridge, uplink, ip, s["address"], s["gateway"], s["dns"], _dhcp_client(facts, ip))
    profile_file = WriteFile(path, content, mode=0o644, validate=("bash", "-n", "{}"), step=STEP,
                             why=f"netctl profile for bridge {bridge} over {uplink} ({ip})")
    fighting = _fighting(profiles, profile, uplink, bridge)
    changes = [_switch(s, facts, profile, uplink, fighting, profile_file)]
    for name, info in fighting:
        if not info["enabled"]:
            continue
        reason = (f"disable netctl profile {name} (Interface={info['interface']}): enabled for {uplink},"
                  f" it would take {uplink} back from {bridge} at boot")
        changes.append(RemoveFile(info["wants"], step=STEP, why=reason))
        if info.get("dropin"):
            changes.append(RemoveFile(info["dropin"], step=STEP, why=f"the rest of disabling {name}"))

    unit = unit_name(profile)
    wants = f"{WANTS_DIR}/{unit}"
    # reenable also regenerates the unit's drop-in when the profile changed
    changes.append(RunCommand(("netctl", "reenable", profile), creates=wants, onchange=(path,),
                              writes=(wants, f"{UNIT_DIR}/{unit}.d/profile.conf"), step=STEP,
                              why=f"start the bridge at boot (netctl enable {profile})"))
    return changes


def _dhcp_client(facts, ip: str) -> str | None:
    """The DHCP client to name in the profile: only when exactly one is installed,
    since netctl's default differs (dhcpcd on Arch, dhclient on Debian)."""
    clients = facts.get("netctl_dhcp_clients")
    if ip != "dhcp" or clients is None:
        return None
    if not clients:
        warn("neither dhclient nor dhcpcd is installed: ip = \"dhcp\" needs one (S11)")
        return None
    return clients[0] if len(clients) == 1 else None


def _fighting(profiles: dict, own: str, uplink: str, bridge: str) -> list[tuple[str, dict]]:
    """Other profiles that drive the uplink or the bridge."""
    return [(name, info) for name, info in sorted(profiles.items())
            if name != own and (info.get("interface") in (uplink, bridge) or uplink in info.get("binds_to", []))]


def _switch(s, facts, profile: str, uplink: str, fighting, profile_file) -> SwitchNetwork:
    """The profile, made live by the core's switch on a live host (elsewhere only written)."""
    if facts.get("live") and not facts.get("netctl_ping", True):
        warn("ping is not installed: the switch's gateway check fails without it (install iputils-ping)")
    running = [n for n, i in fighting if i.get("active")] or [n for n, i in fighting if i.get("enabled")]
    # names netctl could mistake for options are never handed over; the switch restores by hand then
    old = next((n for n in running if not n.startswith("-")), None)
    return SwitchNetwork(
        bridge=s["bridge"], uplink=uplink, address=s["address"] if s["ip"] == "static" else "dhcp",
        gateway=s["gateway"], switch_timeout=s["timeout"], files=[profile_file],
        stop=[("netctl", "stop", old)] if old else [], start=[("netctl", "start", profile)],
        undo=[("netctl", "stop", profile)], restart=[("netctl", "start", old)] if old else [], step=STEP,
        why=f"move {uplink} into {s['bridge']} (netctl start {profile}), back to"
            f" {old or 'the old addresses'} unless it works within {s['timeout']} s")
