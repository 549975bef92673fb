"""The netctl plugin's profiles and switch script, run for real with netctl's own
/usr/lib/netctl/network in network namespaces: a "host" namespace whose uplink eth0
is a veth to a "lan" namespace where dnsmasq hands out 10.213.0.100-150 and
10.213.0.1 is the gateway. Everything that touches files runs in a private mount
namespace with /etc under an overlay, a scratch /etc/netctl, /run and
/var/lib/dhcp, so this machine's own network and files are never touched.

Needs root, iproute2, netctl, dnsmasq, dhclient (isc-dhcp-client) and ping
(iputils-ping)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from xenrun.plugins import netctl as plugin

pytestmark = pytest.mark.netns

NETWORK = "/usr/lib/netctl/network"
LAN_GW = "10.213.0.1"
# the mounts that keep the test inside its namespaces; $1 is the scratch folder
SANDBOX = r"""set -e
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1/etc-upper,workdir=$1/etc-work" /etc
mount --bind "$1/netctl" /etc/netctl
mount --bind "$1/run" /run
if [ -d /var/lib/dhcp ]; then mount --bind "$1/dhcp" /var/lib/dhcp; fi
touch "$1/ready"
exec sleep 3600
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for program in ("ip", "unshare", "nsenter", "dnsmasq", "dhclient", "ping", "bash"):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            return f"{program} is not installed"
    if not Path(NETWORK).exists():
        return f"{NETWORK} is missing (install netctl)"
    return None


def _run(*argv, check=True, env=None, timeout=60) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


class Lab:
    """The two namespaces and the process holding the host's private mounts."""

    def __init__(self, folder: Path, tag: str):
        self.folder, self.host, self.lan = folder, f"xrh{tag}", f"xrl{tag}"
        self.holder: subprocess.Popen | None = None
        self.switch = folder / "netctl-switch"

    def start(self) -> None:
        for sub in ("etc-upper", "etc-work", "netctl/hooks", "run", "dhcp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.switch.write_text(plugin.SWITCH_SCRIPT)
        self.switch.chmod(0o755)
        _run("ip", "netns", "add", self.lan)
        _run("ip", "link", "add", "eth0", "netns", self.host, "type", "veth", "peer", "name", "lan0",
             "netns", self.lan)
        _run("ip", "-n", self.lan, "addr", "add", f"{LAN_GW}/24", "dev", "lan0")
        for ns, dev in ((self.lan, "lan0"), (self.lan, "lo"), (self.host, "lo")):
            _run("ip", "-n", ns, "link", "set", dev, "up")
        _run("ip", "netns", "exec", self.lan, "dnsmasq", "--conf-file=/dev/null", "--port=0",
             "--interface=lan0", "--bind-interfaces", "--dhcp-range=10.213.0.100,10.213.0.150,255.255.255.0,1h",
             f"--dhcp-option=3,{LAN_GW}", f"--dhcp-leasefile={self.folder}/leases",
             f"--pid-file={self.folder}/dnsmasq.pid")
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.host, "unshare", "--mount", "--propagation", "private",
             "sh", "-c", SANDBOX, "sandbox", str(self.folder)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not (self.folder / "ready").exists():
            if self.holder.poll() is not None:
                raise AssertionError(f"sandbox mounts failed: {self.holder.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("sandbox mounts took too long")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill what runs in the namespaces (dnsmasq, dhclient, the holder) and
        delete them; the private mounts go with the last process."""
        for ns in (self.host, self.lan):
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 15)
                except (ProcessLookupError, ValueError):
                    pass
        if self.holder is not None:
            try:
                self.holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
        for ns in (self.host, self.lan):
            _run("ip", "netns", "del", ns, check=False)

    def run(self, *argv, check=True, timeout=60) -> subprocess.CompletedProcess:
        """``argv`` inside the host namespace and its private mounts."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "NETCTL": NETWORK}
        return _run("nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--", *argv,
                    check=check, env=env, timeout=timeout)

    def profile(self, name: str, text: str) -> None:
        (self.folder / "netctl" / name).write_text(text)

    def ip_json(self, what: str) -> str:
        return _run("ip", "-n", self.host, "-j", what).stdout

    def status(self, expected: str) -> plugin.BridgeStatus:
        return plugin.bridge_status(self.ip_json("link"), self.ip_json("addr"), "xenbr0", "eth0", expected)

    def addresses(self, dev: str) -> list[str]:
        data = json.loads(self.ip_json("addr"))
        return [f"{a['local']}/{a['prefixlen']}" for e in data if e["ifname"] == dev
                for a in e.get("addr_info", []) if a["family"] == "inet"]

    def default_route(self) -> list[dict]:
        return json.loads(_run("ip", "-n", self.host, "-j", "-4", "route", "show", "default").stdout)

    def links(self) -> list[str]:
        return [x["ifname"] for x in json.loads(self.ip_json("link"))]


@pytest.fixture
def lab(tmp_path):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    probe = _run("ip", "netns", "add", f"xrh{tag}", check=False)
    if probe.returncode != 0:
        pytest.skip(f"ip netns does not work here: {probe.stderr.strip()}")
    lab = Lab(tmp_path, tag)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


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
    lab.profile("xenbridge-dhcp", plugin.render_profile("xenbr0", "eth0", "dhcp", dhcp_client="dhclient"))
    r = lab.run(str(lab.switch), "switch", "eth-static", "xenbridge-dhcp", "xenbr0", "eth0", "dhcp", "-", "20",
                check=False)
    assert r.returncode == 0, r.stderr
    assert "ok: eth0 is a port of xenbr0" in r.stderr
    assert lab.status("dhcp").ok
    assert lab.addresses("eth0") == []
    # a second switch finds nothing to do, as the plan's guard does
    again = lab.run(str(lab.switch), "switch", "eth-static", "xenbridge-dhcp", "xenbr0", "eth0", "dhcp", "-",
                    "20", check=False)
    assert again.returncode == 0 and "nothing to do" in again.stderr


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
    lab.profile("xenbridge-static", bridge_profile("static", address, gateway))
    started = time.monotonic()
    r = lab.run(str(lab.switch), "switch", old, "xenbridge-static", "xenbr0", "eth0", address, gateway, "3",
                check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
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
    lab.profile("xenbridge-static", plugin.render_profile("xenbr0", "eth0", "static", "10.213.0.50/24",
                                                          LAN_GW).replace("IP=static", "IP=bogus"))
    r = lab.run(str(lab.switch), "switch", "eth-static", "xenbridge-static", "xenbr0", "eth0", "10.213.0.50/24",
                LAN_GW, "3", check=False)
    assert r.returncode == 1
    assert "start xenbridge-static failed" in r.stderr or "does not" in r.stderr
    assert lab.addresses("eth0") == ["10.213.0.5/24"]
    assert "xenbr0" not in lab.links()


def test_switch_refuses_bad_arguments_without_touching_anything(lab):
    for argv in (["switch", "-", "p", "xen br0", "eth0", "dhcp", "-", "3"],
                 ["switch", "-", "p", "xenbr0", "eth0", "dhcp", "-", "3s"],
                 ["switch", "-", "p", "xenbr0", "eth0", "1.2.3.4", "-", "3"],
                 ["switch", "-", "p", "xenbr0", "$(reboot)", "dhcp", "-", "3"],
                 ["check", "xenbr0"], ["reboot"]):
        r = lab.run(str(lab.switch), *argv, check=False)
        assert r.returncode == 2, argv
    assert lab.links() == ["lo", "eth0"]
