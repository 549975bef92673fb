"""The xen plugin (S6, S12, S13, S14, S27) and the interactive prompt."""

from __future__ import annotations

import os
import pty
import select
import shutil
import sys
import time

from conftest import run_xenrun
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
    assert changes[0] == RunCommand(("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y",
                                     "xen-system-amd64"), creates="/usr/sbin/xl", step="S6",
                                    why="install Xen (xen-system-amd64)", plugin="xen")
    assert [c.argv for c in changes if isinstance(c, RunCommand)][1:] == [
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


def _talk(argv, answer: bytes, timeout=60) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal, answer its question, return (exit, screen)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(argv[0], argv)
    screen, answered, deadline = b"", False, time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
            if not answered and b"[y/N]" in screen:
                os.write(fd, answer)
                answered = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


def test_on_a_terminal_setup_shows_the_plan_and_asks(site):
    argv = [sys.executable, "-m", "xenrun", "setup", "--config", str(site / "plugins.toml"), "--host",
            "arch-syslinux", "--files-only"]
    fstab = site / "hosts/arch-syslinux/etc/fstab"
    before = fstab.read_bytes()
    code, screen = _talk(argv, b"n\n")
    assert code == 0 and "+none /proc/xen xenfs defaults,nofail 0 0" in screen and "to arch-syslinux? [y/N]" in screen
    assert fstab.read_bytes() == before and "Not applied" in screen
    code, screen = _talk(argv, b"y\n")
    assert code == 0 and "Applied:" in screen
    assert b"/proc/xen xenfs" in fstab.read_bytes()


def test_xen_version_from_the_names_packages_leave():
    from xenrun.plugins.xen import xen_version
    # Debian 12's xen-hypervisor-4.17-amd64 and /usr/lib/xen-4.17; Arch's xen package
    assert xen_version(["vmlinuz-6.1.0-13-amd64", "xen-4.17-amd64.gz", "xen-4.17-amd64.efi",
                        "xen-4.17-amd64.config", "xen-4.17"]) == "4.17"
    assert xen_version(["xen-4.9.2.gz", "xen-4.17.3.gz", "xen.gz", "xen-4.gz"]) == "4.17.3"
    assert xen_version(["vmlinuz-linux", "grub"]) is None
