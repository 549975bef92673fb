"""Really boot Debian 12's Xen 4.17 and a busybox dom0 under QEMU through GRUB,
Syslinux and UEFI, and check that broken boot configurations fail fast.

Slow (tens of seconds per boot under TCG): marked ``qemu``.  Needs the Debian
packages named by ``bootcheck.qemu_missing()`` plus busybox-static (the
initramfs is written in Python, so cpio is not needed); Xen and the kernel
are downloaded with apt-get into <repo>/.cache/debs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support import xenpkgs
from xenrun import bootcheck, bootimages

pytestmark = pytest.mark.qemu

XEN_OPTIONS = "console=com1 com1=115200,8n1 dom0_mem=512M"
DOM0_OPTIONS = "console=hvc0"
BOOT_TIMEOUT = 240.0
# Broken configs are caught from the loader's own messages within seconds.
FAIL_FAST_SECONDS = 30.0
MISSING_KERNEL = "vmlinuz-missing"


def _needs_tools(kind: str) -> None:
    """Skip only when QEMU itself is absent; any other missing tool is a failure
    (CI installs everything, so that would be a broken setup)."""
    if shutil.which(bootcheck.QEMU) is None:
        pytest.skip(f"{bootcheck.QEMU} is not installed (apt-get install qemu-system-x86)")
    assert bootcheck.qemu_missing(kind) is None, bootcheck.qemu_missing(kind)


@pytest.fixture(scope="session")
def boot_files(tmp_path_factory) -> bootcheck.BootFiles:
    """Xen, dom0 kernel (downloaded once, cached) and the busybox initramfs."""
    pkgs = xenpkgs.fetch()
    initrd = xenpkgs.make_busybox_initramfs(tmp_path_factory.mktemp("initramfs") / "initrd.gz")
    return bootcheck.BootFiles(xen=pkgs["xen_gz"], xen_efi=pkgs["xen_efi"],
                               kernel=pkgs["vmlinuz"], initrd=initrd)


def grub_cfg(kernel: str = "vmlinuz") -> str:
    return (
        "set timeout=0\n"
        "set default=0\n"
        "menuentry 'Xen 4.17' {\n"
        f"  multiboot2 /boot/xen.gz {XEN_OPTIONS}\n"
        f"  module2 /boot/{kernel} {DOM0_OPTIONS}\n"
        # Linux unpacks the gzip'd cpio itself; no need for GRUB to do it.
        "  module2 --nounzip /boot/initrd.gz\n"
        "}\n"
    )


def syslinux_cfg(kernel: str = "vmlinuz") -> str:
    return (
        "DEFAULT xen\n"
        "LABEL xen\n"
        "  KERNEL mboot.c32\n"
        f"  APPEND xen.gz {XEN_OPTIONS} --- {kernel} {DOM0_OPTIONS} --- initrd.gz\n"
    )


def xen_efi_cfg(kernel: str = "vmlinuz") -> str:
    return (
        "[global]\n"
        "default=xen\n"
        "\n"
        "[xen]\n"
        f"options={XEN_OPTIONS}\n"
        f"kernel={kernel} {DOM0_OPTIONS}\n"
        "ramdisk=initrd.gz\n"
    )


def build(kind: str, files: bootcheck.BootFiles, workdir: Path, kernel: str = "vmlinuz") -> Path:
    if kind == "grub":
        return bootimages.build_grub_iso(workdir, grub_cfg(kernel), {
            "boot/xen.gz": files.xen, "boot/vmlinuz": files.kernel, "boot/initrd.gz": files.initrd,
        })
    if kind == "syslinux":
        return bootimages.build_syslinux_image(workdir, syslinux_cfg(kernel), {
            "xen.gz": files.xen, "vmlinuz": files.kernel, "initrd.gz": files.initrd,
        })
    assert files.xen_efi is not None
    return bootimages.build_esp_image(workdir, files.xen_efi, xen_efi_cfg(kernel), {
        "vmlinuz": files.kernel, "initrd.gz": files.initrd,
    })


def _report(result: bootcheck.BootResult) -> str:
    return (f"ok={result.ok} stage={result.stage!r} {result.seconds} s "
            f"markers={result.marker_seconds}\nreason: {result.reason}\n"
            f"--- last console lines ---\n" + "\n".join(result.log.splitlines()[-40:]))


@pytest.mark.parametrize("kind", bootcheck.KINDS)
def test_boots_xen_to_dom0_userspace(kind, boot_files, tmp_path):
    _needs_tools(kind)
    image = build(kind, boot_files, tmp_path)
    seen: list[str] = []
    result = bootcheck.boot(image, kind, timeout=BOOT_TIMEOUT, progress=seen.append)
    print(f"{kind}: {result.seconds} s {result.marker_seconds}")
    assert result.ok, _report(result)
    assert result.stage == "hypervisor=xen", _report(result)
    assert seen[0] == "xen started" and seen[-1] == "hypervisor=xen", seen
    assert "hypervisor=xen" in result.marker_seconds
    assert result.marker_seconds["xen started"] <= result.marker_seconds["hypervisor=xen"]
    assert "XENRUN-HYPERVISOR-TYPE=xen" in result.log


@pytest.mark.parametrize("kind", bootcheck.KINDS)
def test_missing_dom0_kernel_fails_fast(kind, boot_files, tmp_path):
    _needs_tools(kind)
    image = build(kind, boot_files, tmp_path, kernel=MISSING_KERNEL)
    result = bootcheck.boot(image, kind, timeout=BOOT_TIMEOUT)
    print(f"{kind} (broken): {result.seconds} s: {result.reason}")
    assert not result.ok, _report(result)
    assert result.seconds < FAIL_FAST_SECONDS, _report(result)
    assert MISSING_KERNEL in result.reason, _report(result)
    assert "hypervisor=xen" not in result.marker_seconds
    assert "timeout" not in result.reason
