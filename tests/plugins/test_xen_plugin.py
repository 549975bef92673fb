"""The xen plugin (S6, S12, S13, S14, S27) and the interactive prompt."""

from __future__ import annotations

import os
import shutil

import pytest
import sys

from support.helpers import run_xenrun, talk

from xenrun.changes import EnsureLine, RemoveFile, RunCommand, Symlink
from xenrun.testing import changes_for


def _xen(site, host):
    facts, changes = changes_for(site / "plugins.toml", host)
    return [c for c in changes if c.plugin == "xen"]


def test_arch_golden_with_xen_installed(site):
    assert _xen(site, "arch-grub") == [
        *[Symlink(f"/etc/systemd/system/multi-user.target.wants/{u}", f"/usr/lib/systemd/system/{u}", step="S12",
                  why=f"enable {u}", plugin="xen")
          for u in ("xenstored.service", "xenconsoled.service", "xendomains.service")],
        EnsureLine("/etc/fstab", "none /proc/xen xenfs defaults,nofail 0 0", replace=r"^\s*\S+\s+/proc/xen\s", step="S13",
                   why="mount xenfs on /proc/xen", plugin="xen"),
        EnsureLine("/etc/xen/xl.conf", 'autoballoon="off"', replace=r"^\s*#?\s*autoballoon\s*=", step="S14",
                   why="dom0_mem is fixed: xl must not balloon dom0", plugin="xen"),
        RemoveFile("/etc/udev/rules.d/xend.rules", step="S27", why="xend is gone; its udev rule makes errors",
                   plugin="xen"),
    ]


def test_debian_installs_with_apt_and_enables_with_systemctl(site):
    root = site / "hosts/debian-grub"
    status = root / "var/lib/dpkg/status"
    status.write_text(status.read_text().replace("Package: xen-system-amd64\nStatus: install ok installed",
                                                 "Package: xen-system-amd64\nStatus: deinstall ok config-files"))
    changes = _xen(site, "debian-grub")
    assert changes[:2] == [
        RunCommand(("apt-get", "update"), creates="/usr/sbin/xl", step="S6",
                   why="fetch the package lists before installing Xen", plugin="xen"),
        RunCommand(("env", "DEBIAN_FRONTEND=noninteractive", "XEN_OVERRIDE_GRUB_DEFAULT=0",
                             "apt-get", "-o", "Dpkg::Options::=--force-confdef",
                    "-o", "Dpkg::Options::=--force-confold", "install", "-y", "xen-system-amd64"),
                   creates="/usr/sbin/xl", replan=True, step="S6", why="install Xen (xen-system-amd64)", plugin="xen")]
    assert [c.argv for c in changes if isinstance(c, RunCommand)][2:] == [
        ("systemctl", "enable", "xen.service"), ("systemctl", "enable", "xendomains.service")]


def test_arch_without_xen_and_without_an_aur_helper_says_what_to_do(site):
    shutil.rmtree(site / "hosts/arch-grub/var/lib/pacman/local/xen-4.5.0-2")
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry", "--files-only")
    assert r.returncode == 2
    assert "Xen is not installed and comes from the AUR, but no AUR helper (paru or yay)" in r.stderr
    assert "multilib" in r.stderr


def test_arch_with_an_aur_helper_needs_a_user_and_builds_as_that_user(site):
    root = site / "hosts/arch-grub"
    shutil.rmtree(root / "var/lib/pacman/local/xen-4.5.0-2")
    (root / "usr/bin/yay").write_bytes(b"placeholder\n")
    (root / "usr/bin/yay").chmod(0o755)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry", "--files-only")
    assert r.returncode == 2 and "plugin.xen.aur_user: needed on arch-grub: yay builds AUR packages" in r.stderr
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text().replace(
        '[plugin.xen]', '[plugin.xen]\naur_user = "builder"'))
    changes = _xen(site, "arch-grub")
    assert changes[0].argv == ("runuser", "-u", "builder", "--", "yay", "-S", "--needed", "--noconfirm", "xen")
    assert changes[0].creates == "/usr/bin/xl"


def test_install_false_with_xen_missing_is_refused(site):
    shutil.rmtree(site / "hosts/arch-grub/var/lib/pacman/local/xen-4.5.0-2")
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text().replace('[plugin.xen]', '[plugin.xen]\ninstall = false'))
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry", "--files-only")
    assert r.returncode == 2 and "install = false" in r.stderr


def test_existing_xenfs_line_is_replaced_not_duplicated(site):
    fstab = site / "hosts/arch-syslinux/etc/fstab"
    fstab.write_text(fstab.read_text() + "xenfs /proc/xen xenfs rw 0 0\n")
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-syslinux", "--yes", "--files-only")
    assert r.returncode == 0, r.stderr
    lines = [line for line in fstab.read_text().splitlines() if "/proc/xen" in line]
    assert lines == ["none /proc/xen xenfs defaults,nofail 0 0"]


def test_stale_xend_rule_is_removed_and_comes_back_on_rollback(site):
    rule = site / "hosts/arch-syslinux/etc/udev/rules.d/xend.rules"
    rule.parent.mkdir(parents=True)
    rule.write_text('SUBSYSTEM=="xen-backend", RUN+="socket:/org/xen/xend/udev_event"\n')
    assert run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-syslinux", "--yes",
                      "--files-only").returncode == 0
    assert not rule.exists()
    assert run_xenrun("rollback", "--config", site / "plugins.toml", "--host", "arch-syslinux", "--yes").returncode == 0
    assert rule.read_text().startswith('SUBSYSTEM=="xen-backend"')


def test_on_a_terminal_setup_shows_the_plan_and_asks(site):
    argv = [sys.executable, "-m", "xenrun", "setup", "--config", str(site / "plugins.toml"), "--host",
            "arch-syslinux", "--files-only"]
    fstab = site / "hosts/arch-syslinux/etc/fstab"
    before = fstab.read_bytes()
    code, screen = talk(argv, b"n\n")
    assert code == 0 and "+none /proc/xen xenfs defaults,nofail 0 0" in screen and "to arch-syslinux? [y/N]" in screen
    assert fstab.read_bytes() == before and "Not applied" in screen
    code, screen = talk(argv, b"y\n")
    assert code == 0 and "Applied:" in screen
    assert b"/proc/xen xenfs" in fstab.read_bytes()


def test_xen_version_from_the_names_packages_leave():
    from xenrun.plugins.xen import xen_version
    # Debian 12's xen-hypervisor-4.17-amd64 and /usr/lib/xen-4.17; Arch's xen package
    assert xen_version(["vmlinuz-6.1.0-13-amd64", "xen-4.17-amd64.gz", "xen-4.17-amd64.efi",
                        "xen-4.17-amd64.config", "xen-4.17"]) == "4.17"
    assert xen_version(["xen-4.9.2.gz", "xen-4.17.3.gz", "xen.gz", "xen-4.gz"]) == "4.17.3"
    assert xen_version(["vmlinuz-linux", "grub"]) is None


# the dom0 helper units as upstream Xen's tools/hotplug/Linux/systemd installs them
XEN_INIT_DOM0 = """[Unit]
Description=xen-init-dom0, initialise Dom0 configuration (xenstore nodes, JSON configuration stub)
Requires=xenstored.service proc-xen.mount
After=xenstored.service proc-xen.mount
ConditionPathExists=/proc/xen/capabilities

[Service]
Type=oneshot
RemainAfterExit=true
ExecStartPre=/bin/grep -q control_d /proc/xen/capabilities
ExecStart=/usr/lib/xen/bin/xen-init-dom0 $XEN_DOM0_UUID

[Install]
WantedBy=multi-user.target
"""
DISK_BACKEND = """[Unit]
Description=qemu for xen dom0 disk backend
Requires=proc-xen.mount xenstored.service
After=xenstored.service xenconsoled.service
Before=xendomains.service libvirtd.service libvirt-guests.service

[Service]
Type=simple
ExecStart=/usr/lib/xen/bin/qemu-system-i386 -xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv -daemonize

[Install]
WantedBy=multi-user.target
"""


def _enabled(changes) -> list[str]:
    return [c.why.removeprefix("enable ") for c in changes if c.why.startswith("enable ")]


def test_arch_dom0_helper_units_are_enabled_where_the_package_ships_them(site):
    units = site / "hosts/arch-grub/usr/lib/systemd/system"
    # the example's package ships neither (the golden plan above has none)
    assert _enabled(_xen(site, "arch-grub")) == ["xenstored.service", "xenconsoled.service", "xendomains.service"]
    (units / "xen-init-dom0.service").write_text(XEN_INIT_DOM0)
    changes = _xen(site, "arch-grub")
    assert _enabled(changes) == ["xenstored.service", "xenconsoled.service", "xendomains.service",
                                 "xen-init-dom0.service"]
    assert Symlink("/etc/systemd/system/multi-user.target.wants/xen-init-dom0.service",
                   "/usr/lib/systemd/system/xen-init-dom0.service", step="S12", why="enable xen-init-dom0.service",
                   plugin="xen") in changes
    (units / "xen-qemu-dom0-disk-backend.service").write_text(DISK_BACKEND)
    assert _enabled(_xen(site, "arch-grub"))[3:] == ["xen-init-dom0.service", "xen-qemu-dom0-disk-backend.service"]


def test_dom0_helper_units_applied_enabled_and_a_second_plan_is_empty(site):
    from xenrun.testing import plan_host
    units = site / "hosts/arch-grub/usr/lib/systemd/system"
    (units / "xen-init-dom0.service").write_text(XEN_INIT_DOM0)
    (units / "xen-qemu-dom0-disk-backend.service").write_text(DISK_BACKEND)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes", "--files-only")
    assert r.returncode == 0, r.stderr
    wants = site / "hosts/arch-grub/etc/systemd/system/multi-user.target.wants"
    for unit in ("xen-init-dom0.service", "xen-qemu-dom0-disk-backend.service"):
        assert os.readlink(wants / unit) == f"/usr/lib/systemd/system/{unit}"
    facts, outcomes = plan_host(site / "plugins.toml", "arch-grub")
    assert [o for o in outcomes if o.action == "change" and o.change.plugin == "xen"] == []


def test_under_xen_the_shipped_helper_units_are_started_too():
    from xenrun.api import Facts, profile_for
    from xenrun.plugins import xen
    units = {u: {"path": f"/usr/lib/systemd/system/{u}", "wanted_by": ["multi-user.target"]}
             for u in ("xenstored.service", "xenconsoled.service", "xendomains.service", "xen-init-dom0.service")}
    facts = Facts({"distro": {"id": "arch"}, "xen_units": units, "packages": {"xen": "4.17.3-1"},
                   "xen_running": True, "live": True})
    started = [c.argv[2] for c in xen._services(facts, profile_for(facts)) if isinstance(c, RunCommand)]
    assert started == ["xenstored.service", "xenconsoled.service", "xendomains.service", "xen-init-dom0.service"]


def test_debian_never_plans_the_arch_helper_units(site):
    units = site / "hosts/debian-grub/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    (units / "xen-init-dom0.service").write_text(XEN_INIT_DOM0)
    assert _enabled(_xen(site, "debian-grub")) == ["xen.service", "xendomains.service"]


def test_arch_installing_xen_notes_the_helper_units_for_the_next_setup(site):
    root = site / "hosts/arch-grub"
    shutil.rmtree(root / "var/lib/pacman/local/xen-4.5.0-2")
    (root / "usr/bin/yay").write_bytes(b"placeholder\n")
    (root / "usr/bin/yay").chmod(0o755)
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text().replace(
        '[plugin.xen]', '[plugin.xen]\naur_user = "builder"'))
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry", "--files-only")
    assert r.returncode == 0, r.stderr
    assert ("xen-init-dom0.service and xen-qemu-dom0-disk-backend.service: enabled once xen is installed, if it"
            " ships them (the plan is made again after the install)") in r.stdout + r.stderr


# the lines of Debian 12's /etc/init.d/xen (xen-utils-common) that matter here
DEBIAN_XEN_INIT = """#!/bin/sh
case "$(cat /sys/hypervisor/type 2>/dev/null)" in
xen)		;;
*)	exit 0	;; # not running under Xen
esac
xenfs_setup()
{
	[ -d "/proc/xen" ] || return 1
	mount -t xenfs xenfs /proc/xen || return 1
}
"""
# upstream Xen's tools/hotplug/Linux/systemd/proc-xen.mount
PROC_XEN_MOUNT = """[Unit]
Description=Mount /proc/xen files
ConditionPathExists=/proc/xen
RefuseManualStop=true

[Mount]
What=xenfs
Where=/proc/xen
Type=xenfs
"""


@pytest.mark.parametrize("host, path, text", [
    ("debian-grub", "etc/init.d/xen", DEBIAN_XEN_INIT),
    ("arch-grub", "usr/lib/systemd/system/proc-xen.mount", PROC_XEN_MOUNT),
])
def test_no_fstab_line_where_the_package_mounts_xenfs_only_under_xen(site, host, path, text):
    """Under the kept plain-Linux entry there is no /proc/xen: an fstab line would
    leave a failed mount unit there, and the package mounts xenfs itself."""
    assert any(c.path == "/etc/fstab" for c in _xen(site, host) if hasattr(c, "path"))  # before: nothing of the package mounts it
    (site / "hosts" / host / path).parent.mkdir(parents=True, exist_ok=True)
    (site / "hosts" / host / path).write_text(text)
    assert not any(getattr(c, "path", None) == "/etc/fstab" for c in _xen(site, host))
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", host, "--dry", "--files-only")
    assert r.returncode == 0, r.stderr
    assert f"S13: /{path} (from the Xen package) mounts xenfs on /proc/xen, only under Xen" in r.stdout
