"""The netctl plugin (S11): settings, exact plans for DHCP and static bridges,
profiles that bash reads back exactly, facts from a machine root, the check of
``ip -j`` output, and a plan that finds nothing to do after it was applied."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.helpers import REPO
from xenrun import registry
from xenrun import run
from xenrun.changes import NET_SWITCH, RemoveFile, RunCommand, SwitchNetwork, WriteFile
from xenrun.config import Host, HostSpec, Site
from xenrun.errors import ConfigError, PlanError
from xenrun.facts import Facts, Probe
from xenrun.plan import CHANGE, PENDING
from xenrun.plugins import netctl as plugin
from xenrun.targets.local import LocalTarget

SAMPLES = REPO / "tests" / "samples"
WANTS = "/etc/systemd/system/multi-user.target.wants"
OLD_UNIT = "netctl@ethernet\\x2ddhcp.service"
OLD_WANTS = f"{WANTS}/{OLD_UNIT}"
OLD_DROPIN = f"/etc/systemd/system/{OLD_UNIT}.d/profile.conf"
SWITCH = NET_SWITCH


def iface(name, bridge=False, wireless=False, port_of=None):
    return {"name": name, "mac": "52:54:00:12:34:56", "bridge": bridge, "wireless": wireless,
            "bridge_port_of": port_of}


def make_facts(live=False, uplink="eth0", interfaces=None, profiles=None, **more):
    return Facts({"live": live, "uplink": uplink,
                  "interfaces": [iface("eth0")] if interfaces is None else interfaces,
                  "netctl_profiles": profiles or {}, "netctl_ping": True, **more})


def written(changes) -> list[WriteFile]:
    """The files a plan writes, those of its network switch too."""
    out = []
    for c in changes:
        out += [f for f in c.files if isinstance(f, WriteFile)] if isinstance(c, SwitchNetwork) else \
            [c] if isinstance(c, WriteFile) else []
    return out


def make_host(**raw):
    declared = plugin.declare_settings()["netctl"]
    settings = Site(None, {"plugin": {"netctl": raw}}).check_settings("xen01", "netctl", declared)
    return Host(HostSpec("xen01", "none", "netctl", (), ()), {"netctl": settings})


def old_profile(interface="eth0", enabled=True, active=None, dropin=True, binds=()):
    return {"interface": interface, "connection": "ethernet", "ip": "dhcp", "binds_to": list(binds),
            "enabled": enabled, "wants": OLD_WANTS if enabled else None,
            "dropin": OLD_DROPIN if dropin else None, "active": active}


# -- settings -------------------------------------------------------------------------

def test_defaults():
    s = make_host().settings["netctl"]
    assert s == {"bridge": "xenbr0", "interface": None, "ip": "dhcp", "address": None, "gateway": None,
                 "dns": [], "profile": None, "timeout": 30}


@pytest.mark.parametrize("key, value, message", [
    ("bridge", "xen br0", "not a valid interface name"),
    ("interface", "eth0;reboot", "not a valid interface name"),
    ("ip", "manual", "not one of: dhcp, static"),
    ("address", "192.168.1.10", "with prefix"),
    ("gateway", "192.168.1", "not an IPv4 address"),
    ("dns", "1.1.1.1", "expected a list of IPv4 addresses"),
    ("dns", ["1.1.1.1", "one.one"], "not an IPv4 address"),
    ("profile", "../passwd", "not a valid name"),
    ("profile", "bridge.conf", "netctl ignores profiles ending in"),
    ("timeout", 0, "1 or more"),
    ("colour", "red", "unknown setting"),
])
def test_bad_settings_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        make_host(**{key: value})


# -- plans ----------------------------------------------------------------------------

DHCP_PROFILE = """\
# Written by xenrun (S11): the bridge Xen guests attach to. Edits here are replaced.
Description='Xen bridge connection'
Interface=xenbr0
Connection=bridge
BindsToInterfaces=(eth0)
MACAddress=eth0
IP=dhcp
"""

STATIC_PROFILE = """\
# Written by xenrun (S11): the bridge Xen guests attach to. Edits here are replaced.
Description='Xen bridge connection'
Interface=xenbr0
Connection=bridge
BindsToInterfaces=(enp3s0)
MACAddress=enp3s0
IP=static
Address=('192.168.1.10/24')
Gateway='192.168.1.1'
DNS=('192.168.1.1' '9.9.9.9')
"""


def test_dhcp_plan_on_a_machine_root_is_exact():
    profiles = {"ethernet-dhcp": old_profile(), "wifi": {**old_profile("wlan0"), "wants": f"{WANTS}/w"}}
    changes = plugin.configure_network(make_facts(profiles=profiles), make_host())
    new_wants = f"{WANTS}/netctl@xenbridge\\x2ddhcp.service"
    profile = WriteFile("/etc/netctl/xenbridge-dhcp", DHCP_PROFILE, mode=0o644, validate=("bash", "-n", "{}"),
                        step="S11", why="netctl profile for bridge xenbr0 over eth0 (dhcp)")
    assert changes == [
        SwitchNetwork(bridge="xenbr0", uplink="eth0", files=[profile], start=[("netctl", "start", "xenbridge-dhcp")],
                      undo=[("netctl", "stop", "xenbridge-dhcp")], stop=[("netctl", "stop", "ethernet-dhcp")],
                      restart=[("netctl", "start", "ethernet-dhcp")], step="S11",
                      why="move eth0 into xenbr0 (netctl start xenbridge-dhcp), back to ethernet-dhcp unless it"
                          " works within 30 s"),
        RemoveFile(OLD_WANTS, step="S11",
                   why="disable netctl profile ethernet-dhcp (Interface=eth0): enabled for eth0, it would"
                       " take eth0 back from xenbr0 at boot"),
        RemoveFile(OLD_DROPIN, step="S11", why="the rest of disabling ethernet-dhcp"),
        RunCommand(("netctl", "reenable", "xenbridge-dhcp"), creates=new_wants,
                   onchange=("/etc/netctl/xenbridge-dhcp",),
                   writes=(new_wants, "/etc/systemd/system/netctl@xenbridge\\x2ddhcp.service.d/profile.conf"),
                   step="S11", why="start the bridge at boot (netctl enable xenbridge-dhcp)"),
    ]


def test_static_plan_on_a_live_host_is_exact():
    profiles = {"ethernet-dhcp": old_profile("enp3s0", active=False),
                "office": old_profile("enp3s0", enabled=False, active=True),
                "xenbridge-static": {**old_profile("xenbr0", enabled=False), "binds_to": ["enp3s0"]}}
    facts = make_facts(live=True, uplink="enp3s0", interfaces=[iface("enp3s0"), iface("lo")], profiles=profiles)
    host = make_host(ip="static", address="192.168.1.10/24", gateway="192.168.1.1",
                     dns=["192.168.1.1", "9.9.9.9"], timeout=20)
    changes = plugin.configure_network(facts, host)
    new_wants = f"{WANTS}/netctl@xenbridge\\x2dstatic.service"
    profile = WriteFile("/etc/netctl/xenbridge-static", STATIC_PROFILE, mode=0o644, validate=("bash", "-n", "{}"),
                        step="S11", why="netctl profile for bridge xenbr0 over enp3s0 (static)")
    assert changes == [
        # the running profile (office) is the one stopped and put back on failure
        SwitchNetwork(bridge="xenbr0", uplink="enp3s0", address="192.168.1.10/24", gateway="192.168.1.1",
                      switch_timeout=20, files=[profile], stop=[("netctl", "stop", "office")],
                      start=[("netctl", "start", "xenbridge-static")], undo=[("netctl", "stop", "xenbridge-static")],
                      restart=[("netctl", "start", "office")], step="S11",
                      why="move enp3s0 into xenbr0 (netctl start xenbridge-static), back to office unless it works"
                          " within 20 s"),
        RemoveFile(OLD_WANTS, step="S11",
                   why="disable netctl profile ethernet-dhcp (Interface=enp3s0): enabled for enp3s0, it would"
                       " take enp3s0 back from xenbr0 at boot"),
        RemoveFile(OLD_DROPIN, step="S11", why="the rest of disabling ethernet-dhcp"),
        RunCommand(("netctl", "reenable", "xenbridge-static"), creates=new_wants,
                   onchange=("/etc/netctl/xenbridge-static",),
                   writes=(new_wants, "/etc/systemd/system/netctl@xenbridge\\x2dstatic.service.d/profile.conf"),
                   step="S11", why="start the bridge at boot (netctl enable xenbridge-static)"),
    ]


def test_live_dhcp_switch_without_netctl_profile_restores_by_hand():
    changes = plugin.configure_network(make_facts(live=True), make_host(profile="br", timeout=5))
    (switch,) = [c for c in changes if isinstance(c, SwitchNetwork)]
    assert switch.argv == (SWITCH, "run", "xenbr0", "eth0", "dhcp", "-", "5")
    assert switch.unless == (SWITCH, "check", "xenbr0", "eth0", "dhcp")
    assert switch.stop == switch.restart == ()  # no profile to stop: the old addresses come back by hand
    assert switch.timeout == 125  # the switch's 5 s, and room: a hung netctl fails the run


def test_other_bridges_over_the_uplink_are_disabled_too():
    profiles = {"br0": {**old_profile("br0"), "connection": "bridge", "binds_to": ["eth0"]},
                "other-xenbr0": old_profile("xenbr0", dropin=False),
                "eth1": {**old_profile("eth1"), "wants": f"{WANTS}/e1"}}
    removed = [c.path for c in plugin.configure_network(make_facts(profiles=profiles), make_host())
               if isinstance(c, RemoveFile)]
    assert removed == [OLD_WANTS, OLD_DROPIN, OLD_WANTS]


def test_second_run_finds_the_uplink_behind_the_bridge():
    interfaces = [iface("eth0", port_of="xenbr0"), iface("xenbr0", bridge=True),
                  iface("vif1.0", port_of="xenbr0")]
    own = {"xenbridge-dhcp": {**old_profile("xenbr0"), "binds_to": ["eth0"]}}
    for profiles in (own, {}):
        # bridge_port as the facts plugin gives it (tests/plugins/test_plugin_contract.py)
        facts = make_facts(uplink="xenbr0", interfaces=interfaces, profiles=profiles, bridge_port="eth0")
        (profile,) = written(plugin.configure_network(facts, make_host()))
        assert "BindsToInterfaces=(eth0)\n" in profile.content.decode()


@pytest.mark.parametrize("facts, raw, message", [
    (make_facts(uplink=None), {}, "cannot tell the uplink.*interface = \"eth0\""),
    (make_facts(uplink="br0", interfaces=[iface("br0", bridge=True)]), {}, "goes through bridge br0"),
    (make_facts(uplink="wlan0", interfaces=[iface("wlan0", wireless=True)]), {}, "wireless"),
    (make_facts(live=True), {"interface": "eth9"}, "no interface eth9 on this host"),
    (make_facts(), {"interface": "xenbr0"}, "cannot be the bridge"),
    (make_facts(), {"ip": "static"}, "address is required"),
    (make_facts(), {"ip": "static", "address": "10.0.0.2/24", "gateway": "10.0.1.1"}, "not in 10.0.0.0/24"),
    (make_facts(), {"ip": "static", "address": "10.0.0.2/24", "gateway": "10.0.0.2"}, "own address"),
    (make_facts(), {"address": "10.0.0.2/24"}, "only for ip = \"static\""),
])
def test_plans_that_cannot_work_are_refused(facts, raw, message):
    with pytest.raises(PlanError, match=message):
        plugin.configure_network(facts, make_host(**raw))


@pytest.mark.parametrize("clients, line", [(["dhcpcd"], "DHCPClient='dhcpcd'\n"),
                                           (["dhclient"], "DHCPClient='dhclient'\n"),
                                           (["dhclient", "dhcpcd"], None), ([], None)])
def test_dhcp_client_is_named_only_when_one_is_installed(clients, line):
    (profile,) = written(plugin.configure_network(make_facts(netctl_dhcp_clients=clients), make_host()))
    assert profile.content.decode() == DHCP_PROFILE + (line or "")


def test_static_without_gateway_has_no_gateway_line():
    changes = plugin.configure_network(make_facts(), make_host(ip="static", address="10.1.2.3/16"))
    text = written(changes)[0].content.decode()
    assert "Address=('10.1.2.3/16')\n" in text and "Gateway" not in text and "DNS" not in text


# -- profiles through bash --------------------------------------------------------------

BASH = shutil.which("bash")


def bash_values(path: Path, expr: str) -> list[str]:
    script = f'source "$1"; printf "%s\\0" {expr}'
    r = subprocess.run([BASH, "--norc", "-c", script, "_", str(path)], capture_output=True, check=True,
                       cwd=path.parent)
    return r.stdout.decode().split("\0")[:-1]


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize("kind", ["dhcp", "static"])
def test_profiles_round_trip_through_bash(tmp_path, kind):
    raw = {"ip": "static", "address": "192.168.1.10/24", "gateway": "192.168.1.1",
           "dns": ["192.168.1.1", "9.9.9.9"]} if kind == "static" else {"dns": ["10.0.0.53"]}
    (profile,) = written(plugin.configure_network(make_facts(uplink="eth0.100", interfaces=[iface("eth0.100")]),
                                                  make_host(**raw)))
    path = tmp_path / "profile"
    path.write_bytes(profile.content)
    got = bash_values(path, '"$Description" "$Interface" "$Connection" "$IP" "${#BindsToInterfaces[@]}"'
                            ' "${BindsToInterfaces[@]}" "${#Address[@]}" "${Address[@]}" "$Gateway"'
                            ' "${#DNS[@]}" "${DNS[@]}"')
    if kind == "static":
        assert got == ["Xen bridge connection", "xenbr0", "bridge", "static", "1", "eth0.100", "1",
                       "192.168.1.10/24", "192.168.1.1", "2", "192.168.1.1", "9.9.9.9"]
    else:
        assert got == ["Xen bridge connection", "xenbr0", "bridge", "dhcp", "1", "eth0.100", "0", "", "1",
                       "10.0.0.53"]
    # and xenrun reads back what it wrote
    assert plugin.profile_summary(profile.content.decode())["binds_to"] == ["eth0.100"]


HOSTILE = ["it's", 'say "hi"', "$(touch pwned)", "`touch pwned`", "${HOME}", "back\\slash", "two\nlines",
           "semi; colon & amp | pipe", "* ?", "", "'", "''\\''", "tab\there", "ünïcödé", "-e", "#not a comment"]


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_quoting_never_lets_a_value_out(tmp_path):
    path = tmp_path / "profile"
    lines = [f"V{i}={plugin.sh_quote(v)}" for i, v in enumerate(HOSTILE)]
    lines.append("A=(" + " ".join(plugin.sh_quote(v) for v in HOSTILE) + ")")
    path.write_text("\n".join(lines) + "\n")
    expr = " ".join(f'"$V{i}"' for i in range(len(HOSTILE))) + ' "${A[@]}"'
    assert bash_values(path, expr) == HOSTILE + HOSTILE
    assert not (tmp_path / "pwned").exists()
    assert plugin.parse_profile(path.read_text())["A"] == HOSTILE


# -- pure parsers ----------------------------------------------------------------------

def test_parse_profile_reads_like_bash_without_running_it():
    text = """# a comment
Description="A \\"quoted\\" description"  # trailing comment
Interface=eth0
BindsToInterfaces=(eth0
    'eth 1'  # comment inside
    tap0)
Address=()
ExecUpPost="echo $(hostname)"
  IP=dhcp
broken='unclosed
"""
    p = plugin.parse_profile(text)
    assert p["Description"] == 'A "quoted" description'
    assert p["Interface"] == "eth0" and p["IP"] == "dhcp"
    assert p["BindsToInterfaces"] == ["eth0", "eth 1", "tap0"]
    assert p["Address"] == [] and p["ExecUpPost"] == "echo $(hostname)"
    assert "broken" not in p


def test_profile_summary_counts_the_misspelt_binds_key():
    example = (REPO / "examples/hosts/arch-uefi/etc/netctl/examples/bridge").read_text()
    s = plugin.profile_summary(example)
    assert s == {"interface": "br0", "connection": "bridge", "ip": "dhcp", "binds_to": ["eth0", "eth1", "tap0"]}


def test_unit_names_match_systemd_escape():
    names = ["xenbridge-dhcp", "a b/.c-d", ".hidden", "ünï", "plain.name_1:x"]
    assert [plugin.unit_name(n) for n in names] == [
        "netctl@xenbridge\\x2ddhcp.service", "netctl@a\\x20b-.c\\x2dd.service", "netctl@\\x2ehidden.service",
        "netctl@\\xc3\\xbcn\\xc3\\xaf.service", "netctl@plain.name_1:x.service"]
    if shutil.which("systemd-escape"):
        real = subprocess.run(["systemd-escape", "--template=netctl@.service", *names],
                              capture_output=True, text=True, check=True).stdout.split()
        assert real == [plugin.unit_name(n) for n in names]
    assert plugin.parse_wants([plugin.unit_name(n) for n in names] + ["sshd.service", "netctl-auto@wlan0.service"]) \
        == {n: plugin.unit_name(n) for n in names}


def test_netctl_list():
    assert plugin.parse_netctl_list("  ethernet-dhcp\n* office\n  wifi\n") == ["office"]


def test_bridge_status_on_ip_json_samples():
    link, addr = (SAMPLES / "netctl-ip-link-bridged.json").read_text(), (SAMPLES / "netctl-ip-addr-bridged.json").read_text()
    s = plugin.bridge_status(link, addr, "xenbr0", "eth0", "dhcp")
    assert s.ok and s.addresses == ("10.213.0.121/24",) and s.problems("xenbr0", "eth0", "dhcp") == []
    assert plugin.bridge_status(link, addr, "xenbr0", "eth0", "10.213.0.121/24").ok
    wrong = plugin.bridge_status(link, addr, "xenbr0", "eth0", "10.213.0.50/24")
    assert not wrong.ok and wrong.problems("xenbr0", "eth0", "10.213.0.50/24") == [
        "xenbr0 has not 10.213.0.50/24 (has: 10.213.0.121/24)"]
    assert not plugin.bridge_status(link, addr, "xenbr0", "eth1", "dhcp").uplink_is_port
    before = plugin.bridge_status((SAMPLES / "netctl-ip-link-before.json").read_text(),
                                  (SAMPLES / "netctl-ip-addr-before.json").read_text(), "xenbr0", "eth0", "dhcp")
    assert before.problems("xenbr0", "eth0", "dhcp") == [
        "eth0 is not a port of xenbr0", "xenbr0 is not up", "xenbr0 has not an IPv4 address (has: none)"]


def test_bridge_down_is_not_up():
    link = '[{"ifname":"eth0","flags":["UP"],"master":"xenbr0","operstate":"UP"},' \
           '{"ifname":"xenbr0","flags":["BROADCAST"],"operstate":"DOWN"}]'
    addr = '[{"ifname":"xenbr0","addr_info":[{"family":"inet","local":"10.0.0.2","prefixlen":24,"scope":"global"}]}]'
    s = plugin.bridge_status(link, addr, "xenbr0", "eth0", "10.0.0.2/24")
    assert s.uplink_is_port and s.address_ok and not s.bridge_up and not s.ok


# -- facts and apply on a machine root -----------------------------------------------------

@pytest.fixture
def netctl_site(site, monkeypatch):
    """The example site with arch-uefi selecting the netctl plugin."""
    monkeypatch.setitem(registry.BUILTIN, "netctl", "xenrun.plugins.netctl")
    toml = site / "plugins.toml"
    toml.write_text(toml.read_text().replace("[hosts.arch-uefi]", '[hosts.arch-uefi]\nnetwork = "netctl"', 1))
    return site


def test_facts_from_a_machine_root(netctl_site):
    root = netctl_site / "hosts" / "arch-uefi"
    facts = plugin.detect_hardware(Probe(LocalTarget(root)))
    assert facts["netctl_profiles"] == {"ethernet-dhcp": {
        "interface": "eno1", "connection": "ethernet", "ip": "dhcp", "binds_to": [], "enabled": True,
        "wants": OLD_WANTS, "dropin": None, "active": None}}
    assert facts["netctl_dhcp_clients"] == [] and facts["netctl_ping"] is False
    (root / "usr/bin/dhcpcd").write_text("#!/bin/sh\n")
    assert plugin.detect_hardware(Probe(LocalTarget(root)))["netctl_dhcp_clients"] == ["dhcpcd"]


def test_apply_then_plan_again_changes_nothing(netctl_site):
    root = netctl_site / "hosts" / "arch-uefi"
    options = run.Options(config=str(netctl_site / "plugins.toml"), host="arch-uefi", yes=True, files_only=True)
    first = run.setup(options, confirm=lambda result: True)
    assert first.status == "applied"
    mine = {o.change.kind + " " + (o.path or " ".join(o.change.argv)): o.action
            for o in first.outcomes if o.change.plugin == "netctl"}
    assert mine == {"WriteFile /etc/netctl/xenbridge-dhcp": CHANGE, f"RemoveFile {OLD_WANTS}": CHANGE,
                    "RunCommand netctl reenable xenbridge-dhcp": PENDING}
    assert (root / "etc/netctl/xenbridge-dhcp").read_text() == DHCP_PROFILE.replace("eth0", "eno1")
    assert not os.path.lexists(root / OLD_WANTS.lstrip("/"))
    again = run.setup(options, confirm=lambda result: True)
    assert again.status == "nothing to do"
    assert [o for o in again.outcomes if o.action == CHANGE] == []


def test_rollback_puts_the_disabled_profiles_link_back(netctl_site):
    root = netctl_site / "hosts" / "arch-uefi"
    options = run.Options(config=str(netctl_site / "plugins.toml"), host="arch-uefi", yes=True, files_only=True)
    run.setup(options, confirm=lambda result: True)
    run.rollback(options, confirm=lambda result: True)
    assert os.readlink(root / OLD_WANTS.lstrip("/")) == "/usr/lib/systemd/system/netctl@.service"
