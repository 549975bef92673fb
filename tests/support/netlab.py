"""A lab for network plugins, run for real in network namespaces: a "host" namespace
whose uplink eth0 is a veth to a "lan" namespace where dnsmasq hands out
10.213.0.100-150 and 10.213.0.1 is the gateway. Everything that touches files runs
in a private mount namespace with /etc under an overlay, a scratch /etc/netctl, /run
and /var/lib/dhcp, so this machine's own network and files are never touched.

``switch(lab, change)`` carries out a SwitchNetwork as the applier does: its plan
folder (xenrun.netswitch.plan_folder) with the originals of its files, then the
core's switch script's ``run`` and ``confirm`` inside the namespaces."""

from __future__ import annotations

import ipaddress  # noqa: F401 - used by the tests that import this module's names
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from xenrun import netswitch
from xenrun.plugins import netctl as plugin

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


def _missing(*programs: str) -> str | None:
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for program in ("ip", "unshare", "nsenter", "dnsmasq", "dhclient", "ping", "bash", "setsid", *programs):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            return f"{program} is not installed"
    return None


def _run(*argv, check=True, env=None, timeout=60, input=None) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


class Lab:
    """The two namespaces and the process holding the host's private mounts."""

    def __init__(self, folder: Path, tag: str):
        self.folder, self.host, self.lan = folder, f"xrh{tag}", f"xrl{tag}"
        self.holder: subprocess.Popen | None = None
        self.switch = folder / "net-switch"
        self.plans = 0

    def start(self) -> None:
        for sub in ("etc-upper", "etc-work", "netctl/hooks", "run/network", "dhcp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.switch.write_text(netswitch.SCRIPT)
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

    def run(self, *argv, check=True, timeout=60, input=None) -> subprocess.CompletedProcess:
        """``argv`` inside the host namespace and its private mounts."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
        return _run("nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--", *argv,
                    check=check, env=env, timeout=timeout, input=input)

    def write(self, path: str, text: str) -> None:
        """A file as the namespace sees it (under /etc: in the overlay)."""
        self.run("sh", "-c", 'cat > "$1"', "write", path, input=text)

    def read(self, path: str) -> str | None:
        r = self.run("cat", path, check=False)
        return r.stdout if r.returncode == 0 else None

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


def make_lab(tmp_path, *programs: str):
    """The lab for a test (a generator for a fixture), or a skip naming what is missing."""
    reason = _missing(*programs)
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




def switch(lab: Lab, change, confirm: bool = True, timeout: float = 120):
    """Carry out ``change`` (a SwitchNetwork) as the applier does. Returns the
    results of ``run`` and of ``confirm`` (None when not asked or not reached)."""
    lab.plans += 1
    folder = lab.folder / f"plan-{lab.plans}"
    folder.mkdir()
    saved = {}
    for number, file in enumerate(change.files, 1):
        text = lab.read(file.path)
        if text is not None:
            copy = folder / f"orig.{number}"
            copy.write_text(text)
            saved[file.path] = {"kind": "file", "copy": str(copy), "mode": 0o644, "uid": 0, "gid": 0}
    for path, data, _ in netswitch.plan_folder(change, str(folder), saved):
        Path(path).write_bytes(data)
    argv = netswitch.run_argv(change, str(folder))
    ran = lab.run(str(lab.switch), *argv[1:], check=False, timeout=timeout)
    confirmed = None
    if confirm and ran.returncode == 0:
        confirmed = lab.run(str(lab.switch), "confirm", str(folder), check=False, timeout=60)
    return ran, confirmed
