"""What the grub, syslinux and efistub plugins produce for the example hosts,
booted for real by `xenrun boot-check` under QEMU with Debian 12's Xen 4.17 and a
dom0 kernel, and a busybox initramfs that reports /sys/hypervisor/type. Each path
passes only when dom0 says "xen"; the same test with a broken configuration must
fail; GRUB falls back to the old Linux entry when Xen cannot load."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from support import xenpkgs
from support.boot_sites import real_arch as _real_arch
from support.boot_sites import real_debian_grub as _real_debian_grub
from support.helpers import run_xenrun
from xenrun import bootcheck

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="session")
def debian(tmp_path_factory) -> dict:
    if shutil.which(bootcheck.QEMU) is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    pkgs = xenpkgs.fetch()
    pkgs["initrd"] = xenpkgs.make_busybox_initramfs(tmp_path_factory.mktemp("initramfs") / "initrd.gz")
    return pkgs


def boot_check(site, host, *extra):
    r = run_xenrun("boot-check", "--config", site / "plugins.toml", "--host", host, "--until", "userspace",
                   "--format", "json", *extra, timeout=400)
    assert r.stdout, r.stderr
    return r, json.loads(r.stdout)


def test_grub_generated_entry_boots_xen_and_dom0(site, debian):
    root = _real_debian_grub(site, debian)
    cfg = (root / "boot/grub/grub.cfg").read_text()
    assert "dom0_mem=512M,max:512M dom0_max_vcpus=2 dom0_vcpus_pin" in cfg  # the settings reached the entry
    r, out = boot_check(site, "debian-grub")
    assert r.returncode == 0 and out["ok"], out["reason"] + out["log"][-3000:]
    assert out["kind"] == "grub" and "hypervisor=xen" in out["stages"]


def test_grub_falls_back_to_the_old_entry_when_xen_cannot_load(site, debian):
    root = _real_debian_grub(site, debian)
    (root / "boot/xen-4.17-amd64.gz").write_bytes(b"not a multiboot image\n" * 100)
    r, out = boot_check(site, "debian-grub")
    assert r.returncode == 1 and not out["ok"]
    assert "xen started" not in out["stages"]
    assert "Falling back to `Linux (the old entry)'" in out["log"], out["log"][-3000:]
    # the old entry's Linux ran its initramfs, without Xen under it
    assert re.search(r"^XENRUN-HYPERVISOR-TYPE=\s*$", out["log"], re.M), out["log"][-3000:]


@pytest.mark.parametrize("broken", [False, True], ids=["as-planned", "broken-kernel"])
@pytest.mark.parametrize("host,efi", [("arch-syslinux", False), ("arch-uefi", True)], ids=["syslinux", "uefi"])
def test_planned_entry_boots_xen_and_dom0(site, debian, host, efi, broken):
    root = _real_arch(site, host, debian, efi)
    if host == "arch-syslinux":
        assert "APPEND ../xen-4.5.0.gz dom0_mem=512M" in (root / "boot/syslinux/syslinux.cfg").read_text()
    else:
        assert (root / "boot/xen.efi").read_bytes() == debian["xen_efi"].read_bytes()
        assert "options=dom0_mem=1G,max:1G" in (root / "boot/xen.cfg").read_text()
    if broken:  # a kernel Xen cannot build dom0 from: the check must fail
        (root / "boot/vmlinuz-linux").write_bytes(os.urandom(4096))
    r, out = boot_check(site, host)
    if broken:
        assert r.returncode == 1 and not out["ok"] and "hypervisor=xen" not in out["stages"]
        assert out["reason"]
    else:
        assert r.returncode == 0 and out["ok"], out["reason"] + out["log"][-3000:]
        assert out["kind"] == ("uefi" if efi else "syslinux")
        assert {"xen started", "dom0 kernel", "hypervisor=xen"} <= set(out["stages"])


def test_boot_check_refuses_bad_input_before_booting(site):
    r = run_xenrun("boot-check", "--config", site / "plugins.toml", "--host", "arch-grub", "--until", "forever")
    assert r.returncode == 2 and "--until: 'forever' is not one of: kernel, userspace" in r.stderr
    text = (site / "plugins.toml").read_text().replace('boot = "efistub"', 'boot = "none"')
    (site / "plugins.toml").write_text(text)
    r = run_xenrun("boot-check", "--config", site / "plugins.toml", "--host", "arch-uefi")
    assert r.returncode == 2 and "boot-check needs a boot plugin" in r.stderr
    (site / "hosts/arch-syslinux/boot/initramfs-linux.img").unlink()
    r = run_xenrun("boot-check", "--config", site / "plugins.toml", "--host", "arch-syslinux")
    assert r.returncode == 2 and "/boot/initramfs-linux.img" in r.stderr and "does not exist" in r.stderr


def test_a_toy_boot_plugin_from_a_package_is_driven_by_boot_check(site, debian, toy_boot_plugin, monkeypatch):
    """tests/plugin_toyboot: one file, a boot loader the core has never heard of
    (ISOLINUX from an ISO), with its own entry, Loader and image builder."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(toy_boot_plugin), os.environ.get("PYTHONPATH")])))
    text = (site / "plugins.toml").read_text()
    (site / "plugins.toml").write_text(text.replace('root = "hosts/arch-syslinux"\nboot = "syslinux"',
                                                    'root = "hosts/arch-syslinux"\nboot = "isolinux"'))
    assert 'boot = "isolinux"' in (site / "plugins.toml").read_text()
    _real_arch(site, "arch-syslinux", debian)
    r, out = boot_check(site, "arch-syslinux")
    assert r.returncode == 0 and out["ok"], out["reason"] + out["log"][-3000:]
    assert out["kind"] == "isolinux" and {"xen started", "dom0 kernel", "hypervisor=xen"} <= set(out["stages"])
    # a kernel Xen cannot run: the same toy fails the check
    (site / "hosts/arch-syslinux/boot/vmlinuz-linux").write_bytes(os.urandom(4096))
    r, out = boot_check(site, "arch-syslinux")
    assert r.returncode == 1 and not out["ok"] and "hypervisor=xen" not in out["stages"]
