"""netctl: the bridge xenbr0 that guests attach to, with netctl (step S11).

Writes /etc/netctl/<profile> from the article's bridge example (DHCP or a static
address), disables any enabled profile that would take the uplink back at boot, and
enables the bridge profile. On a live host the switch itself runs through a small
script installed on the host (SWITCH_PATH): it stops the old profile, starts the
bridge and, unless the uplink is a port of the bridge, the bridge is up with its
address, the default route goes through it and the gateway answers within
``timeout`` seconds, it puts the old configuration back and fails, so a remote admin
is never left cut off. The script ignores SIGHUP, so a dropped SSH session does not
stop it half way.

Facts (netctl_*) come from /etc/netctl and the systemd wants folder, parsed by the
pure functions below; ``bridge_status`` checks ``ip -j link`` / ``ip -j addr`` the
same way the script's ``check`` does.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from dataclasses import dataclass

from xenrun.api import (hookimpl, warn, checks as check, RemoveFile, RunCommand, WriteFile, PlanError, TargetError,
                        Setting)


PROFILE_DIR = "/etc/netctl"
WANTS_DIR = "/etc/systemd/system/multi-user.target.wants"
UNIT_DIR = "/etc/systemd/system"
SWITCH_PATH = "/usr/local/lib/xenrun/netctl-switch"
STEP = "S11"
# what netctl's list_profiles skips in /etc/netctl (besides folders and dot files)
_NOT_PROFILES = (".action", ".conf", ".service")
DHCP_CLIENTS = ("dhclient", "dhcpcd")  # what netctl's IP=dhcp can run
_BIN = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


# -- settings checks --------------------------------------------------------------------

def profile_name(value) -> str:
    """A netctl profile name that netctl itself lists (no .conf, .action, .service)."""
    value = check.name(value)
    if value.endswith(_NOT_PROFILES):
        raise ValueError(f"{value!r}: netctl ignores profiles ending in {', '.join(_NOT_PROFILES)}")
    return value


def ipv4_list(value) -> list[str]:
    """A list of IPv4 addresses, as ["192.168.1.1", "9.9.9.9"]."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of IPv4 addresses, got {check._kind(value)}")
    return [check.ipv4_address(v) for v in value]


@hookimpl
def declare_settings():
    return {"netctl": {
        "bridge": Setting(check.interface, "xenbr0", "the bridge guests attach to"),
        "interface": Setting(check.interface, None,
                             "the uplink moved into the bridge; default: the interface of the default route"),
        "ip": Setting(check.choice("dhcp", "static"), "dhcp", "how the bridge gets its IPv4 address"),
        "address": Setting(check.ipv4_interface, None, "the bridge's address with prefix (ip = \"static\")",
                           examples=("192.168.1.10/24",)),
        "gateway": Setting(check.ipv4_address, None,
                           "default gateway (static); with dhcp only the address the safety check pings"),
        "dns": Setting(ipv4_list, [], "name servers written to the profile"),
        "profile": Setting(profile_name, None,
                           "profile file name in /etc/netctl; default xenbridge-dhcp or xenbridge-static"),
        "timeout": Setting(check.positive_int, 30, "seconds the bridge has to come up before the old"
                           " network is put back (live hosts)"),
    }}


# -- pure functions ----------------------------------------------------------------------

def sh_quote(value: str) -> str:
    """``value`` as one bash word in single quotes, whatever it holds."""
    return "'" + value.replace("'", "'\\''") + "'"


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


def parse_ifupdown(text: str) -> list[str]:
    """/etc/network/interfaces -> interfaces brought up at boot (auto, allow-hotplug)."""
    names = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words and (words[0] == "auto" or words[0].startswith("allow-")):
            names += [w for w in words[1:] if w != "lo"]
    return names


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
    """netctl profiles (interface, enabled, active), and ifupdown's boot interfaces."""
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
    found = {c for c in DHCP_CLIENTS for d in _BIN if probe.exists(f"{d}/{c}")}
    return {"netctl_profiles": profiles,
            "netctl_dhcp_clients": sorted(found),
            "netctl_ifupdown": parse_ifupdown(probe.text("/etc/network/interfaces") or ""),
            "netctl_ping": any(probe.exists(f"{d}/ping") for d in _BIN)}


# -- plan ------------------------------------------------------------------------------

@hookimpl
def configure_network(facts, host):
    s = host.settings["netctl"]
    bridge, ip = s["bridge"], s["ip"]
    profile = s["profile"] or f"xenbridge-{ip}"
    where = f"{host.name}: [plugin.netctl]"
    _check_addresses(s, where)
    profiles = facts.get("netctl_profiles") or {}
    uplink = _uplink(facts, s, profiles.get(profile), where)
    if uplink == bridge:
        raise PlanError(f"{where} interface: the uplink cannot be the bridge {bridge} itself")

    path = f"{PROFILE_DIR}/{profile}"
    content = render_profile(bridge, uplink, ip, s["address"], s["gateway"], s["dns"], _dhcp_client(facts, ip))
    changes = [WriteFile(path, content, mode=0o644, validate=("bash", "-n", "{}"), step=STEP,
                         why=f"netctl profile for bridge {bridge} over {uplink} ({ip})")]
    fighting = _fighting(profiles, profile, uplink, bridge)
    for name, info in fighting:
        if not info["enabled"]:
            continue
        reason = (f"disable netctl profile {name} (Interface={info['interface']}): enabled for {uplink},"
                  f" it would take {uplink} back from {bridge} at boot")
        changes.append(RemoveFile(info["wants"], step=STEP, why=reason))
        if info.get("dropin"):
            changes.append(RemoveFile(info["dropin"], step=STEP, why=f"the rest of disabling {name}"))
    if uplink in (facts.get("netctl_ifupdown") or []):
        warn(f"/etc/network/interfaces brings up {uplink} at boot too: remove that stanza,"
                    f" or it fights {bridge} over {uplink} (S11)")

    if facts.get("live"):
        changes += _switch(s, facts, profile, uplink, fighting)
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


def _check_addresses(s, where: str) -> None:
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


def _uplink(facts, s, own: dict | None, where: str) -> str:
    """The interface moved into the bridge: the setting, else the default route's
    interface, else (when that is already our bridge) the one our profile binds."""
    interfaces = {i["name"]: i for i in facts.get("interfaces") or []}
    bridge = s["bridge"]
    uplink = s["interface"]
    if uplink is None:
        found = facts.get("uplink")
        if found == bridge:  # a second run: the default route already goes through the bridge
            binds = (own or {}).get("binds_to") or []
            found = binds[0] if len(binds) == 1 else facts.get("bridge_port")
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
    return uplink


def _fighting(profiles: dict, own: str, uplink: str, bridge: str) -> list[tuple[str, dict]]:
    """Other profiles that drive the uplink or the bridge."""
    return [(name, info) for name, info in sorted(profiles.items())
            if name != own and (info.get("interface") in (uplink, bridge) or uplink in info.get("binds_to", []))]


def _switch(s, facts, profile: str, uplink: str, fighting) -> list:
    """The switch on a live host: the script, and its run unless already done."""
    if not facts.get("netctl_ping", True):
        warn("ping is not installed: the switch's gateway check fails without it (install iputils-ping)")
    running = [n for n, i in fighting if i.get("active")] or [n for n, i in fighting if i.get("enabled")]
    # names netctl could mistake for options are never handed over; the script restores by hand then
    old = next((n for n in running if not n.startswith("-")), "-")
    expected = s["address"] if s["ip"] == "static" else "dhcp"
    return [
        WriteFile(SWITCH_PATH, SWITCH_SCRIPT, mode=0o755, validate=("sh", "-n", "{}"), step=STEP,
                  why="the script that switches to the bridge and puts the old network back if it fails"),
        RunCommand((SWITCH_PATH, "switch", old, profile, s["bridge"], uplink, expected,
                    s["gateway"] or "-", str(s["timeout"])),
                   unless=(SWITCH_PATH, "check", s["bridge"], uplink, expected), step=STEP,
                   # the script gives up and reverts after `timeout` s; this bounds a hung netctl
                   timeout=s["timeout"] + 120,
                   why=f"move {uplink} into {s['bridge']} (netctl start {profile}), reverting"
                       f" to {old if old != '-' else 'the old addresses'} unless it works within {s['timeout']} s"),
    ]


SWITCH_SCRIPT = r"""#!/bin/sh
# netctl-switch: move an uplink into a netctl bridge without cutting the host off.
# Installed by xenrun (step S11); replaced on every run.
#
#   netctl-switch switch OLD|- NEW BRIDGE UPLINK ADDRESS/PREFIX|dhcp GATEWAY|- TIMEOUT
#   netctl-switch check BRIDGE UPLINK ADDRESS/PREFIX|dhcp
#
# switch: stops profile OLD, starts profile NEW and waits up to TIMEOUT seconds for
# UPLINK to be a port of BRIDGE, BRIDGE up with the address, the default route through
# BRIDGE and the gateway answering ping. If anything fails it stops NEW, puts the old
# network back (OLD, or the addresses and route recorded before) and exits 1.
# check: exits 0 when the bridge is already as expected; changes nothing.
# NETCTL (environment) is the command taking "start|stop PROFILE"; default netctl.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
# a dropped SSH session must not stop the switch half way
trap '' HUP PIPE
NETCTL=${NETCTL:-netctl}

say() {
    printf 'netctl-switch: %s\n' "$*" >&2
    command -v logger >/dev/null 2>&1 && logger -t xenrun-netctl-switch -- "$*" 2>/dev/null
    return 0
}

usage() {
    say "$1"
    say "usage: $0 switch OLD|- NEW BRIDGE UPLINK ADDRESS/PREFIX|dhcp GATEWAY|- TIMEOUT"
    say "       $0 check BRIDGE UPLINK ADDRESS/PREFIX|dhcp"
    exit 2
}

is_ifname() {
    case $1 in ''|-*|*[!A-Za-z0-9_.-]*) return 1 ;; esac
    [ "${#1}" -le 15 ]
}

is_profile() {
    case $1 in ''|-*|.*|*/*) return 1 ;; esac
    return 0
}

is_address() {
    [ "$1" = dhcp ] && return 0
    case $1 in ''|*[!0-9./]*) return 1 ;; */*) return 0 ;; esac
    return 1
}

is_ipv4() {
    case $1 in ''|*[!0-9.]*) return 1 ;; esac
    return 0
}

# the global IPv4 addresses of an interface, one per line
addresses() {
    ip -o -4 addr show dev "$1" scope global 2>/dev/null | awk '{ print $4 }'
}

# the gateway of the default route through an interface ("-" without one)
default_gateway() {
    ip -4 route show default 2>/dev/null | awk -v dev="$1" '{
        d = ""; g = "-"
        for (i = 1; i < NF; i++) { if ($i == "dev") d = $(i + 1); if ($i == "via") g = $(i + 1) }
        if (d == dev) { print g; exit }
    }'
}

is_port() {
    ip -o link show dev "$2" 2>/dev/null | grep -Fq " master $1 "
}

is_up() {
    line=$(ip -o link show dev "$1" 2>/dev/null) || return 1
    flags=${line#*<}
    flags=${flags%%>*}
    case ",$flags," in *,UP,*) ;; *) return 1 ;; esac
    case $line in *" state UP "*|*" state UNKNOWN "*) return 0 ;; esac
    return 1
}

has_address() {
    have=$(addresses "$1")
    if [ "$2" = dhcp ]; then
        [ -n "$have" ]
    else
        printf '%s\n' "$have" | grep -Fxq -- "$2"
    fi
}

# the first thing wrong with the bridge, or nothing: the rules of xenrun's bridge_status
bridge_problem() {
    is_port "$1" "$2" || { echo "$2 is not a port of $1"; return; }
    is_up "$1" || { echo "$1 is not up"; return; }
    has_address "$1" "$3" || echo "$1 has not the address $3 (has: $(addresses "$1" | tr '\n' ' '))"
}

# everything the switch waits for; prints the first failure
switch_problem() {
    problem=$(bridge_problem "$bridge" "$uplink" "$want")
    [ -n "$problem" ] && { echo "$problem"; return; }
    route_gw=$(default_gateway "$bridge")
    if [ -z "$route_gw" ]; then
        [ "$need_route" = yes ] && echo "the default route does not go through $bridge"
        return
    fi
    target=$gateway
    [ "$target" = - ] && target=$route_gw
    [ "$target" = - ] && return
    command -v ping >/dev/null 2>&1 || { echo "cannot check gateway $target: ping is not installed"; return; }
    ping -c 1 -W 1 -I "$bridge" "$target" >/dev/null 2>&1 || echo "gateway $target does not answer ping through $bridge"
}

restore_by_hand() {
    if [ "$had_bridge" = yes ] && [ "$was_port" = yes ]; then
        ip link show dev "$bridge" >/dev/null 2>&1 || ip link add name "$bridge" type bridge
        ip link set dev "$uplink" master "$bridge"
        ip link set dev "$bridge" up
    fi
    ip link set dev "$uplink" up
    printf '%s\n' "$old_uplink_addrs" | while read -r a; do
        [ -n "$a" ] && ip addr replace "$a" brd + dev "$uplink"
    done
    printf '%s\n' "$old_bridge_addrs" | while read -r a; do
        [ -n "$a" ] && ip addr replace "$a" brd + dev "$bridge"
    done
    if [ -n "$old_gw" ] && [ "$old_gw" != - ]; then
        ip route replace default via "$old_gw" dev "$old_gw_dev" || say "could not put back the default route via $old_gw"
    fi
}

revert() {
    say "FAILED: $1"
    say "putting the old network back"
    "$NETCTL" stop "$new" >/dev/null 2>&1
    # a profile that failed to start is not stopped by netctl: undo its bridge by hand
    if is_port "$bridge" "$uplink" && [ "$was_port" != yes ]; then
        ip link set dev "$uplink" nomaster
    fi
    if [ "$had_bridge" = no ] && ip link show dev "$bridge" >/dev/null 2>&1; then
        ip link del dev "$bridge"
    fi
    ip link set dev "$uplink" promisc off 2>/dev/null
    if [ "$old" != - ] && "$NETCTL" start "$old"; then
        back="started $old again"
    else
        [ "$old" != - ] && say "starting $old failed; putting the recorded addresses back by hand"
        restore_by_hand
        back="put back by hand: $uplink has $(addresses "$uplink" | tr '\n' ' ')"
    fi
    # last, so that it is what a caller showing the tail of the output shows
    say "FAILED: $1; $back"
    exit 1
}

do_switch() {
    [ "$#" -eq 7 ] || usage "switch takes 7 arguments, got $#"
    old=$1 new=$2 bridge=$3 uplink=$4 want=$5 gateway=$6 timeout=$7
    [ "$old" = - ] || is_profile "$old" || usage "bad old profile name: $old"
    is_profile "$new" || usage "bad profile name: $new"
    is_ifname "$bridge" || usage "bad bridge name: $bridge"
    is_ifname "$uplink" || usage "bad uplink name: $uplink"
    is_address "$want" || usage "bad address: $want"
    [ "$gateway" = - ] || is_ipv4 "$gateway" || usage "bad gateway: $gateway"
    case $timeout in ''|*[!0-9]*) usage "bad timeout: $timeout" ;; esac

    if [ -z "$(bridge_problem "$bridge" "$uplink" "$want")" ]; then
        say "$bridge is already up with $uplink and $want; nothing to do"
        exit 0
    fi
    # the state to go back to
    old_uplink_addrs=$(addresses "$uplink")
    old_bridge_addrs=$(addresses "$bridge")
    had_bridge=no
    ip link show dev "$bridge" >/dev/null 2>&1 && had_bridge=yes
    was_port=no
    is_port "$bridge" "$uplink" && was_port=yes
    old_gw=$(default_gateway "$uplink")
    old_gw_dev=$uplink
    if [ -z "$old_gw" ] && [ "$had_bridge" = yes ]; then
        old_gw=$(default_gateway "$bridge")
        old_gw_dev=$bridge
    fi
    # whoever reached the host through the old default route must still reach it
    need_route=no
    { [ "$gateway" != - ] || [ -n "$old_gw" ]; } && need_route=yes
    say "before: $uplink has $(printf '%s\n' "$old_uplink_addrs" | tr '\n' ' ')default via ${old_gw:-none};" \
        "switching from $old to $new"

    if [ "$old" != - ]; then
        "$NETCTL" stop "$old" || say "stopping $old failed; going on"
    fi
    "$NETCTL" start "$new" || revert "$NETCTL start $new failed"
    start=$(date +%s)
    while :; do
        problem=$(switch_problem)
        [ -z "$problem" ] && break
        [ $(( $(date +%s) - start )) -ge "$timeout" ] && revert "after $timeout s: $problem"
        sleep 1
    done
    say "ok: $uplink is a port of $bridge, which has $(addresses "$bridge" | tr '\n' ' ')"
    exit 0
}

do_check() {
    [ "$#" -eq 3 ] || usage "check takes 3 arguments, got $#"
    if ! { is_ifname "$1" && is_ifname "$2" && is_address "$3"; }; then
        usage "bad arguments to check"
    fi
    problem=$(bridge_problem "$1" "$2" "$3")
    [ -z "$problem" ] && exit 0
    echo "$problem"
    exit 1
}

command=${1:-}
[ "$#" -gt 0 ] && shift
case $command in
    switch) do_switch "$@" ;;
    check) do_check "$@" ;;
    *) usage "unknown command: $command" ;;
esac
"""
