"""networkd: the bridge xenbr0 that guests attach to, with systemd-networkd (S11).

Three files in /etc/systemd/network, named to sort first (networkd takes the first
.network file matching an interface, so the administrator's own files for the uplink
are shadowed for it, not edited): 00-xenrun-BRIDGE.netdev (the bridge, wearing the
uplink's MAC so DHCP hands it the address the host already had),
00-xenrun-BRIDGE-port.network (the uplink is a port) and 00-xenrun-BRIDGE.network
(its address, DHCP or static).

On a live host the core's lockout-safe switch (xenrun.netswitch) makes it live:
``networkctl reload`` with the new files, and the way back (``networkctl delete`` of
the bridge, the old files, ``networkctl reload``).
"""

from __future__ import annotations

from xenrun.api import RunCommand, SwitchNetwork, WriteFile, hookimpl, netconf, note

STEP = "S11"
FOLDER = "/etc/systemd/network"
UNIT = "systemd-networkd.service"


@hookimpl
def declare_settings():
    return {"networkd": netconf.bridge_settings("the bridge's .network file")}


def file_names(bridge: str) -> tuple[str, str, str]:
    """(netdev, port network, bridge network) paths for ``bridge``."""
    base = f"{FOLDER}/00-xenrun-{bridge}"
    return f"{base}.netdev", f"{base}-port.network", f"{base}.network"


@hookimpl
def configure_network(facts, host):
    s, where = netconf.bridge_plan(facts, host, "networkd")
    bridge, ip = s["bridge"], s["ip"]
    uplink = netconf.find_uplink(facts, s, where)
    mac = next((i.get("mac") for i in facts.get("interfaces") or [] if i["name"] == uplink), None)
    netdev, port, network = file_names(bridge)
    files = [
        WriteFile(netdev, netconf.render_netdev(bridge, mac), step=STEP,
                  why=f"the bridge {bridge}" + (f", with {uplink}'s MAC {mac}" if mac else "")),
        WriteFile(port, netconf.render_port_network(bridge, uplink), step=STEP, why=f"{uplink} is a port of {bridge}"),
        WriteFile(network, netconf.render_bridge_network(bridge, ip, s["address"], s["gateway"], s["dns"]),
                  step=STEP, why=f"{bridge}'s address ({ip})"),
    ]
    if facts.get("network_stack") == "networkd" and facts.get("network_stack_why"):
        note(f"{port} is read before the other files for {uplink} ({facts.network_stack_why}), which stay as"
             " they are for any other interface they match")
    changes = [SwitchNetwork(
        bridge=bridge, uplink=uplink, address=s["address"] if ip == "static" else "dhcp", gateway=s["gateway"],
        switch_timeout=s["timeout"], files=files, start=[("systemctl", "start", UNIT), ("networkctl", "reload")],
        undo=[("networkctl", "delete", bridge)], restart=[("systemctl", "start", UNIT), ("networkctl", "reload")], step=STEP,
        why=f"move {uplink} into {bridge} (networkctl reload), back to the old files unless it works within"
            f" {s['timeout']} s")]
    if facts.get("network_stack") != "networkd":
        changes.append(RunCommand(("systemctl", "enable", UNIT), unless=("systemctl", "is-enabled", "--quiet", UNIT),
                                  step=STEP, why="start systemd-networkd at boot"))
    return changes
