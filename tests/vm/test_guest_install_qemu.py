"""An installed guest, for real (issue 14.1): `xenrun domain.create` plans a
Debian system for a guest (the debootstrap plugin), the planned install command
runs on this machine from a local repository of Debian's packages, and the disk
it made boots under ``xl`` in the emulated Xen host through pvgrub2 (Debian's
grub-x86_64-xen.bin, so the guest's own /boot/grub/grub.cfg picks its kernel):
systemd reaches multi-user, the guest has its static address on xenbr0, dom0
logs into it with the key domains.toml gave, runs a command, and the guest is
shut down with the argv `xenrun domain.shutdown` plans.

Slow (the install about 2 min, the boot 2 to 4 under TCG): marked ``qemu``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from support import guestrepo, xenhost, xenpkgs
from support.helpers import EXAMPLES, run_xenrun
from xenrun import bootcheck, guests, run
from xenrun.domains import parse_domains
from xenrun.plan import UNCHANGED, assess
from xenrun.plugins.debootstrap import SCRIPT_PATH
from xenrun.targets.base import Result

pytestmark = pytest.mark.qemu

HOST = "arch-grub"
ROOT_OF = "hosts/arch-grub"
PVGRUB = "/usr/lib/grub-xen/grub-x86_64-xen.bin"
GUEST_ADDRESS = "10.0.0.2"
DOM0_ADDRESS = "10.0.0.1"
DISK_MB = 1536

DOMAIN = """
[domain.deb1]
host = "arch-grub"
type = "pv"
memory = "256M"
kernel = "{pvgrub}"

[[domain.deb1.disks]]
backend = "image"
size = "{size}M"

[[domain.deb1.vif]]
bridge = "xenbr0"

[domain.deb1.install]
method = "debootstrap"
mirror = "file://{repo}"
check_gpg = false
packages = ["openssh-client"]
ssh_key_file = "{key}.pub"
address = "{address}/24"
gateway = "{dom0}"
"""

# dom0: the guest's image file is QEMU's disk (/dev/vda in dom0, reached at the
# path its xl config names), the bridge gets dom0's address; then xl create, wait
# for the guest's getty, log in over SSH, shut it down as xenrun would.
DOM0_SCRIPT = r"""
i=0; while [ ! -b /dev/vda ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
ln -s /dev/vda {image}
ip addr add {dom0}/24 dev xenbr0
chmod 600 /root/key
echo XENHOST-XL-CREATE
xl create {cfg}; echo "XENHOST-XL-CREATE-RC=$?"
log=/var/log/xen/console/guest-deb1.log
i=0
while [ $i -lt {wait} ] && ! grep -qs 'login:' $log; do sleep 1; i=$((i+1)); done
echo "XENHOST-GUEST-LOGIN-WAIT=$i"
ssh -n -i /root/key -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ConnectTimeout=60 root@{guest} 'echo GUEST-SSH hostname=$(cat /etc/hostname) root=$(findmnt -no SOURCE /) \
    ip=$(ip -4 -o addr show eth0 | awk "{{print \$4}}") state=$(systemctl is-system-running)'
echo "XENHOST-SSH-RC=$?"
{shutdown}; echo "XENHOST-SHUTDOWN-RC=$?"
xl list
echo XENHOST-GUEST-CONSOLE-BEGIN
sed 's/^/GUEST| /' $log
echo XENHOST-GUEST-CONSOLE-END
"""


@pytest.fixture(scope="module")
def pkgs() -> dict:
    if shutil.which(bootcheck.QEMU) is None:
        pytest.skip(f"{bootcheck.QEMU} is not installed (apt-get install qemu-system-x86)")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    p = xenpkgs.fetch()
    xenhost.fetch_xen_tools()
    return p


@pytest.fixture(scope="module")
def installed(pkgs, tmp_path_factory):
    """The site, after `domain.create deb1 --files-only` and the install command it
    left for the host, run here for real."""
    base = tmp_path_factory.mktemp("installed")
    site = base / "site"
    shutil.copytree(EXAMPLES, site, symlinks=True)
    root = site / ROOT_OF
    grub = guestrepo.grub_xen()
    (root / PVGRUB.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(grub / "grub-x86_64-xen.bin", root / PVGRUB.lstrip("/"))  # as grub-xen-host puts it on a host
    key = base / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    repo = guestrepo.ensure()
    with open(site / "domains.toml", "a") as f:
        f.write(DOMAIN.format(pvgrub=PVGRUB, size=DISK_MB, repo=repo, key=key, address=GUEST_ADDRESS,
                              dom0=DOM0_ADDRESS))
    create = ("domain.create", "deb1", "--config", site / "plugins.toml", "--host", HOST)
    dry = run_xenrun(*create, "--dry", "--format", "json")
    assert dry.returncode == 0, dry.stderr
    r = run_xenrun(*create, "--files-only", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    pending = json.loads((root / "var/lib/xenrun/pending").read_text())["commands"]
    install = next(c for c in pending if c[0].endswith("/debootstrap-guest") and c[1] == "install")
    image = install[install.index("--disk") + 1]
    # the host's paths inside the site's machine root: the script and the disk
    here = [str(root) + a if i == 0 or a == image else a for i, a in enumerate(install)]
    started = subprocess.run(["sh", *here], capture_output=True, text=True, timeout=1800)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    return {"site": site, "root": root, "key": key, "image": image, "install": install,
            "dry": json.loads(dry.stdout), "log": started.stdout}


def test_the_plan_shows_the_install_before_the_config(installed):
    plan = installed["dry"]["plan"]
    kinds = [(c["kind"], c.get("path") or c.get("argv", [""])[0]) for c in plan]
    paths = [p for _, p in kinds]
    script = next(i for i, p in enumerate(paths) if p.endswith("/debootstrap-guest"))
    config = paths.index("/etc/xen/deb1.cfg")
    assert paths.index("/var/lib/xen/images/deb1.img") < script < config, kinds
    argv = installed["install"]
    assert argv[argv.index("--mirror") + 1].startswith("file:///")
    assert argv[argv.index("--address") + 1] == f"{GUEST_ADDRESS}/24"


def test_the_install_is_done_once(installed):
    """The planned guard says done on the installed disk; the install run again
    changes nothing on it."""
    root, argv = installed["root"], installed["install"]
    disk = str(root) + installed["image"]
    check = [str(root) + argv[0], "check", "--disk", disk, "--uuid", argv[argv.index("--uuid") + 1]]
    assert subprocess.run(["sh", *check[0:1], *check[1:]]).returncode == 0
    before = subprocess.run(["sha256sum", disk], capture_output=True, text=True).stdout.split()[0]
    again = [str(root) + a if a in (argv[0], installed["image"]) else a for a in argv]
    r = subprocess.run(["sh", *again], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "already holds the installed system" in r.stdout, r.stdout + r.stderr
    assert subprocess.run(["sha256sum", disk], capture_output=True, text=True).stdout.split()[0] == before


def test_the_installed_disk_holds_a_xen_guest(installed):
    disk = str(installed["root"]) + installed["image"]

    def cat(path: str) -> str:
        return subprocess.run(["debugfs", "-R", f"cat {path}", disk], capture_output=True, text=True).stdout

    assert cat("/etc/hostname") == "deb1\n"
    assert "console=hvc0" in cat("/boot/grub/grub.cfg")
    assert f"address {GUEST_ADDRESS}/24" in cat("/etc/network/interfaces")
    assert cat("/root/.ssh/authorized_keys").strip() == (installed["key"].with_suffix(".pub")).read_text().strip()
    uuid = installed["install"][installed["install"].index("--uuid") + 1]
    assert cat("/etc/fstab").split("\n")[1].startswith(f"UUID={uuid}\t/\t")


def test_xens_own_pygrub_finds_the_guests_kernel(installed, tmp_path):
    """The article's S21 boot: Xen 4.17's pygrub (from xen-utils-4.17, as xl runs
    it in dom0) reads the installed disk's grub.cfg and hands out its kernel,
    initramfs and command line. (The dom0 of the emulated host has no Python, so
    the boot under xl below goes through pvgrub2.)"""
    tools = xenhost.fetch_xen_tools()
    lib = tools / "usr/lib/xen-4.17/lib"
    env = {"PYTHONPATH": str(lib / "python"), "LD_LIBRARY_PATH": str(lib / "x86_64-linux-gnu"),
           "XEN_FSIMAGE_FSDIR": str(lib / "x86_64-linux-gnu/xenfsimage"), "PATH": "/usr/bin:/bin"}
    disk = str(installed["root"]) + installed["image"]
    r = subprocess.run(["python3", str(tools / "usr/lib/xen-4.17/bin/pygrub"), "-q", "--output-format=simple",
                        f"--output-directory={tmp_path}", disk], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    got = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    uuid = installed["install"][installed["install"].index("--uuid") + 1]
    assert got["args"] == f"root=UUID={uuid} ro console=hvc0 net.ifnames=0", got
    kernel = subprocess.run(["debugfs", "-R", "cat /boot/grub/grub.cfg", disk], capture_output=True,
                            text=True).stdout.split("linux /boot/")[1].split()[0]
    subprocess.run(["debugfs", "-R", f"dump /boot/{kernel} {tmp_path / 'vmlinuz'}", disk], check=True,
                   capture_output=True)
    assert open(got["kernel"], "rb").read() == (tmp_path / "vmlinuz").read_bytes()
    assert os.path.getsize(got["ramdisk"]) > 1 << 20


def _boot_and_log_in(installed, pkgs, tmp_path, cfg_text: str, loader: str, **qemu_kw) -> str:
    """Boot the emulated Xen host with the installed disk and ``cfg_text`` as
    /etc/xen/deb1.cfg (``loader``: the pvgrub2 image it names), then check the whole
    life of the guest on its console and over SSH; returns the guest's console."""
    site, root = installed["site"], installed["root"]
    domain = next(d for d in parse_domains((site / "domains.toml").read_text()) if d.name == "deb1")
    shutdown = shlex.join(guests.plan_xl(domain, "shutdown")[0].argv)  # what domain.shutdown runs
    script = DOM0_SCRIPT.format(image=installed["image"], dom0=DOM0_ADDRESS, guest=GUEST_ADDRESS,
                                cfg="/etc/xen/deb1.cfg", wait=420, shutdown=shutdown)
    files = {"/etc/xen/deb1.cfg": cfg_text.encode(), loader: guestrepo.grub_xen() / loader.rsplit("/", 1)[1],
             "/root/key": installed["key"].read_bytes(), "/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"}
    initrd = xenhost.build_dom0_initramfs(tmp_path / "dom0.gz", pkgs, script, files, host_tools=("ssh",))
    disk = root / installed["image"].lstrip("/")
    host = xenhost.boot_xen_host(pkgs, initrd, [disk], timeout=900, memory_mb=1536, **qemu_kw)
    log = host.log
    (tmp_path / "dom0.log").write_text(log)  # kept by pytest for a look after a failure
    console = xenhost.parse_guest_console(log)
    explain = f"{host.reason}\n--- guest console ---\n{console[-4000:]}\n--- dom0 ---\n{log[-5000:]}"
    assert host.ok, explain
    assert "XENHOST-XL-CREATE-RC=0" in log, explain
    assert "deb1 login:" in console, explain  # the getty systemd starts on hvc0
    ssh = re.search(r"GUEST-SSH hostname=(\S+) root=(\S+) ip=(\S+) state=(\S+)", log)
    assert ssh, explain
    assert ssh.groups()[:3] == ("deb1", "/dev/xvda", f"{GUEST_ADDRESS}/24"), explain
    # multi-user reached: systemd says so on the console (its status lines), or over SSH
    assert re.search(r"Reached target .*Multi-User System", console) or ssh.group(4) == "running", explain
    assert ssh.group(4) in ("running", "degraded"), explain
    assert "XENHOST-SHUTDOWN-RC=0" in log, explain
    assert "systemd-shutdown[1]: Powering off." in console, explain
    after = log[log.index("XENHOST-SHUTDOWN-RC"):log.index("XENHOST-GUEST-CONSOLE-BEGIN")]
    assert "Domain-0" in after and "deb1" not in after, explain  # xl list: the guest is gone
    return console


def test_the_installed_guest_boots_under_xl_and_is_reached_over_ssh(installed, pkgs, tmp_path):
    """PV, through pvgrub2: GRUB in the guest reads the guest's own grub.cfg."""
    cfg_text = (installed["root"] / "etc/xen/deb1.cfg").read_text()
    assert f'kernel = "{PVGRUB}"' in cfg_text and "file:/var/lib/xen/images/deb1.img,xvda,w" in cfg_text
    console = _boot_and_log_in(installed, pkgs, tmp_path, cfg_text, PVGRUB)
    assert "Reading (xen/xvda)/boot/grub/grub.cfg" in console


class _DomZeroCommands:
    """The site's machine root as the target, its guest-installer commands run on
    this machine with the host's paths (the script, the disk) inside the root:
    what dom0 runs when it plans the guest again."""

    def __init__(self, target, root, image: str):
        self._target, self._root, self._mapped = target, root, (SCRIPT_PATH, image)

    def __getattr__(self, name):
        return getattr(self._target, name)

    def cannot_execute(self, argv, written=False):
        return None if argv[0] == SCRIPT_PATH else "not run in this test"

    def execute(self, argv, timeout=None, input=None):
        here = [str(self._root) + a if a in self._mapped else a for a in argv]
        r = subprocess.run(["sh", *here], capture_output=True, text=True, timeout=timeout)
        return Result(tuple(argv), r.returncode, r.stdout, r.stderr)


def test_a_second_create_installs_nothing(installed):
    """domain.create planned again on the installed disk: the disk, the script and
    the install are all as planned (the install's guard, the real script, asks the
    disk), so nothing is done twice."""
    site, root = installed["site"], installed["root"]
    p = run.prepare(run.Options(config=str(site / "plugins.toml"), host=HOST))
    domains = guests.host_domains(p, None)
    p, domain = guests.with_disk_plugins(p, guests.the_domain(domains, "deb1", p, None))
    changes, _notes = guests.plan_create(p, run.gather_facts(p), domain, domains)
    outcomes = assess(changes, _DomZeroCommands(p.target, root, installed["image"]))
    by_what = {getattr(o.change, "path", None) or o.change.argv[1]: o for o in outcomes
               if getattr(o.change, "plugin", "") in ("image", "debootstrap")}
    assert set(by_what) == {installed["image"], SCRIPT_PATH, "install"}, by_what
    assert {k: o.action for k, o in by_what.items()} == {k: UNCHANGED for k in by_what}, \
        {k: o.reason for k, o in by_what.items()}
    assert "says done" in by_what["install"].reason
