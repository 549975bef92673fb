"""The ifupdown plugin for real: its plan for a stock Debian /etc/network/interfaces
carried out by the core's switch with Debian's own ifup/ifdown and bridge-utils, in
the network namespaces of tests/support/netlab.py (this machine's network is never touched):
DHCP and static, the bridge's MAC and address, and the way back when the bridge does
not work.

Needs root, iproute2, ifupdown, bridge-utils, dnsmasq, dhclient and ping."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from support.netlab import LAN_GW, make_lab, switch
from xenrun.changes import SwitchNetwork
from xenrun.config import Host, HostSpec, Site
from xenrun.facts import Facts
from xenrun.plugins import ifupdown as plugin

pytestmark = pytest.mark.netns

STOCK = """# The loopback network interface
auto lo
iface lo inet loopback

# The primary network interface
allow-hotplug eth0
iface eth0 inet static
    address 10.213.0.5/24
    gateway 10.213.0.1
"""


@pytest.fixture
def lab(tmp_path):
    if not Path("/lib/bridge-utils/ifupdown.sh").exists():
        pytest.skip("bridge-utils is not installed")
    yield from make_lab(tmp_path, "ifup", "ifdown", "brctl")


def plan(lab, **settings) -> SwitchNetwork:
    """The plugin's plan for the namespace's host, from its own files."""
    main = lab.read("/etc/network/interfaces")
    facts = Facts({"live": True, "uplink": "eth0", "bridge_port": None,
                   "interfaces": [{"name": "eth0", "mac": None, "bridge": False, "wireless": False,
                                   "bridge_port_of": None}],
                   "ifupdown_files": {"/etc/network/interfaces": main}, "ifupdown_bridge_utils": True,
                   "ifupdown_dhcp_clients": ["dhclient"], "network_stack": "ifupdown", "network_stacks": ["ifupdown"]})
    declared = plugin.declare_settings()["ifupdown"]
    checked = Site(None, {"plugin": {"ifupdown": settings}}).check_settings("h", "ifupdown", declared)
    host = Host(HostSpec("h", "none", "ifupdown", (), ()), {"ifupdown": checked})
    (change,) = plugin.configure_network(facts, host)
    return change


def mac(lab, dev: str) -> str:
    return {x["ifname"]: x.get("address") for x in json.loads(lab.ip_json("link"))}[dev]


def start_stock(lab) -> None:
    lab.write("/etc/network/interfaces", STOCK)
    lab.run("ifup", "eth0")
    assert lab.addresses("eth0") == ["10.213.0.5/24"]


def test_dhcp_bridge_with_ifup_and_bridge_utils(lab):
    start_stock(lab)
    change = plan(lab)
    r, confirmed = switch(lab, change)
    assert r.returncode == 0, r.stderr
    assert confirmed.returncode == 0, confirmed.stderr
    status = lab.status("dhcp")
    assert status.ok, status.problems("xenbr0", "eth0", "dhcp")
    assert mac(lab, "xenbr0") == mac(lab, "eth0")  # bridge_hw: DHCP sees the host it knew
    assert lab.addresses("eth0") == []
    assert [(x["gateway"], x["dev"]) for x in lab.default_route()] == [(LAN_GW, "xenbr0")]
    # ifupdown itself knows the bridge as up, and the uplink's stanza is commented out
    assert "xenbr0" in lab.run("ifquery", "--state").stdout
    text = lab.read("/etc/network/interfaces")
    assert "# xenrun S11: moved into the bridge xenbr0: allow-hotplug eth0" in text
    assert "\nallow-hotplug eth0" not in text
    assert "bridge_ports eth0" in lab.read("/etc/network/interfaces.d/xenrun-xenbr0")
    # a second plan from the files now there plans the same files: nothing to write again
    again = plan(lab)
    assert [(f.path, f.content) for f in again.files if f.path != "/etc/network/interfaces"] == \
        [(f.path, f.content) for f in change.files if f.path != "/etc/network/interfaces"]
    assert lab.run(str(lab.switch), *change.unless[1:], check=False).returncode == 0


def test_static_bridge_with_ifup(lab):
    start_stock(lab)
    r, confirmed = switch(lab, plan(lab, ip="static", address="10.213.0.50/24", gateway=LAN_GW))
    assert r.returncode == 0 and confirmed.returncode == 0, r.stderr
    assert lab.status("10.213.0.50/24").ok
    assert lab.run("ping", "-c1", "-W2", LAN_GW, check=False).returncode == 0


@pytest.mark.parametrize("address, gateway", [("10.213.0.50/24", "10.213.0.254"), ("10.99.0.5/24", "10.99.0.1")],
                         ids=["unreachable-gateway", "wrong-subnet"])
def test_a_bridge_that_does_not_work_puts_the_stock_network_back(lab, address, gateway):
    start_stock(lab)
    started = time.monotonic()
    r, _ = switch(lab, plan(lab, ip="static", address=address, gateway=gateway, timeout=3))
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - started < 60
    assert "putting the old network back" in r.stderr
    # the old files, and the old network through ifup eth0
    assert lab.read("/etc/network/interfaces") == STOCK
    assert lab.read("/etc/network/interfaces.d/xenrun-xenbr0") is None
    assert lab.addresses("eth0") == ["10.213.0.5/24"]
    assert "xenbr0" not in lab.links()
    assert [(x["gateway"], x["dev"]) for x in lab.default_route()] == [(LAN_GW, "eth0")]
    assert "eth0" in lab.run("ifquery", "--state").stdout
