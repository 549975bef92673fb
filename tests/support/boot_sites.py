"""Example hosts with real boot files: Debian 12's Xen 4.17, a dom0 kernel and a
busybox initramfs put where each example host's plugins expect them, then
`xenrun setup --files-only` applied, so that `xenrun boot-check` boots what the
plugins planned. Shared by tests/vm/test_boot_plugins_qemu.py and
benchmarks/boot_check.py."""

from __future__ import annotations

import shutil
import subprocess
import sys


def run_xenrun(*args):
    return subprocess.run([sys.executable, "-m", "xenrun", *map(str, args)], capture_output=True, text=True)


def _put(root, path: str, source) -> None:
    dest = root / path.lstrip("/")
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)


def _generate_grub_cfg(root, abi: str) -> None:
    """What update-grub does on the host: GRUB's own 20_linux_xen, reading the
    files xenrun wrote, run with the root's /boot in place of this machine's
    (a private mount namespace), written to the root's /boot/grub/grub.cfg."""
    script = (
        'set -e; mount --bind "$1/boot" /boot; . "$1/etc/default/grub"; . "$1/etc/default/grub.d/xen.cfg";'
        ' export GRUB_CMDLINE_XEN_DEFAULT GRUB_CMDLINE_LINUX_DEFAULT GRUB_CMDLINE_LINUX GRUB_DISTRIBUTOR'
        ' GRUB_CMDLINE_LINUX_XEN_REPLACE_DEFAULT="console=hvc0";'
        ' export GRUB_DEVICE=/dev/vda1 GRUB_DEVICE_UUID=7d0ed2d5-3c4e-4a1e-9a6e-2f8b7b9e4c11 GRUB_FS=ext2'
        ' pkgdatadir=/usr/share/grub grub_probe=/bin/true;'
        ' "$1/etc/grub.d/20_linux_xen"')
    out = subprocess.run(["unshare", "--mount", "sh", "-c", script, "_", str(root)],
                         capture_output=True, text=True, check=True).stdout
    # the entries name the bind mount's source; on the host they would say /boot
    (root / "boot/grub/grub.cfg").write_text(out.replace(str(root / "boot") + "/", "/boot/"))


def real_debian_grub(site, debian):
    root = site / "hosts/debian-grub"
    for old in (root / "boot").glob("*6.1.0-27*"):
        old.unlink()
    abi = debian["vmlinuz"].name.removeprefix("vmlinuz-")
    _put(root, f"/boot/vmlinuz-{abi}", debian["vmlinuz"])
    _put(root, f"/boot/config-{abi}", debian["vmlinuz"].parent / f"config-{abi}")
    _put(root, f"/boot/initrd.img-{abi}", debian["initrd"])
    _put(root, "/boot/xen-4.17-amd64.gz", debian["xen_gz"])
    (root / "boot/xen-4.17-amd64.efi").unlink()
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "debian-grub", "--yes", "--files-only")
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    _generate_grub_cfg(root, abi)
    return root


def real_arch(site, host, debian, efi=False):
    root = site / "hosts" / host
    _put(root, "/boot/vmlinuz-linux", debian["vmlinuz"])
    _put(root, "/boot/initramfs-linux.img", debian["initrd"])
    if efi:
        _put(root, "/usr/lib/efi/xen-4.5.0.efi", debian["xen_efi"])
    else:
        _put(root, "/boot/xen-4.5.0.gz", debian["xen_gz"])
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", host, "--yes", "--files-only")
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return root
