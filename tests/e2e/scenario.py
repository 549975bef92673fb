"""The article end to end on the emulated machine, driven over SSH (issue 6).

Run by tests/vm/test_e2e.py and by ``invoke e2e`` (``python -m e2e``), printing one
timestamped line per step; everything else (each xenrun command's output, the
serial console) goes to files in the work folder, named in the log.

1. image: the cached Debian 12 disk (tests/e2e/image.py), built when missing: a
   stock Debian (ifupdown, eth0 on DHCP) with no Xen; its apt source is the
   test's repository of Debian's own packages (tests/e2e/aptrepo.py on
   127.0.0.1, reached as http://10.0.2.100/ through QEMU's guestfwd).
2. boot 1: plain Linux, SSH on a port of 127.0.0.1; no Xen installed.
3. ``xenrun setup --dry``: S6 plans apt-get update and the install, and says what
   follows is planned again once it has run; nothing is installed.
4. a failure in the middle: /usr/local/sbin/grub-reboot made to fail. S6 installs
   Xen for real with apt (a run of its own, kept); the rest is planned again from
   the package's files and fails after it rewrote the GRUB files and grub.cfg; it
   exits 1 and every file is put back (hashed over SSH: only the package's files
   and its update-grub's grub.cfg differ, its conffiles as it left them); boot 2
   still boots the old Linux entry (the package's update-grub did not make Xen
   GRUB's default).
4b. power cuts (tests/e2e/powercut.py): QEMU killed at three crash points of
   ``xenrun setup``; each time the machine boots plain Linux and the cut run has no
   end record; the next setup recovers, and every managed file was old or new.
5. ``xenrun setup --yes``: the install is kept (S6 nothing to do); services
   (S12), xenfs (S13: Debian's init script mounts it, no fstab line), the Xen
   command line (S7, S14), GRUB with Xen booted once (S10), the ifupdown bridge
   xenbr0 over eth0 switched live under the SSH session (S11).
6. boot 3 (Xen, once): ``xl list`` shows Domain-0 (S15), Xen's command line has
   dom0_mem, eth0 is a port of xenbr0 which has the address, /proc/xen is xenfs,
   the services are active, GRUB's once-entry is used up and Linux is still its
   saved default (so the next reboot is the way back, S10).
7. ``xenrun promote --yes``; boot 4 comes up in Xen by default; boot 4b: the
   kept plain-Linux entry once (grub-reboot) reaches multi-user with no unit
   failed and SSH up, xenrun's files in place (the way back); boot 4c: Xen again.
   (The plain-Linux boot before promote, once a boot of its own, is not repeated:
   it boots the same entry as 4b, and promote needs a Xen boot after it.)
8. guests (S16-S23): a kernel and a reporting busybox initramfs copied to the
   machine, a volume group on its second disk; ``xenrun domain.create`` of a PV
   guest on an image and one on LVM; each guest's console (kept by xenconsoled)
   shows it saw its disk (xvda, the size asked) and its NIC (the MAC of its xl
   config), dom0's vif for it is a port of xenbr0, ``xl list`` shows both;
   ``domain.shutdown`` of one (it powers itself off), ``domain.destroy`` of the
   other, each a second time with nothing to do.
9. a second ``xenrun setup --yes`` reports nothing to do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from e2e import aptrepo, powercut
from e2e import image as image_mod
from e2e.vm import VM, VMError

REPO = Path(__file__).resolve().parents[2]
HOST = "e2e"
DOM0_MEM = "512M"
# the article's DHCP bridge: it wears eth0's MAC (xenrun's profile sets
# MACAddress), so QEMU's DHCP leases it eth0's address and the SSH session
# survives the switch (a bridge with a MAC of its own got a new address and cut
# the session: found by this scenario)
BRIDGE_IP = "dhcp"
XEN_OPTIONS = ["console=com1", "com1=115200,8n1"]
FAIL_AT = "/usr/local/sbin/grub-reboot"  # found before /usr/sbin (xenrun's search path)
# what setup may change, hashed before and after the failed run (folders: listed with link targets)
MANAGED_FILES = ("/etc/fstab", "/etc/default/grub", "/etc/default/grub.d/xen.cfg", "/boot/grub/grub.cfg",
                 "/boot/grub/grubenv")
GUEST_IMAGE, GUEST_LVM = "e2e-img", "e2e-lvm"
GUESTS = {GUEST_IMAGE: 'backend = "image"\nsize = "256M"',  # a sparse file in /var/lib/xen/images
          GUEST_LVM: 'backend = "lvm"\nvg = "vg0"\nsize = "192M"'}  # /dev/vg0/e2e-lvm on the second disk
MANAGED_DIRS = ("/etc/network", "/etc/systemd/system", "/usr/local/lib/xenrun", "/etc/udev/rules.d")


def _path_of(line: str) -> str:
    """The path of a managed_state line ("SHA  PATH", "absent PATH" or find's "PATH KIND MODE [TARGET]")."""
    parts = line.split()
    return parts[0] if parts[0].startswith("/") else parts[1]


class ScenarioError(AssertionError):
    """A step of the scenario did not do what the article says."""


@dataclass
class Timings:
    rows: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, what, seconds)

    def add(self, kind: str, what: str, seconds: float) -> None:
        self.rows.append((kind, what, seconds))

    def total(self, kind: str | None = None) -> float:
        return sum(s for k, _, s in self.rows if kind is None or k == kind)

    def table(self) -> str:
        out = ["time split:"]
        for kind in ("image", "boot", "step"):
            rows = [(w, s) for k, w, s in self.rows if k == kind]
            out.append(f"  {kind + 's' if kind != 'image' else 'image build'}: {self.total(kind):7.1f} s")
            out += [f"    {w:<52} {s:7.1f} s" for w, s in rows]
        out.append(f"  total: {self.total():7.1f} s")
        return "\n".join(out)


class Scenario:
    def __init__(self, workdir: Path, progress: Callable[[str], None] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logfile = open(self.workdir / "scenario.log", "a")
        self._progress = progress or (lambda line: print(line, flush=True))
        self.started = time.monotonic()
        self.timings = Timings()
        self.vm: VM | None = None
        self.commands = 0
        self.network = "ifupdown"  # the network plugin (and the stack in charge of eth0)

    # -- output -----------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {text}"
        self.logfile.write(line + "\n")
        self.logfile.flush()
        self._progress(line)

    def timed(self, kind: str, what: str, fn):
        self.say(f"{what} ...")
        t = time.monotonic()
        try:
            return fn()
        finally:
            seconds = time.monotonic() - t
            self.timings.add(kind, what, seconds)
            self.say(f"{what}: {seconds:.1f} s")

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        if not ok:
            raise ScenarioError(f"{what}{': ' + detail if detail else ''}")
        self.say(f"  ok: {what}")

    # -- xenrun as the user runs it -----------------------------------------------------
    def write_site(self) -> Path:
        site = self.workdir / "site"
        site.mkdir(exist_ok=True)
        key = site / "id_ed25519"
        shutil.copy2(self.image.key, key)
        key.chmod(0o600)
        (site / "plugins.toml").write_text(f"""\
# The e2e machine: Debian 12 under QEMU, reached over SSH on 127.0.0.1.
[hosts.{HOST}]
address = "{self.vm.address}"
identity = "id_ed25519"
boot = "grub"
network = "{self.network}"

[plugin.xen]
dom0_mem = "{DOM0_MEM}"
options = {json.dumps(XEN_OPTIONS)}   # Xen's console on the serial log

# The bridge must keep the machine's address: QEMU forwards SSH to 10.0.2.15
# only. With DHCP it does, since it wears eth0's MAC (see BRIDGE_IP in
# tests/e2e/scenario.py).
[plugin.{self.network}]
interface = "eth0"
ip = "{BRIDGE_IP}"
{'address = "10.0.2.15/24"' if BRIDGE_IP == "static" else ""}
{'gateway = "10.0.2.2"   # QEMU user network: answers ping, never leaves this machine' if BRIDGE_IP == "static" else ""}
""")
        return site / "plugins.toml"

    def xenrun(self, *args: str, expect: int = 0, timeout: float = 900) -> tuple[dict | None, str, str]:
        """The xenrun command as a process; its stdout and stderr are kept in the
        work folder. Returns (the JSON report when --format json, stdout, stderr)."""
        self.commands += 1
        exe = Path(sys.executable).parent / "xenrun"
        argv = ([str(exe)] if exe.exists() else [sys.executable, "-m", "xenrun"]) + \
            list(args) + ["--config", str(self.site), "--host", HOST]
        name = f"{self.commands:02d}-xenrun-{args[0]}"
        self.say(f"  $ xenrun {' '.join(args)} --host {HOST}   (output: {self.workdir / name}.out/.err)")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",  # this machine's key (new with every image) kept apart
               "XENRUN_KNOWN_HOSTS": str(self.workdir / "known_hosts")}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, cwd=self.workdir)
        (self.workdir / f"{name}.out").write_text(proc.stdout)
        (self.workdir / f"{name}.err").write_text(proc.stderr)
        report = None
        if "json" in args and proc.stdout.strip().startswith("{"):
            report = json.loads(proc.stdout)
        if proc.returncode != expect:
            raise ScenarioError(f"xenrun {' '.join(args)}: exit {proc.returncode}, expected {expect}\n"
                                f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
        return report, proc.stdout, proc.stderr

    def show_report(self, report: dict) -> None:
        for item in report["plan"]:
            what = " ".join(item["argv"]) if "argv" in item else f"{item['kind']} {item.get('path')}"
            self.say(f"    {item['result']:<9} [{item.get('step') or '-'} {item['plugin']}] {what}")
        s = report["summary"]
        self.say(f"    => {report['report']['status']}: {s['changed']} changed, {s['unchanged']} unchanged,"
                 f" {s['pending']} pending")

    # -- the machine --------------------------------------------------------------------
    def sh(self, command: str, timeout: float = 120) -> str:
        return self.vm.out(command, timeout=timeout)

    def managed_state(self) -> str:
        """sha256 of the files setup manages, and the listing (with link targets)
        of its folders, read over SSH."""
        files = " ".join(MANAGED_FILES)
        dirs = " ".join(MANAGED_DIRS)
        return self.sh(f"for f in {files}; do if [ -e $f ]; then sha256sum $f; else echo absent $f; fi; done;"
                       f" for d in {dirs}; do [ -e $d ] && find $d -printf '%p %y %m %l\\n' | sort"
                       f" || echo absent $d; done")

    def hypervisor(self) -> str:
        return self.sh("cat /sys/hypervisor/type 2>/dev/null || echo none")

    def grubenv(self) -> dict:
        out = self.sh("grub-editenv /boot/grub/grubenv list")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def grub_entries(self) -> list[tuple[str, str]]:
        """(id, title) of the top-level menu entries of grub.cfg."""
        cfg = self.sh("cat /boot/grub/grub.cfg")
        out = []
        for line in cfg.splitlines():
            m = re.match(r"menuentry '([^']*)'.*\$menuentry_id_option '([^']*)'", line)
            if m:
                out.append((m.group(2), m.group(1)))
        return out

    def check_linux(self, why: str) -> None:
        hv = self.hypervisor()
        self.check(hv != "xen", f"{why}: booted plain Linux (/sys/hypervisor/type: {hv})")
        self.check(not self.sh("cat /proc/cmdline").count("hvc0"), "the kernel's command line is the Linux entry's",
                   self.sh("cat /proc/cmdline"))

    def xen_installed(self) -> bool:
        status = self.vm.ssh("dpkg-query -W -f='${Status}' xen-system-amd64", check=False).stdout
        return status.strip() == "install ok installed"

    def check_bridge_live(self) -> None:
        links = {x["ifname"]: x for x in json.loads(self.sh("ip -j link show"))}
        self.check(links.get("eth0", {}).get("master") == "xenbr0", "the bridge switch ran live over SSH:"
                   " eth0 is a port of xenbr0, and the SSH session survived it")

    def check_plain_linux(self, why: str) -> None:
        """The kept Linux entry with every file of xenrun's in place: multi-user
        reached, SSH up (we are talking through it), no unit failed."""
        self.check_linux(why)
        state = self.vm.ssh("systemctl is-system-running --wait", check=False, timeout=300).stdout.strip()
        failed = self.vm.ssh("systemctl --failed --no-legend --plain", check=False).stdout.strip()
        self.say(f"    system state: {state}; failed units: {failed or 'none'}")
        self.check(state == "running" and not failed, f"{why}: multi-user reached with no unit failed", failed)
        links = {x["ifname"]: x for x in json.loads(self.sh("ip -j link show"))}
        self.check(links.get("eth0", {}).get("master") == "xenbr0", f"{why}: eth0 is a port of xenbr0 under plain"
                   " Linux too (the bridge is ifupdown's, not Xen's)", json.dumps(links.get("eth0")))

    def boot_once(self, xen: bool) -> float:
        """Boot GRUB's first Xen (or plain Linux) entry once, with grub-reboot, as
        an administrator does."""
        entry = next(i for i, title in self.grub_entries() if ("xen" in title.lower()) == xen)
        self.sh(f"grub-reboot '{entry}'")
        return self.vm.reboot()

    def check_xen(self, why: str) -> None:
        hv = self.hypervisor()
        self.check(hv == "xen", f"{why}: running under Xen (/sys/hypervisor/type: {hv})")
        listing = self.sh("xl list", timeout=120)
        self.check(re.search(r"^Domain-0\s", listing, re.M) is not None, "`xl list` shows Domain-0 (S15)", listing)
        self.say("    " + listing.replace("\n", "\n    "))
        info = self.sh("xl info")
        cmdline = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                        if line.startswith("xen_commandline")), "")
        self.check(f"dom0_mem={DOM0_MEM},max:{DOM0_MEM}" in cmdline,
                   f"Xen's command line keeps dom0_mem={DOM0_MEM},max:{DOM0_MEM} (S14): {cmdline}")
        total = next((int(line.split(":", 1)[1]) for line in info.splitlines()
                      if line.startswith("total_memory")), 0)
        dom0 = int(self.sh("xl list 0 | awk 'NR==2 { print $3 }'") or 0)
        self.check(dom0 <= 512, f"dom0 has {dom0} MiB of the machine's {total} MiB (S14)")
        links = {x["ifname"]: x for x in json.loads(self.sh("ip -j link show"))}
        self.check(links.get("eth0", {}).get("master") == "xenbr0", "eth0 is a port of xenbr0 (S11)",
                   json.dumps(links.get("eth0")))
        addr = self.sh("ip -4 -o addr show dev xenbr0 scope global")
        self.check("10.0.2.15/" in addr, "xenbr0 holds the machine's address", addr)
        fs = self.sh("findmnt -n -o FSTYPE /proc/xen || true")
        self.check(fs == "xenfs", f"/proc/xen is mounted as xenfs (S13): {fs or 'not mounted'}")
        active = self.vm.ssh("systemctl is-active xen.service xendomains.service", check=False).stdout.split()
        self.check(active == ["active", "active"], "xen.service and xendomains.service are active (S12)",
                   " ".join(active))
        self.check_stack()

    def check_stack(self) -> None:
        """The network stack in charge has the bridge up."""
        state = self.sh("ifquery --state")
        self.check("xenbr0=xenbr0" in state.split(), "ifupdown has xenbr0 up (its stanza in interfaces.d)", state)

    # -- guests (S16 to S23) ------------------------------------------------------------
    def prepare_guests(self) -> None:
        """What the administrator provides: a kernel and initramfs for the PV guests
        (Debian's kernel, a busybox initramfs that reports the disks and NICs the
        guest sees, then stays up until shut down), and a volume group on the
        machine's second disk for the LVM guest. domains.toml beside plugins.toml."""
        from support import xenhost, xenpkgs
        pkgs = xenpkgs.fetch()
        initrd = xenhost.build_guest_initramfs(self.workdir / "guest-initrd.gz", pkgs, wait_seconds=120, end="stay")
        self.vm.put(Path(pkgs["vmlinuz"]), xenhost.GUEST_KERNEL)
        self.vm.put(initrd, xenhost.GUEST_RAMDISK)
        self.say(f"  guest kernel {pkgs['kernel_abi']} and a busybox initramfs copied to {xenhost.GUEST_KERNEL},"
                 f" {xenhost.GUEST_RAMDISK}")
        self.sh("pvcreate -y /dev/vdb >/dev/null && vgcreate vg0 /dev/vdb >/dev/null")
        self.say("  " + self.sh("vgs --noheadings -o vg_name,pv_count,vg_size vg0"))
        (self.site.parent / "domains.toml").write_text("".join(
            xenhost.guest_domain_toml(name, HOST, disk) for name, disk in GUESTS.items()))
        self.say(f"  domains.toml: {', '.join(GUESTS)}")

    def guest_console(self, name: str) -> str:
        return self.vm.ssh(f"cat /var/log/xen/console/guest-{name}.log", check=False).stdout

    def create_guest(self, name: str) -> None:
        report, _, _ = self.xenrun("domain.create", name, "--yes", "--format", "json")
        self.show_report(report)
        self.check(report["report"]["status"] == "applied", f"domain.create {name} applied its plan")
        cfg = self.sh(f"cat /etc/xen/{name}.cfg")
        self.say("    " + cfg.strip().replace("\n", "\n    "))
        mac = re.search(r"mac=([0-9a-f:]{17})", cfg)
        self.check(mac is not None, f"/etc/xen/{name}.cfg gives the guest a MAC on xenbr0", cfg)
        deadline = time.monotonic() + 600
        console = ""
        while time.monotonic() < deadline and "GUEST-INIT-DONE" not in console:
            time.sleep(5)
            console = self.guest_console(name)
        self.say(f"    {name} console:\n      " + "\n      ".join(
            line for line in console.splitlines() if line.startswith("GUEST-")))
        self.check("GUEST-INIT-DONE" in console, f"{name} booted and reported its devices on its console",
                   console[-3000:])
        size = int(GUESTS[name].split('size = "')[1].split("M")[0]) << 20
        self.check(f"GUEST-DISK xvda {size // 512} sectors" in console,
                   f"{name} sees its disk as xvda, {size >> 20} MiB ({'image' if 'image' in GUESTS[name] else 'LVM'})")
        self.check(f"GUEST-NIC eth0 {mac.group(1)}" in console, f"{name} sees its NIC eth0 with {mac.group(1)}")
        domid = self.sh(f"xl domid {name}")
        links = {x["ifname"]: x for x in json.loads(self.sh("ip -j link show"))}
        vif = f"vif{domid}.0"
        self.check(links.get(vif, {}).get("master") == "xenbr0", f"dom0's {vif} (its backend) is a port of xenbr0",
                   json.dumps(links.get(vif)))

    def check_running(self, names: list[str]) -> None:
        listing = self.sh("xl list")
        self.say("    " + listing.replace("\n", "\n    "))
        for name in names:
            self.check(re.search(rf"^{re.escape(name)}\s", listing, re.M) is not None, f"`xl list` shows {name} running")

    def stop_guest(self, name: str, action: str) -> None:
        report, _, _ = self.xenrun(f"domain.{action}", name, "--yes", "--format", "json")
        self.show_report(report)
        gone = self.vm.ssh(f"xl list {name}", check=False).returncode != 0
        self.check(gone, f"{name} is off after domain.{action}")
        if action == "shutdown":
            self.check("GUEST-SHUTDOWN-REQUESTED" in self.guest_console(name),
                       f"{name} powered itself off when asked (a clean shutdown, not a destroy)")
        report, _, _ = self.xenrun(f"domain.{action}", name, "--yes", "--format", "json")
        self.check(report["summary"]["changed"] == 0, f"domain.{action} {name} again: nothing to do")

    # -- the scenario -------------------------------------------------------------------
    def run(self) -> Timings:
        reason = image_mod.missing()
        if reason:
            raise ScenarioError(reason)
        self.say(f"e2e scenario; work folder {self.workdir}")
        self.image, built = image_mod.ensure(lambda line: self.say(line))
        self.timings.add("image", "image build" + (" (cached)" if not built else ""), built)
        info = self.image.info
        self.repo = aptrepo.serve(self.image.folder / "repo", log=self.workdir / "repo.log")
        self.say(f"image: Debian {image_mod.SUITE}, kernel {info['kernel']}, no Xen; xenrun installs Xen"
                 f" {info['xen']} (S6) with apt from the test's repository of Debian's packages, served on"
                 f" {self.repo.url} and reached by the machine as http://{image_mod.REPO_ADDRESS}/")
        self.vm = VM(self.image.disk, self.image.key, self.workdir / "vm", progress=lambda line: self.say(line),
                     guest_forward=(image_mod.REPO_ADDRESS, 80, self.repo.port))
        try:
            self._steps()
        except BaseException as e:
            if self.vm is not None and self.vm.process is not None:
                self.say(f"FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                self.say(f"console tail ({self.vm.console}):\n{self.vm.console_tail(60)}")
            raise
        finally:
            if self.vm is not None:
                self.timed("step", "power off", self.vm.stop)
                for disk in self.vm.workdir.glob("*.qcow2"):  # the logs stay, the overlays go
                    disk.unlink()
            self.repo.close()
            self.say(self.timings.table())
            self.logfile.close()
        return self.timings

    def _steps(self) -> None:
        vm = self.vm
        self.timed("boot", "boot 1: start QEMU, plain Linux, wait for SSH", lambda: (vm.start(), vm.wait_ssh()))
        self.check_linux("boot 1")
        kernel, addr = self.sh("uname -r"), self.sh("ip -4 -o addr show dev eth0 | awk '{ print $2, $4 }'")
        self.say(f"  machine: Linux {kernel}, {addr}")
        self.check(not self.xen_installed(), "the machine has no Xen (a stock Debian 12)")
        self.site = self.write_site()
        self.say(f"site: {self.site}")

        def dry():
            report, _, _ = self.xenrun("setup", "--dry", "--format", "json")
            commands = [" ".join(i["argv"]) for i in report["plan"] if i.get("argv") and i.get("step") == "S6"]
            self.say("    S6: " + "; ".join(commands))
            self.check(len(commands) == 2 and commands[0] == "apt-get update"
                       and commands[1].endswith("install -y xen-system-amd64"),
                       "--dry plans S6: apt-get update, then apt-get install xen-system-amd64")
            self.check(any("planned again" in n for n in report["notes"]),
                       "--dry says the steps after the install are planned again once it has run")
            self.check(not self.xen_installed(), "--dry installed nothing")
        self.timed("step", "xenrun setup --dry on the machine without Xen", dry)

        # a failure in the middle: Xen gets installed (a run of its own, kept), the
        # rest fails and is rolled back over SSH; the old entry still boots
        def failing_setup():
            self.sh(f"printf '#!/bin/sh\\necho \"e2e: grub-reboot made to fail\" >&2\\nexit 1\\n' > {FAIL_AT};"
                    f" chmod 755 {FAIL_AT}")
            before = self.managed_state()
            fetched = len(self.repo.fetched())
            _, out, err = self.xenrun("setup", "--yes", expect=1)
            self.sh(f"rm -f {FAIL_AT}")
            after = self.managed_state()
            last = (err.strip().splitlines() or [""])[-1]
            self.say(f"    xenrun: {last[:400]}")
            self.say(f"    apt fetched {len(self.repo.fetched()) - fetched} files from the test's repository"
                     f" ({self.repo.fetched_bytes() >> 20} MiB in all)")
            self.check(self.xen_installed(), "S6 installed xen-system-amd64 with apt (from the served repository)")
            self.check("is kept: the next setup goes on from there" in err,
                       "xenrun says the install (a run of its own) is kept")
            self.check("put back" in err, "xenrun says every file the failed run changed was put back")
            changed = sorted({_path_of(line) for line in set(before.splitlines()) ^ set(after.splitlines())})
            by_package = [p for p in changed if "xen" in p or p == "/boot/grub/grub.cfg"]
            self.say(f"    changed by the package (its files, its update-grub): {' '.join(by_package) or 'none'}")
            self.check(changed == by_package, "every other managed file is back byte for byte"
                       f" ({len(before.splitlines())} files and links hashed over SSH)",
                       " ".join(p for p in changed if p not in by_package))
            modified = self.sh("dpkg-query -W -f='${Conffiles}\\n' 'xen*' | awk 'NF >= 2 && $3 != \"obsolete\"'"
                               " | while read -r f sum _; do [ -e \"$f\" ] && echo \"$sum  $f\"; done"
                               " | md5sum -c --quiet 2>&1 || true")
            self.check(not modified.strip(), "the Xen packages' conffiles are as the packages left them", modified)
        self.timed("step", "setup with grub-reboot made to fail (installs Xen, rolls back the rest)", failing_setup)
        # a clean power-off, then on with the disks honouring flushes (for the power cuts)
        self.timed("boot", "boot 2: power off and on after the failed run",
                   lambda: (vm.stop(), vm.power_on(cache="writeback")))
        self.check_linux("boot 2 (after the rolled-back run; the package's update-grub left GRUB's default alone)")
        # instrumentation, not part of the article: xenconsoled keeps each guest's
        # console in /var/log/xen/console (Debian's init script passes XENCONSOLED_ARGS;
        # xenconsoled does not make the folder, and logs nothing without it)
        self.sh("mkdir -p /var/log/xen/console &&"
                " echo 'XENCONSOLED_ARGS=\"--log=guest --log-dir=/var/log/xen/console\"' >> /etc/default/xen")

        # pull the plug at a few points of setup; each time the machine boots again
        before_cuts = self.managed_state()
        cut_states = self.timed("step", "power cuts during setup", lambda: powercut.power_cuts(self))

        # the real setup (it recovers the last cut run first)
        def setup():
            report, _, err = self.xenrun("setup", "--yes", "--format", "json")
            self.show_report(report)
            self.check(report["report"]["status"] == "applied", "setup applied its plan")
            self.check("undoing an interrupted run" in err, "setup first undid the run the power cut interrupted")
            powercut.check_old_or_new(self, before_cuts, cut_states, self.managed_state())
            self.check(not any(i.get("step") == "S6" and i["result"] != "unchanged" for i in report["plan"]),
                       "S6 has nothing to do: the failed run's install was kept")
            self.check_bridge_live()
            env = self.grubenv()
            self.check(bool(env.get("next_entry")), f"Xen is booted once (next_entry={env.get('next_entry')},"
                       f" saved_entry={env.get('saved_entry')})")
        self.timed("step", "xenrun setup", setup)
        self.timed("boot", "boot 3: reboot into Xen (once)", vm.reboot)
        self.timed("step", "check dom0 after boot 3", lambda: self.check_xen("boot 3"))
        entries = dict(self.grub_entries())
        env = self.grubenv()
        saved = env.get("saved_entry", "")
        self.check("xen" not in (entries.get(saved, saved)).lower(),
                   f"GRUB's saved default is still Linux: {entries.get(saved, saved)!r} (S10)")
        # the way back (S10): GRUB used up the once-entry, so the next reboot is Linux
        self.check(not env.get("next_entry"), f"GRUB's once-entry is used up (next_entry={env.get('next_entry')!r})")

        def promote():
            report, _, _ = self.xenrun("promote", "--yes", "--format", "json")
            self.show_report(report)
            self.check(report["report"]["status"] == "applied", "promote applied")
            saved = self.grubenv().get("saved_entry", "")
            self.check("xen" in dict(self.grub_entries()).get(saved, saved).lower(),
                       f"GRUB's saved default is the Xen entry now: {saved}")
        self.timed("step", "xenrun promote", promote)
        self.timed("boot", "boot 4: reboot, Xen by default", vm.reboot)
        self.timed("step", "check dom0 after boot 4", lambda: self.check_xen("boot 4"))
        # the way back after promote: the Linux entry once, by grub-reboot, then Xen by default again
        self.timed("boot", "boot 4b: the plain-Linux entry once (grub-reboot)", lambda: self.boot_once(False))
        self.timed("step", "check plain Linux after promote", lambda: self.check_plain_linux("boot 4b"))
        self.timed("boot", "boot 4c: reboot, Xen by default again", vm.reboot)
        self.timed("step", "check dom0 after boot 4c", lambda: self.check_xen("boot 4c"))

        self.timed("step", "guests: prepare (their kernel and initramfs, a volume group on /dev/vdb)",
                   self.prepare_guests)
        for name in GUESTS:
            self.timed("step", f"guest {name}: xenrun domain.create, its console", lambda n=name: self.create_guest(n))
        self.check_running(list(GUESTS))
        self.timed("step", f"guest {GUEST_IMAGE}: xenrun domain.shutdown", lambda: self.stop_guest(GUEST_IMAGE, "shutdown"))
        self.timed("step", f"guest {GUEST_LVM}: xenrun domain.destroy", lambda: self.stop_guest(GUEST_LVM, "destroy"))

        def again():
            report, _, _ = self.xenrun("setup", "--yes", "--format", "json")
            changed = [i for i in report["plan"] if i["result"] not in ("unchanged",)]
            self.check(report["report"]["status"] == "nothing to do" and report["summary"]["changed"] == 0,
                       f"a second setup reports nothing to do ({report['summary']['unchanged']} unchanged)",
                       json.dumps(changed, indent=1)[:3000])
        self.timed("step", "xenrun setup again", again)


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where logs and the VM's overlay go (default: a new folder"
                        " under the e2e cache)")
    parser.add_argument("--networkd", action="store_true", help="the second scenario: the same machine with"
                        " systemd-networkd in charge (tests/e2e/networkd.py)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else \
        image_mod.cache_root() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    if args.networkd:
        from e2e.networkd import NetworkdScenario
        scenario = NetworkdScenario(workdir)
    else:
        scenario = Scenario(workdir)
    try:
        scenario.run()
    except ScenarioError as e:
        print(f"e2e: FAILED: {e}", file=sys.stderr)
        return 1
    except VMError as e:
        print(f"e2e: the machine failed: {e}", file=sys.stderr)
        return 1
    print(f"e2e: passed; logs in {workdir}")
    return 0
