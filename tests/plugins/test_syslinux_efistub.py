"""The syslinux and efistub plugins (S8, S9, S10, S14): exact plans on the example
hosts, the article's entry shapes, idempotency, clear errors, and the efi-xen
helper script's reading of efibootmgr output."""

from __future__ import annotations

import os
import subprocess
import textwrap


from support.helpers import run_xenrun
from xenrun.changes import CopyFile, RunCommand, WriteFile
from xenrun.plugins import efistub, syslinux
from xenrun.testing import apply_host, changes_for, plan_host

XEN = "dom0_mem=512M,max:512M dom0_max_vcpus=2 dom0_vcpus_pin"


def _of(site, host, plugin):
    facts, changes = changes_for(site / "plugins.toml", host)
    return facts, [c for c in changes if c.plugin == plugin]


def test_parse_syslinux_reads_the_default_entry():
    parsed = syslinux.parse_syslinux(textwrap.dedent("""\
        DEFAULT arch
        LABEL arch
            MENU LABEL Arch Linux
            LINUX ../vmlinuz-linux
            APPEND root=/dev/sda2 rw
            INITRD ../intel-ucode.img,../initramfs-linux.img
        label other
            kernel ../other
    """))
    assert parsed["default"] == "arch"
    assert parsed["labels"]["arch"] == {"menu_label": "Arch Linux", "linux": "../vmlinuz-linux",
                                        "append": "root=/dev/sda2 rw",
                                        "initrd": "../intel-ucode.img,../initramfs-linux.img"}
    assert parsed["labels"]["other"] == {"linux": "../other"}


def test_syslinux_golden(site):
    facts, changes = _of(site, "arch-syslinux", "syslinux")
    block = ("# BEGIN xenrun: Xen entry (S8)\nLABEL xen\n    MENU LABEL Xen\n    KERNEL mboot.c32\n"
             f"    APPEND ../xen-4.5.0.gz {XEN} --- ../vmlinuz-linux root=/dev/sda2 rw --- ../initramfs-linux.img\n"
             "# END xenrun\n")
    old = (site / "hosts/arch-syslinux/boot/syslinux/syslinux.cfg").read_text()
    assert changes == [
        CopyFile("/usr/lib/syslinux/bios/mboot.c32", "/boot/syslinux/mboot.c32", step="S8",
                 why="mboot.c32 beside syslinux.cfg", plugin="syslinux"),
        CopyFile("/usr/lib/syslinux/bios/libcom32.c32", "/boot/syslinux/libcom32.c32", step="S8",
                 why="libcom32.c32 beside syslinux.cfg (needed by mboot.c32 on Syslinux 6)", plugin="syslinux"),
        WriteFile("/boot/syslinux/syslinux.cfg", old + "\n" + block, step="S8",
                  why="the Xen entry; the existing entries and DEFAULT stay", plugin="syslinux"),
        RunCommand(("extlinux", "--once=xen", "/boot/syslinux"), onchange=("/boot/syslinux/syslinux.cfg",),
                   step="S10", why="boot Xen at the next boot only", plugin="syslinux"),
    ]


def test_syslinux_apply_is_idempotent_and_keeps_the_old_entries(site):
    apply_host(site / "plugins.toml", "arch-syslinux")
    cfg = (site / "hosts/arch-syslinux/boot/syslinux/syslinux.cfg").read_text()
    parsed = syslinux.parse_syslinux(cfg)
    assert parsed["default"] == "arch" and {"arch", "archfallback", "hdt", "reboot", "xen"} <= set(parsed["labels"])
    assert parsed["labels"]["xen"]["linux"] == "mboot.c32"
    assert (site / "hosts/arch-syslinux/boot/syslinux/mboot.c32").read_bytes() == \
        (site / "hosts/arch-syslinux/usr/lib/syslinux/bios/mboot.c32").read_bytes()
    _, outcomes = plan_host(site / "plugins.toml", "arch-syslinux")
    assert [o for o in outcomes if o.action == "change"] == []
    # new settings replace xenrun's block instead of adding a second one
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text().replace('dom0_mem = "512M"', 'dom0_mem = "768M"'))
    apply_host(site / "plugins.toml", "arch-syslinux")
    cfg = (site / "hosts/arch-syslinux/boot/syslinux/syslinux.cfg").read_text()
    assert cfg.count("LABEL xen") == 1 and "dom0_mem=768M,max:768M" in cfg


def test_syslinux_refuses_a_label_it_did_not_write(site):
    cfg = site / "hosts/arch-syslinux/boot/syslinux/syslinux.cfg"
    cfg.write_text(cfg.read_text() + "\nLABEL xen\n    KERNEL something-else\n")
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-syslinux", "--dry", "--files-only")
    assert r.returncode == 2 and "already has a LABEL xen that xenrun did not write" in r.stderr


def test_syslinux_promote_changes_only_the_default(site):
    r = run_xenrun("promote", "--config", site / "plugins.toml", "--host", "arch-syslinux", "--dry", "--files-only")
    assert r.returncode == 0, r.stderr
    assert "-DEFAULT arch\n    +DEFAULT xen" in r.stdout.replace("\n    ", "\n    ")


def test_promote_refuses_a_host_not_running_xen(site):
    r = run_xenrun("promote", "--config", site / "plugins.toml", "--host", "arch-syslinux", "--yes", "--files-only")
    assert r.returncode == 2 and "not running as Xen's Domain-0" in r.stderr


def test_efistub_golden(site):
    facts, changes = _of(site, "arch-uefi", "efistub")
    cfg = ("[global]\ndefault=xen\n\n[xen]\noptions=dom0_mem=1G,max:1G dom0_max_vcpus=2 dom0_vcpus_pin\n"
           "kernel=vmlinuz-linux root=UUID=5c1f3b4a-8e3d-4c7e-9d51-0c2b8a7e6f10 rw\nramdisk=initramfs-linux.img\n")
    assert changes == [
        CopyFile("/usr/lib/efi/xen-4.5.0.efi", "/boot/xen.efi", step="S9", why="the Xen EFI binary on the ESP",
                 plugin="efistub"),
        WriteFile("/boot/xen.cfg", cfg, step="S9", why="Xen's own configuration (S14 options)", plugin="efistub"),
        WriteFile(efistub.HELPER, efistub.HELPER_SCRIPT, mode=0o755, step="S9",
                  why="finds the firmware entry by label", plugin="efistub"),
        RunCommand((efistub.HELPER, "create", "Xen", "/dev/nvme0n1", "1", "\\xen.efi"),
                   unless=(efistub.HELPER, "has", "Xen"), step="S9",
                   why="a firmware entry for Xen, outside the boot order (S10)", plugin="efistub"),
        RunCommand((efistub.HELPER, "once", "Xen"), onchange=("/boot/xen.cfg", "/boot/xen.efi"), step="S10",
                   why="boot Xen at the next boot only (BootNext)", plugin="efistub"),
    ]
    assert cfg.isascii()


def test_efistub_copies_the_kernel_beside_xen_when_the_esp_is_elsewhere(site):
    fstab = site / "hosts/arch-uefi/etc/fstab"
    fstab.write_text(fstab.read_text().replace("\t/boot\tvfat", "\t/efi\tvfat"))
    facts, changes = _of(site, "arch-uefi", "efistub")
    copies = [(c.src, c.dest) for c in changes if isinstance(c, CopyFile)]
    assert copies == [("/usr/lib/efi/xen-4.5.0.efi", "/efi/EFI/xen/xen.efi"),
                      ("/boot/vmlinuz-linux", "/efi/EFI/xen/vmlinuz-linux"),
                      ("/boot/initramfs-linux.img", "/efi/EFI/xen/initramfs-linux.img")]
    create = next(c for c in changes if isinstance(c, RunCommand) and c.argv[1] == "create")
    assert create.argv[-1] == "\\EFI\\xen\\xen.efi"


def test_efistub_without_xen_efi_explains_why(site):
    (site / "hosts/arch-uefi/usr/lib/efi/xen-4.5.0.efi").unlink()
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-uefi", "--dry", "--files-only")
    assert r.returncode == 2 and "no Xen EFI binary found" in r.stderr and "x86_64-pep" in r.stderr


def test_efistub_on_a_bios_host_is_refused(site):
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text()
                                       .replace('root = "hosts/arch-syslinux"\nboot = "syslinux"',
                                                'root = "hosts/arch-syslinux"\nboot = "efistub"'))
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-syslinux", "--dry", "--files-only")
    assert r.returncode == 2 and "boots with BIOS" in r.stderr


def test_efistub_apply_is_idempotent(site):
    apply_host(site / "plugins.toml", "arch-uefi")
    root = site / "hosts/arch-uefi"
    assert (root / "boot/xen.efi").read_bytes() == (root / "usr/lib/efi/xen-4.5.0.efi").read_bytes()
    _, outcomes = plan_host(site / "plugins.toml", "arch-uefi")
    assert [o for o in outcomes if o.action == "change"] == []


EFIBOOTMGR = """#!/bin/sh
# a stand-in for efibootmgr (no EFI variables here): prints a fixed table and logs its arguments
echo "$*" >> "$EFI_LOG"
case "$*" in *--create-only*|*--bootnext*|*--bootorder*) exit 0 ;; esac
printf 'BootCurrent: 0001\\nTimeout: 1 seconds\\nBootOrder: 0001,0000,0003\\n'
printf 'Boot0000* UiApp\\tFvVol(7cb8bdc9)\\n'
printf 'Boot0001* Linux Boot Manager\\tHD(1,GPT,abc)/File(\\\\EFI\\\\systemd\\\\systemd-bootx64.efi)\\n'
printf 'Boot0003* Xen\\tHD(1,GPT,abc)/File(\\\\xen.efi)\\n'
printf 'Boot0004* Xen old\\tHD(1,GPT,abc)/File(\\\\xen-old.efi)\\n'
"""


def test_efi_helper_script_finds_entries_by_exact_label(tmp_path):
    (tmp_path / "efibootmgr").write_text(EFIBOOTMGR)
    (tmp_path / "efibootmgr").chmod(0o755)
    script = tmp_path / "efi-xen"
    script.write_text(efistub.HELPER_SCRIPT)
    script.chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "EFI_LOG": str(log)}
    run = lambda *a: subprocess.run([script, *a], env=env, capture_output=True, text=True)  # noqa: E731
    assert run("has", "Xen").returncode == 0
    assert run("has", "Xe").returncode == 1
    assert run("once", "Xen").returncode == 0 and "--bootnext 0003" in log.read_text()
    assert run("promoted", "Xen").returncode == 1
    assert run("promote", "Xen").returncode == 0 and "--bootorder 0003,0001,0000" in log.read_text()
    assert run("create", "Xen", "/dev/nvme0n1", "1", "\\xen.efi").returncode == 0
    assert "--create-only" not in log.read_text()  # exists already
    assert run("create", "Xen2", "/dev/nvme0n1", "1", "\\xen.efi").returncode == 0
    assert "--create-only --disk /dev/nvme0n1 --part 1 --loader \\xen.efi --label Xen2" in log.read_text()
    r = run("once", "Nope")
    assert r.returncode == 1 and "no boot entry labelled Nope" in r.stderr


def test_efistub_on_debian_copies_the_kernel_beside_xen(site):
    """Debian keeps the kernel in /boot and the ESP on /boot/efi, with Xen's EFI
    build as /boot/xen-4.17-amd64.efi: Xen and its kernel go to EFI/xen together."""
    root = site / "hosts/debian-grub"
    fstab = root / "etc/fstab"
    fstab.write_text(fstab.read_text() + "UUID=1A2B-3C4D /boot/efi vfat umask=0077 0 1\n")
    (root / "sys/firmware/efi").mkdir(parents=True)
    (root / "usr/bin/efibootmgr").write_bytes(b"placeholder\n")
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text().replace(
        'root = "hosts/debian-grub"\nboot = "grub"\nnetwork = "ifupdown"',
        'root = "hosts/debian-grub"\nboot = "efistub"\nnetwork = "ifupdown"\n\n[hosts.debian-grub.plugin.efistub]\ndisk = "/dev/vda"\npartition = 15'))
    facts, changes = _of(site, "debian-grub", "efistub")
    copies = [(c.src, c.dest) for c in changes if isinstance(c, CopyFile)]
    assert copies == [("/boot/xen-4.17-amd64.efi", "/boot/efi/EFI/xen/xen.efi"),
                      ("/boot/vmlinuz-6.1.0-27-amd64", "/boot/efi/EFI/xen/vmlinuz-6.1.0-27-amd64"),
                      ("/boot/initrd.img-6.1.0-27-amd64", "/boot/efi/EFI/xen/initrd.img-6.1.0-27-amd64")]
    cfg = next(c for c in changes if isinstance(c, WriteFile) and c.path.endswith("xen.cfg"))
    assert cfg.path == "/boot/efi/EFI/xen/xen.cfg"
    assert cfg.content.decode() == (
        "[global]\ndefault=xen\n\n[xen]\noptions=dom0_mem=512M,max:512M dom0_max_vcpus=2 dom0_vcpus_pin\n"
        "kernel=vmlinuz-6.1.0-27-amd64 root=UUID=7d0ed2d5-3c4e-4a1e-9a6e-2f8b7b9e4c11 ro quiet\n"
        "ramdisk=initrd.img-6.1.0-27-amd64\n")
    create = next(c for c in changes if isinstance(c, RunCommand) and c.argv[1] == "create")
    assert create.argv[2:] == ("Xen", "/dev/vda", "15", "\\EFI\\xen\\xen.efi")
    apply_host(site / "plugins.toml", "debian-grub")
    _, outcomes = plan_host(site / "plugins.toml", "debian-grub")
    assert [o for o in outcomes if o.action == "change"] == []
