"""Xen installed by setup, then the rest planned again (issue 13.3): on a Debian
root without Xen, S6 runs ``apt-get update`` and the install for real (a stand-in
apt-get inside the root, run with chroot, that unpacks the package's files as
dpkg would), the run commits there, and the steps that follow are planned from
the files the package brought: its /etc/default/grub.d/xen.cfg is edited, not
written from nothing over the package's conffile."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest

from support.helpers import add_busybox, run_xenrun, talk, tree_hash

HOST = "debian-grub"
# what the package brings, taken out of the example root (which has Xen installed);
# /etc/grub.d/20_linux_xen stays: Debian ships it with grub-common
PACKAGE_FILES = ("etc/default/grub.d/xen.cfg", "etc/init.d/xen", "etc/init.d/xendomains",
                 "boot/xen-4.17-amd64.gz", "boot/xen-4.17-amd64.efi", "usr/sbin/xl")
APT_GET = """#!/bin/sh
# stand-in apt-get: records its words; "install" unpacks the package kept in /pkg
echo "apt-get $*" >> /apt.log
case " $* " in
*" update "*) mkdir -p /var/lib/apt/lists && touch /var/lib/apt/lists/fetched ;;
*" install "*) echo "the package's update-grub sees XEN_OVERRIDE_GRUB_DEFAULT=${XEN_OVERRIDE_GRUB_DEFAULT:-}" >> /apt.log
  cp -a /pkg/files/. / && cat /pkg/status >> /var/lib/dpkg/status ;;
*) exit 100 ;;
esac
"""
# records the commands that change something; a query (systemctl is-enabled, a
# plan's guard) answers "no" and records nothing, so --dry leaves the tree as it was
RECORDER = '#!/bin/sh\ncase "$1" in is-*) exit 1 ;; esac\necho "$0 $*" >> /calls.log\n'
# systemctl: remembers what it enabled, and answers is-enabled from that
SYSTEMCTL = """#!/bin/sh
case "$1" in
enable) echo "systemctl $*" >> /calls.log; touch "/enabled-$2" ;;
is-enabled) [ -e "/enabled-$3" ] ;;
*) exit 1 ;;
esac
"""
# update-grub: what grub-mkconfig makes of a machine with Xen (the grub plugin's
# helper looks for a Linux and a Xen entry)
UPDATE_GRUB = RECORDER + """cat > /boot/grub/grub.cfg <<'EOF'
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-e2e' {
}
menuentry 'Debian GNU/Linux, with Xen hypervisor' --class xen $menuentry_id_option 'xen-gnulinux-simple-e2e' {
}
EOF
"""


def _without_xen(root: Path) -> str:
    """Take Xen out of the root as if it had never been installed; the package's
    files go to /pkg for the stand-in apt-get. Returns the package's xen.cfg."""
    pkg = root / "pkg/files"
    for rel in PACKAGE_FILES:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / rel, pkg / rel)
    status = (root / "var/lib/dpkg/status").read_text()
    paragraphs = status.strip("\n").split("\n\n")
    xen = [p for p in paragraphs if p.startswith("Package: xen")]
    assert xen, "the example root lists no Xen package"
    (root / "var/lib/dpkg/status").write_text("\n\n".join(p for p in paragraphs if p not in xen) + "\n\n")
    (root / "pkg/status").write_text("\n\n".join(xen) + "\n\n")
    add_busybox(root, "sh", "env", "cp", "cat", "touch", "mkdir", "echo", "awk", "grep")
    (root / "dev").mkdir(exist_ok=True)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "usr/bin/apt-get").write_text(APT_GET)
    for program in ("usr/sbin/grub-reboot", "usr/sbin/grub-set-default", "usr/bin/grub-editenv",
                    "usr/sbin/grub-mkconfig", "usr/bin/systemctl", "usr/sbin/update-grub"):
        (root / program).write_text({"update-grub": UPDATE_GRUB, "systemctl": SYSTEMCTL}.get(Path(program).name,
                                                                                             RECORDER))
        (root / program).chmod(0o755)
    return (pkg / "etc/default/grub.d/xen.cfg").read_text()


def _setup(site, *extra):
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", HOST, "--format", "json", *extra)
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


@pytest.fixture
def bare(site):
    root = site / "hosts" / HOST
    return root, _without_xen(root)


def test_dry_plans_the_install_first_and_says_the_rest_is_planned_again(site, bare):
    root, _ = bare
    before = tree_hash(site)
    r, plan = _setup(site, "--dry")
    assert r.returncode == 0, r.stderr
    assert tree_hash(site) == before
    commands = [p["argv"] for p in plan["plan"] if p.get("argv")]
    assert commands[:2] == [["apt-get", "update"],
                            ["env", "DEBIAN_FRONTEND=noninteractive", "XEN_OVERRIDE_GRUB_DEFAULT=0",
                             "apt-get", "-o", "Dpkg::Options::=--force-confdef",
                             "-o", "Dpkg::Options::=--force-confold", "install", "-y", "xen-system-amd64"]]
    assert any("what follows it is planned again from what it installed" in n for n in plan["notes"]), plan["notes"]


def test_setup_installs_then_edits_the_packages_own_files(site, bare):
    root, package_cfg = bare
    r, report = _setup(site, "--yes")
    assert r.returncode == 0, r.stderr
    assert report["report"]["status"] == "applied"
    log = (root / "apt.log").read_text().splitlines()
    assert log == ["apt-get update", "apt-get -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
                   " install -y xen-system-amd64", "the package's update-grub sees XEN_OVERRIDE_GRUB_DEFAULT=0"]
    # the package's conffile, edited in place: its comments and its own `if` block stay
    cfg = (root / "etc/default/grub.d/xen.cfg").read_text()
    assert "Including Xen overrides from /etc/default/grub.d/xen.cfg" in cfg
    assert '\tXEN_OVERRIDE_GRUB_DEFAULT=1\n' in cfg  # the assignment inside the package's if block
    assert re.search(r"^XEN_OVERRIDE_GRUB_DEFAULT=0$", cfg, re.MULTILINE), cfg[-800:]
    assert re.search(r'^GRUB_CMDLINE_XEN_DEFAULT=".*dom0_mem=', cfg, re.MULTILINE), cfg[-800:]
    assert len(cfg) > len(package_cfg)
    assert any("was planned again from what it installed" in n for n in report["notes"]), report["notes"]
    # two runs: the install, then the rest
    runs = sorted((root / "var/lib/xenrun/runs").iterdir())
    assert len(runs) == 2
    first = [json.loads(line) for line in (runs[0] / "journal").read_text().splitlines()]
    assert first[-1]["op"] == "commit"
    assert [p["step"] for p in report["plan"] if p.get("argv")][:2] == ["S6", "S6"]
    # grub.cfg regenerated after the package's files were there (update-grub ran in the second run)
    assert "update-grub" in (root / "calls.log").read_text()
    r, again = _setup(site, "--dry")
    assert r.returncode == 0, r.stderr
    assert again["summary"]["changed"] == 0, [p for p in again["plan"] if p["result"] != "unchanged"]


def test_rollback_takes_back_the_edits_first_then_the_install_run(site, bare):
    root, package_cfg = bare
    r, _ = _setup(site, "--yes")
    assert r.returncode == 0, r.stderr
    r = run_xenrun("rollback", "--config", site / "plugins.toml", "--host", HOST, "--yes")
    assert r.returncode == 0, r.stderr
    assert (root / "etc/default/grub.d/xen.cfg").read_text() == package_cfg  # the package's file, as it came
    r = run_xenrun("rollback", "--config", site / "plugins.toml", "--host", HOST, "--yes", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert "rolling back run" in r.stdout


def test_a_failure_after_the_install_keeps_the_install_and_puts_back_the_rest(site, bare):
    root, package_cfg = bare
    (root / "usr/sbin/grub-reboot").write_text("#!/bin/sh\necho 'grub-reboot made to fail' >&2\nexit 1\n")
    r, _ = _setup(site, "--yes")
    assert r.returncode == 1, r.stderr
    assert "put back" in r.stderr and "is kept: the next setup goes on from there" in r.stderr, r.stderr
    assert (root / "usr/sbin/xl").exists()
    assert (root / "etc/default/grub.d/xen.cfg").read_text() == package_cfg
    (root / "usr/sbin/grub-reboot").write_text(RECORDER)
    r, report = _setup(site, "--yes")
    assert r.returncode == 0, r.stderr
    assert (root / "apt.log").read_text().count("install") == 1  # not installed twice
    assert report["report"]["status"] == "applied"


def test_on_a_terminal_the_plan_made_again_is_shown_and_asked_for_again(site, bare):
    """Yes to the first plan, no to the second: Xen is installed, nothing else."""
    root, package_cfg = bare
    argv = [sys.executable, "-m", "xenrun", "setup", "--config", str(site / "plugins.toml"), "--host", HOST]
    code, screen = talk(argv, b"y\n", b"n\n")
    assert code == 0, screen
    assert screen.count("[y/N]") == 2, screen
    assert "was planned again from what it installed" in screen
    assert "the rest of the plan was not applied" in screen
    assert "install -y xen-system-amd64" in (root / "apt.log").read_text()
    assert (root / "etc/default/grub.d/xen.cfg").read_text() == package_cfg
