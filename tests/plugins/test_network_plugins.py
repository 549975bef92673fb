"""ifupdown and networkd plans, the stack detection that picks between them and
netctl, and the refusals that name the right choice (pure: no network touched;
the real switch is in tests/vm/test_ifupdown_netns.py and tests/vm/test_netctl_netns.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from support.helpers import REPO
from xenrun import netconf
from xenrun.changes import RunCommand, SwitchNetwork
from xenrun.config import Host, HostSpec, Site
from xenrun.errors import PlanError
from xenrun.facts import Facts, Probe
from xenrun.plugins import facts as core_facts
from xenrun.plugins import ifupdown, networkd
from xenrun.targets.local import LocalTarget

STOCK = REPO / "examples/hosts/debian-grub/etc/network/interfaces"


def host(plugin, **raw):
    declared = plugin.declare_settings()[plugin.__name__.rsplit(".", 1)[1]]
    name = plugin.__name__.rsplit(".", 1)[1]
    return Host(HostSpec("h", "none", name, (), ()),
                {name: Site(None, {"plugin": {name: raw}}).check_settings("h", name, declared)})


def facts(stack="ifupdown", **more):
    return Facts({"live": False, "uplink": "ens3", "bridge_port": None,
                  "interfaces": [{"name": "ens3", "mac": "52:54:00:12:34:56", "bridge": False, "wireless": False,
                                  "bridge_port_of": None}],
                  "ifupdown_files": {"/etc/network/interfaces": STOCK.read_text()}, "ifupdown_bridge_utils": True,
                  "ifupdown_dhcp_clients": ["dhclient"], "network_stack": stack, "network_stack_why": "x",
                  "network_stacks": [stack], **more})


# -- ifupdown -----------------------------------------------------------------------------

def test_ifupdown_plan_for_the_stock_debian_file():
    (change,) = ifupdown.configure_network(facts(), host(ifupdown))
    assert isinstance(change, SwitchNetwork)
    assert change.stop == (("ifdown", "--force", "ens3"),) and change.start == (("ifup", "xenbr0"),)
    assert change.undo == (("ifdown", "--force", "xenbr0"),) and change.restart == (("ifup", "ens3"),)
    main, stanza = change.files
    assert main.path == "/etc/network/interfaces" and stanza.path == "/etc/network/interfaces.d/xenrun-xenbr0"
    parsed = netconf.parse_interfaces(main.content.decode())
    assert "ens3" not in parsed["ifaces"] and "ens3" not in parsed["auto"] and parsed["auto"] == ["lo"]
    assert stanza.content.decode() == (
        "# Written by xenrun (S11): the bridge Xen guests attach to. Edits here are replaced.\n"
        "auto xenbr0\niface xenbr0 inet dhcp\n    bridge_ports ens3\n    bridge_hw ens3\n    bridge_stp off\n"
        "    bridge_fd 0\n    bridge_maxwait 0\niface xenbr0 inet6 auto\n")


def test_ifupdown_commented_file_is_left_as_it_is_on_a_second_run():
    (change,) = ifupdown.configure_network(facts(), host(ifupdown))
    files = {f.path: f.content.decode() for f in change.files}
    second = facts(uplink="xenbr0", bridge_port="ens3", ifupdown_files=files)
    (again,) = ifupdown.configure_network(second, host(ifupdown))
    # nothing of the uplink left to comment out: only the bridge's own stanza is planned, the same
    assert [(f.path, f.content) for f in again.files] == [(f.path, f.content) for f in change.files][1:]
    assert again.stop == (("ifdown", "--force", "xenbr0"),)  # a change to a running bridge restarts it


@pytest.mark.skipif(shutil.which("ifquery") is None, reason="ifupdown is not installed")
def test_ifupdown_files_parse_with_ifupdowns_own_parser(tmp_path):
    (change,) = ifupdown.configure_network(facts(), host(ifupdown, ip="static", address="192.168.1.10/24",
                                                         gateway="192.168.1.1", dns=["9.9.9.9"]))
    main, stanza = tmp_path / "interfaces", tmp_path / "stanza"
    main.write_bytes(change.files[0].content.replace(b"source /etc/network/interfaces.d/*", b""))
    stanza.write_bytes(change.files[1].content)
    listed = subprocess.run(["ifquery", f"--interfaces={main}", "--list", "--allow=auto"], capture_output=True,
                            text=True)
    assert listed.returncode == 0 and listed.stdout.split() == ["lo"], listed.stderr
    options = subprocess.run(["ifquery", f"--interfaces={stanza}", "xenbr0"], capture_output=True, text=True)
    assert options.returncode == 0, options.stderr
    assert {"address: 192.168.1.10", "netmask: 255.255.255.0", "gateway: 192.168.1.1", "bridge_ports: ens3",
            "bridge_hw: ens3",
            "dns-nameservers: 9.9.9.9"} <= set(options.stdout.splitlines())


def test_ifupdown_adds_a_source_line_when_interfaces_d_is_not_read():
    plain = "auto lo\niface lo inet loopback\nauto ens3\niface ens3 inet dhcp\n"
    (change,) = ifupdown.configure_network(facts(ifupdown_files={"/etc/network/interfaces": plain}), host(ifupdown))
    main = change.files[0].content.decode()
    assert main.endswith("source /etc/network/interfaces.d/xenrun-xenbr0\n")
    assert change.files[0].path == "/etc/network/interfaces" and len(change.files) == 2


def test_ifupdown_refusals():
    with pytest.raises(PlanError, match="needs bridge-utils"):
        ifupdown.configure_network(facts(ifupdown_bridge_utils=False), host(ifupdown))
    taken = STOCK.read_text() + "auto xenbr0\niface xenbr0 inet manual\n"
    with pytest.raises(PlanError, match="already has a stanza for xenbr0"):
        ifupdown.configure_network(facts(ifupdown_files={"/etc/network/interfaces": taken}), host(ifupdown))
    with pytest.raises(PlanError, match='but netctl is in charge of the uplink .*set network = "netctl"'):
        ifupdown.configure_network(facts(stack="netctl"), host(ifupdown))
    with pytest.raises(PlanError, match="xenrun has no plugin for NetworkManager"):
        ifupdown.configure_network(facts(stack="NetworkManager"), host(ifupdown))
    with pytest.raises(PlanError, match="ifupdown is not installed here .apt install ifupdown bridge-utils"):
        ifupdown.configure_network(facts(stack=None, network_stacks=["networkd"]), host(ifupdown))


# -- networkd -----------------------------------------------------------------------------

def test_networkd_plan_is_three_files_read_first():
    changes = networkd.configure_network(facts("networkd"), host(networkd, ip="static", address="10.0.0.5/24",
                                                                 gateway="10.0.0.1", dns=["10.0.0.1"]))
    (change,) = changes  # networkd already in charge: nothing to enable
    assert [f.path for f in change.files] == ["/etc/systemd/network/00-xenrun-xenbr0.netdev",
                                              "/etc/systemd/network/00-xenrun-xenbr0-port.network",
                                              "/etc/systemd/network/00-xenrun-xenbr0.network"]
    netdev, port, network = (netconf.parse_unit(f.content.decode()) for f in change.files)
    assert netdev["NetDev"] == {"Name": ["xenbr0"], "Kind": ["bridge"], "MACAddress": ["52:54:00:12:34:56"]}
    assert port == {"Match": {"Name": ["ens3"]}, "Network": {"Bridge": ["xenbr0"]}}
    assert network["Network"] == {"Address": ["10.0.0.5/24"], "Gateway": ["10.0.0.1"], "DNS": ["10.0.0.1"]}
    assert change.start == (("systemctl", "start", "systemd-networkd.service"), ("networkctl", "reload"))
    assert change.undo == (("networkctl", "delete", "xenbr0"),)


def test_networkd_is_enabled_when_nothing_was_in_charge():
    changes = networkd.configure_network(facts(None, network_stacks=["networkd", "ifupdown"]), host(networkd))
    assert isinstance(changes[-1], RunCommand) and changes[-1].argv == ("systemctl", "enable",
                                                                         "systemd-networkd.service")
    assert "DHCP=ipv4" in changes[0].files[2].content.decode()


@pytest.mark.skipif(not Path("/lib/systemd/systemd-networkd").exists() or shutil.which("systemd-analyze") is None,
                    reason="systemd-networkd is not installed")
def test_networkd_files_pass_systemd_analyze_verify(tmp_path):
    (change,) = networkd.configure_network(facts("networkd"), host(networkd))
    for f in change.files:
        path = tmp_path / f.path.rsplit("/", 1)[1]
        path.write_bytes(f.content)
        assert netconf.parse_unit(path.read_text())  # read back by the same parser the facts use


# -- which stack is in charge --------------------------------------------------------------

def _root(tmp_path, files: dict[str, str], links=()):
    for path, text in files.items():
        p = tmp_path / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    wants = tmp_path / netconf.WANTS.lstrip("/")
    wants.mkdir(parents=True, exist_ok=True)
    for name in links:
        (wants / name).symlink_to("/dev/null")
    return core_facts._network_stack(Probe(LocalTarget(tmp_path)), ["ens3"])


def test_stack_detection_on_machine_roots(tmp_path):
    stub = "#!/bin/sh\n"
    debian = _root(tmp_path / "d", {"/usr/sbin/ifup": stub, "/etc/network/interfaces": STOCK.read_text()})
    assert debian == {"network_stack": "ifupdown", "network_stack_why": "/etc/network/interfaces: iface ens3",
                      "network_stacks": ["ifupdown"]}
    sourced = _root(tmp_path / "s", {"/usr/sbin/ifup": stub, "/etc/network/interfaces": "source interfaces.d/*\n",
                                     "/etc/network/interfaces.d/ens3": "allow-hotplug ens3\niface ens3 inet dhcp\n"})
    assert sourced["network_stack_why"] == "/etc/network/interfaces.d/ens3: iface ens3"
    arch = _root(tmp_path / "a", {"/usr/lib/systemd/systemd-networkd": stub,
                                  "/etc/systemd/network/20-wired.network": "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n"},
                 links=["systemd-networkd.service"])
    assert arch["network_stack"] == "networkd" and "20-wired.network matches ens3" in arch["network_stack_why"]
    off = _root(tmp_path / "o", {"/usr/lib/systemd/systemd-networkd": stub,
                                 "/etc/systemd/network/20-wired.network": "[Match]\nName=en*\n"})
    assert off["network_stack"] is None  # networkd not enabled: its files do not count
    netctl = _root(tmp_path / "n", {"/usr/bin/netctl": stub, "/etc/netctl/wired": "Interface=ens3\nIP=dhcp\n"},
                   links=["netctl@wired.service"])
    assert netctl["network_stack"] == "netctl"
    nm = _root(tmp_path / "m", {"/usr/sbin/NetworkManager": stub}, links=["NetworkManager.service"])
    assert nm["network_stack"] == "NetworkManager"


def test_without_a_default_route_the_stack_of_the_physical_ports_is_found():
    interfaces = [{"name": "eth0", "bridge": False}, {"name": "vif1.0", "bridge": False},
                  {"name": "virbr0", "bridge": True}]
    assert core_facts._stack_candidates(interfaces, None, None) == ["eth0"]
    assert core_facts._stack_candidates(interfaces, "eth0", "xenbr0") == ["eth0", "xenbr0"]
    assert core_facts._stack_candidates(interfaces, None, "eth0") == ["eth0"]


def test_interfaces_parser_and_comment_out():
    text = "auto lo eth0\niface eth0 inet static\n    address 1.2.3.4/24\n\\\n# c\niface eth1 inet dhcp\n"
    parsed = netconf.parse_interfaces(text)
    assert parsed["auto"] == ["lo", "eth0"] and parsed["ifaces"] == {"eth0": {"inet": "static"},
                                                                     "eth1": {"inet": "dhcp"}}
    out = netconf.without_interface(text, "eth0", "N")
    assert out.splitlines()[:4] == ["# N: auto lo eth0", "auto lo", "# N: iface eth0 inet static",
                                    "#  N:     address 1.2.3.4/24".replace("#  N:", "# N:")]
    assert netconf.without_interface(out, "eth0", "N") == out
    assert netconf.network_matches("[Match]\nName=!wl* \n", "ens3") and not netconf.network_matches(
        "[Match]\nName=wl*\n", "ens3")
