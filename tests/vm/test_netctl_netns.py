"""The netctl plugin's profiles, run for real with netctl's own
/usr/lib/netctl/network, and the core's lockout-safe switch driving them, in the
network namespaces of tests/support/netlab.py (this machine's network is never touched).

Needs root, iproute2, netctl, dnsmasq, dhclient (isc-dhcp-client) and ping
(iputils-ping)."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import pytest

from support.netlab import LAN_GW, make_lab, switch
from xenrun.changes import SwitchNetwork, WriteFile
from xenrun.plugins import netctl as plugin

pytestmark = pytest.mark.netns

NETWORK = "/usr/lib/netctl/network"


@pytest.fixture
def lab(tmp_path):
    if not Path(NETWORK).exists():
        pytest.skip(f"{NETWORK} is missing (install netctl)")
    yield from make_lab(tmp_path)


def netctl_switch(old, new, profile_text, address="dhcp", gateway=None, timeout=20):
    """The switch the netctl plugin plans, with netctl's own script for start/stop
    (``netctl`` itself goes through systemd, which the namespace does not have)."""
    return SwitchNetwork(
        bridge="xenbr0", uplink="eth0", address=address, gateway=gateway, switch_timeout=timeout,
        files=[WriteFile(f"/etc/netctl/{new}", profile_text)],
        stop=[(NETWORK, "stop", old)] if old != "-" else [], start=[(NETWORK, "start", new)],
        undo=[(NETWORK, "stop", new)], restart=[(NETWORK, "start", old)] if old != "-" else [])


def bridge_profile(ip="dhcp", address=None, gateway=None, dns=()) -> str:
    return plugin.render_profile("xenbr0", "eth0", ip, address, gateway, list(dns))


OLD_STATIC = "Description='old uplink'\nInterface=eth0\nConnection=ethernet\nIP=static\n" \
             "Address=('10.213.0.5/24')\nGateway='10.213.0.1'\n"


def test_dhcp_bridge_profile_starts_with_netctls_own_script(lab):
    lab.profile("xenbridge-dhcp", bridge_profile())
    r = lab.run(NETWORK, "start", "xenbridge-dhcp")
    assert "Started network profile 'xenbridge-dhcp'" in r.stdout
    status = lab.status("dhcp")
    assert status.ok, status.problems("xenbr0", "eth0", "dhcp")
    (address,) = status.addresses
    assert ipaddress.IPv4Interface(address) in ipaddress.IPv4Network("10.213.0.0/24")
    assert 100 <= int(address.split("/")[0].rsplit(".", 1)[1]) <= 150  # from dnsmasq's range
    assert lab.default_route()[0]["dev"] == "xenbr0" and lab.default_route()[0]["gateway"] == LAN_GW
    # the bridge wears the uplink's MAC (MACAddress=eth0), so DHCP keeps the host's address
    macs = {link["ifname"]: link.get("address") for link in json.loads(lab.ip_json("link"))}
    assert macs["xenbr0"] == macs["eth0"]
    brctl = lab.run("brctl", "show", "xenbr0", check=False)
    if brctl.returncode == 0:
        assert "eth0" in brctl.stdout
    # the script's own check agrees with bridge_status
    assert lab.run(str(lab.switch), "check", "xenbr0", "eth0", "dhcp", check=False).returncode == 0
    assert lab.run(str(lab.switch), "check", "xenbr0", "eth0", "10.213.0.99/24", check=False).returncode == 1
    lab.run(NETWORK, "stop", "xenbridge-dhcp")
    assert "xenbr0" not in lab.links()
    assert lab.run(str(lab.switch), "check", "xenbr0", "eth0", "dhcp", check=False).returncode == 1


def test_static_bridge_profile_starts_with_netctls_own_script(lab):
    lab.profile("xenbridge-static", bridge_profile("static", "10.213.0.50/24", LAN_GW, [LAN_GW]))
    lab.run(NETWORK, "start", "xenbridge-static")
    status = lab.status("10.213.0.50/24")
    assert status.ok, status.problems("xenbr0", "eth0", "10.213.0.50/24")
    assert status.addresses == ("10.213.0.50/24",)
    assert lab.default_route()[0] == {**lab.default_route()[0], "dst": "default", "gateway": LAN_GW, "dev": "xenbr0"}
    assert lab.run("ping", "-c1", "-W2", LAN_GW, check=False).returncode == 0
    assert lab.run(str(lab.switch), "check", "xenbr0", "eth0", "10.213.0.50/24", check=False).returncode == 0


def test_switch_moves_the_uplink_into_the_bridge(lab):
    lab.profile("eth-static", OLD_STATIC)
    lab.run(NETWORK, "start", "eth-static")
    assert lab.addresses("eth0") == ["10.213.0.5/24"]
    change = netctl_switch("eth-static", "xenbridge-dhcp",
                           plugin.render_profile("xenbr0", "eth0", "dhcp", dhcp_client="dhclient"))
    r, confirmed = switch(lab, change)
    assert r.returncode == 0, r.stderr
    assert "ok: eth0 is a port of xenbr0" in r.stderr
    assert confirmed.returncode == 0, confirmed.stderr
    assert lab.status("dhcp").ok
    assert lab.addresses("eth0") == []
    assert lab.read("/etc/netctl/xenbridge-dhcp") == change.files[0].content.decode()
    # what the plan's guard asks on a second run: done
    assert lab.run(str(lab.switch), *change.unless[1:], check=False).returncode == 0
    time.sleep(2)  # the watchdog, confirmed, has gone: the switch stands
    assert lab.status("dhcp").ok


@pytest.mark.parametrize("old", ["eth-static", "-"])
@pytest.mark.parametrize("broken", [("10.213.0.50/24", "10.213.0.254"),   # nobody answers there
                                    ("10.99.0.5/24", "10.99.0.1")],      # wrong subnet
                         ids=["unreachable-gateway", "wrong-subnet"])
def test_switch_puts_the_old_network_back_when_the_bridge_does_not_work(lab, old, broken):
    address, gateway = broken
    if old == "-":  # configured by something other than netctl
        lab.run("ip", "addr", "add", "10.213.0.5/24", "dev", "eth0")
        lab.run("ip", "link", "set", "eth0", "up")
        lab.run("ip", "route", "add", "default", "via", LAN_GW, "dev", "eth0")
    else:
        lab.profile(old, OLD_STATIC)
        lab.run(NETWORK, "start", old)
    assert lab.run("ping", "-c1", "-W2", LAN_GW, check=False).returncode == 0
    change = netctl_switch(old, "xenbridge-static", bridge_profile("static", address, gateway), address, gateway, 3)
    started = time.monotonic()
    r, _ = switch(lab, change)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert lab.read("/etc/netctl/xenbridge-static") is None  # the old files are back: it was not there
    assert time.monotonic() - started < 30
    assert f"gateway {gateway} does not answer ping through xenbr0" in r.stderr
    assert "putting the old network back" in r.stderr
    # the old network is back: address, default route, the gateway answers; no bridge
    assert lab.addresses("eth0") == ["10.213.0.5/24"]
    assert "xenbr0" not in lab.links()
    route = lab.default_route()
    assert [(x["gateway"], x["dev"]) for x in route] == [(LAN_GW, "eth0")]
    assert lab.run("ping", "-c1", "-W2", LAN_GW, check=False).returncode == 0
    assert not lab.status(address).ok


def test_switch_reverts_when_netctl_cannot_start_the_bridge(lab):
    lab.profile("eth-static", OLD_STATIC)
    lab.run(NETWORK, "start", "eth-static")
    # a bridge profile binding an interface that does not exist fails in netctl itself
    profile = plugin.render_profile("xenbr0", "eth0", "static", "10.213.0.50/24", LAN_GW).replace("IP=static", "IP=bogus")
    r, _ = switch(lab, netctl_switch("eth-static", "xenbridge-static", profile, "10.213.0.50/24", LAN_GW, 3))
    assert r.returncode == 1
    assert "bringing xenbr0 up failed" in r.stderr or "does not" in r.stderr
    assert lab.addresses("eth0") == ["10.213.0.5/24"]
    assert "xenbr0" not in lab.links()


def test_switch_without_confirmation_puts_the_old_network_back_by_itself(lab):
    """xenrun lost the host after the switch (no confirm comes): the watchdog reverts."""
    lab.profile("eth-static", OLD_STATIC)
    lab.run(NETWORK, "start", "eth-static")
    change = netctl_switch("eth-static", "xenbridge-dhcp", bridge_profile(), timeout=4)
    r, confirmed = switch(lab, change, confirm=False)
    assert r.returncode == 0, r.stderr
    assert lab.status("dhcp").ok
    deadline = time.monotonic() + 40
    while lab.addresses("eth0") != ["10.213.0.5/24"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lab.addresses("eth0") == ["10.213.0.5/24"]
    assert "xenbr0" not in lab.links()
    assert lab.read("/etc/netctl/xenbridge-dhcp") is None
    late = lab.run(str(lab.switch), "confirm", str(lab.folder / "plan-1"), check=False)
    assert late.returncode == 1 and "old network is back" in late.stderr


def test_switch_refuses_bad_arguments_without_touching_anything(lab):
    plan = lab.folder / "plan"
    plan.mkdir()
    (plan / "files").write_text("")
    for argv in (["run", str(plan), "xen br0", "eth0", "dhcp", "-", "3"],
                 ["run", str(plan), "xenbr0", "eth0", "dhcp", "-", "3s"],
                 ["run", str(plan), "xenbr0", "eth0", "1.2.3.4", "-", "3"],
                 ["run", str(plan), "xenbr0", "$(reboot)", "dhcp", "-", "3"],
                 ["run", "relative", "xenbr0", "eth0", "dhcp", "-", "3"],
                 ["check", "xenbr0"], ["confirm", "/nonexistent"], ["reboot"]):
        r = lab.run(str(lab.switch), *argv, check=False)
        assert r.returncode == 2, argv
    assert lab.links() == ["lo", "eth0"]
