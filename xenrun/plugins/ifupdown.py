"""ifupdown: the bridge xenbr0 that guests attach to, in Debian's own
/etc/network/interfaces (step S11), with bridge-utils' ``bridge_ports``.

The bridge's stanza goes to /etc/network/interfaces.d/xenrun-BRIDGE (sourced by
Debian's stock file; a ``source`` line for it is added when the file does not read
that folder), wearing the uplink's MAC (``bridge_hw``) so that DHCP hands it the
address the host already had. The uplink's own stanzas (``allow-hotplug eth0``,
``iface eth0 inet dhcp``, ...) are commented out where they are, each line kept and
marked, so that ifupdown does not fight the bridge over it at boot.

On a live host the core's lockout-safe switch (xenrun.netswitch) makes it live:
``ifdown`` of the uplink with the old files, the new files, ``ifup`` of the bridge,
and the way back (``ifdown`` of the bridge, the old files, ``ifup`` of the uplink).
"""

from __future__ import annotations

import fnmatch
import re

from xenrun.api import PlanError, SwitchNetwork, WriteFile, hookimpl, netconf, warn

STEP = "S11"
STANZA_DIR = "/etc/network/interfaces.d"
MARK = "xenrun S11: moved into the bridge"
DHCP_CLIENTS = ("dhclient", "dhcpcd", "udhcpc")  # what ifupdown's inet dhcp method runs


@hookimpl
def declare_settings():
    return {"ifupdown": netconf.bridge_settings("the stanza (dns-nameservers, read by resolvconf)")}


@hookimpl
def detect_hardware(probe):
    """The interfaces(5) files ifupdown reads (their text), bridge-utils, DHCP clients."""
    main = probe.text(netconf.IFUPDOWN_FILE)
    files = {}
    if main is not None:
        for path in netconf.stanza_files(main, probe.listdir):
            text = main if path == netconf.IFUPDOWN_FILE else probe.text(path)
            if text is not None:
                files[path] = text
    return {"ifupdown_files": files,
            "ifupdown_bridge_utils": probe.exists("/lib/bridge-utils/ifupdown.sh")
            or probe.exists("/usr/lib/bridge-utils/ifupdown.sh"),
            "ifupdown_dhcp_clients": sorted({c for c in DHCP_CLIENTS if probe.installed(c)})}


def stanza_path(bridge: str) -> str:
    # interfaces.d is read by run-parts rules under source-directory: letters, digits, _ and -
    return f"{STANZA_DIR}/xenrun-{re.sub(r'[^A-Za-z0-9_-]', '_', bridge)}"


def _sourced(files: dict[str, str], path: str) -> bool:
    """Is ``path`` among the files ifupdown reads, or would it be once written?"""
    if path in files:
        return True
    main = netconf.parse_interfaces(files.get(netconf.IFUPDOWN_FILE, ""))
    folder, name = path.rsplit("/", 1)
    for pattern in main["sources"]:
        pattern = pattern if pattern.startswith("/") else f"/etc/network/{pattern}"
        if pattern.rpartition("/")[0] == folder and fnmatch.fnmatch(name, pattern.rpartition("/")[2]):
            return True
    return any((d if d.startswith("/") else f"/etc/network/{d}") == folder for d in main["source_dirs"])


@hookimpl
def configure_network(facts, host):
    s, where = netconf.bridge_plan(facts, host, "ifupdown")
    bridge, ip = s["bridge"], s["ip"]
    if not facts.get("ifupdown_bridge_utils"):
        raise PlanError(f"{host.name}: network = \"ifupdown\" needs bridge-utils for bridge_ports"
                        " (apt install bridge-utils)")
    files = dict(facts.get("ifupdown_files") or {})
    if netconf.IFUPDOWN_FILE not in files:
        raise PlanError(f"{host.name}: network = \"ifupdown\", but {netconf.IFUPDOWN_FILE} is missing")
    own = stanza_path(bridge)
    mine = netconf.parse_interfaces(files.get(own, ""))
    ports = mine["options"].get(bridge, {}).get("bridge_ports", "").split()
    uplink = netconf.find_uplink(facts, s, where, ports)
    if ip == "dhcp" and facts.get("ifupdown_dhcp_clients") == []:
        warn("no DHCP client (dhclient, dhcpcd, udhcpc) is installed: ip = \"dhcp\" needs one"
             " (apt install isc-dhcp-client) (S11)")

    # the uplink's IPv6 moves with it; on a second run it is found in our own stanza
    new_files, had_stanza, inet6 = [], False, mine["ifaces"].get(bridge, {}).get("inet6")
    for path, text in sorted(files.items()):
        if path == own:
            continue
        parsed = netconf.parse_interfaces(text)
        if uplink in parsed["ifaces"] or uplink in parsed["auto"]:
            had_stanza = had_stanza or uplink in parsed["ifaces"]
            inet6 = inet6 or parsed["ifaces"].get(uplink, {}).get("inet6")
            new_files.append(WriteFile(path, netconf.without_interface(text, uplink, f"{MARK} {bridge}"),
                                       step=STEP, why=f"{uplink}'s own stanza commented out: {bridge} drives it"))
        if bridge in parsed["ifaces"]:
            raise PlanError(f"{host.name}: {path} already has a stanza for {bridge}: remove it, or choose"
                            " another bridge name ([plugin.ifupdown] bridge)")
    stanza = netconf.render_stanza(bridge, uplink, ip, s["address"], s["gateway"], s["dns"])
    if inet6 in ("auto", "dhcp"):
        stanza += f"iface {bridge} inet6 {inet6}\n"
    new_files.append(WriteFile(own, stanza, mode=0o644, step=STEP,
                               why=f"ifupdown stanza for bridge {bridge} over {uplink} ({ip})"))
    if not _sourced(files, own):
        main = files[netconf.IFUPDOWN_FILE]
        edited = next((f for f in new_files if f.path == netconf.IFUPDOWN_FILE), None)
        text = edited.content.decode() if edited else main
        text += ("" if text.endswith("\n") or not text else "\n") + f"source {own}\n"
        new_files = [f for f in new_files if f.path != netconf.IFUPDOWN_FILE]
        new_files.insert(0, WriteFile(netconf.IFUPDOWN_FILE, text, step=STEP,
                                      why=f"read {own}" + (f"; {uplink}'s stanza commented out" if edited else "")))

    bridge_up = facts.get("uplink") == bridge or facts.get("bridge_port") == uplink
    return [SwitchNetwork(
        bridge=bridge, uplink=uplink, address=s["address"] if ip == "static" else "dhcp", gateway=s["gateway"],
        switch_timeout=s["timeout"], files=new_files,
        # with the old files: what runs now goes down (the bridge itself on a run that changes it)
        stop=[("ifdown", "--force", bridge if bridge_up else uplink)],
        start=[("ifup", bridge)], undo=[("ifdown", "--force", bridge)],
        restart=[("ifup", bridge if bridge_up else uplink)] if had_stanza or bridge_up else [],
        step=STEP, why=f"move {uplink} into {bridge} (ifup {bridge}), back to {uplink}'s own stanza unless it"
                       f" works within {s['timeout']} s")]
