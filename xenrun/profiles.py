"""Per-distribution profiles: where things live and how things are done on Arch and
on Debian, chosen from /etc/os-release, so plugins hold no if-chains on the
distribution. A plugin reads ``profile_for(facts)``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenrun.errors import PlanError


@dataclass(frozen=True)
class Profile:
    id: str
    name: str
    xen_package: str
    # how Xen is installed (S6): argv before the package name; on Arch the xen
    # package comes from the AUR and is built by an AUR helper as a normal user
    install_argv: tuple[str, ...]
    xen_from_aur: bool
    refresh_argv: tuple[str, ...] | None  # the package lists fetched first (a stock install may have none)
    xl: str  # installed by the Xen package: proves it is there
    # services to enable (S12), and those enabled only where the package ships them
    xen_services: tuple[str, ...]
    xen_services_if_shipped: tuple[str, ...]
    # boot loaders' own paths live in their plugins (grub.LAYOUTS, ...)
    xen_efi_glob: str  # where the Xen EFI binary is installed (S9)
    kernel_glob: str
    initramfs_for: str  # format with kernel version suffix, see plugins


ARCH = Profile(
    id="arch", name="Arch Linux", xen_package="xen",
    install_argv=("-S", "--needed", "--noconfirm"), xen_from_aur=True, refresh_argv=None, xl="/usr/bin/xl",
    xen_services=("xenstored.service", "xenconsoled.service", "xendomains.service"),
    # the dom0 helpers of today's Xen: xenstore's dom0 nodes, and qemu serving
    # dom0's own qdisk backends (shipped only when Xen is built with qemu)
    xen_services_if_shipped=("xen-init-dom0.service", "xen-qemu-dom0-disk-backend.service"),
    xen_efi_glob="/usr/lib/efi/xen*.efi",
    kernel_glob="/boot/vmlinuz-*", initramfs_for="/boot/initramfs-{}.img",
)

DEBIAN = Profile(
    id="debian", name="Debian", xen_package="xen-system-amd64",
    # no questions, and where a conffile of the package is already there (left by a
    # hand edit or an earlier install) keep it: dpkg would otherwise stop and ask.
    # XEN_OVERRIDE_GRUB_DEFAULT=0 reaches the update-grub the package runs: unset,
    # the package's grub.d/xen.cfg makes Xen GRUB's default from the next boot on,
    # before S10 has booted it once (the grub plugin then sets it in xen.cfg for good)
    install_argv=("env", "DEBIAN_FRONTEND=noninteractive", "XEN_OVERRIDE_GRUB_DEFAULT=0", "apt-get",
                  "-o", "Dpkg::Options::=--force-confdef",
                  "-o", "Dpkg::Options::=--force-confold", "install", "-y"),
    xen_from_aur=False, refresh_argv=("apt-get", "update"), xl="/usr/sbin/xl",
    xen_services=("xen.service", "xendomains.service"),
    xen_services_if_shipped=(),  # Debian ships neither unit: its xen init script sets dom0 up
    xen_efi_glob="/boot/xen*.efi",
    kernel_glob="/boot/vmlinuz-*", initramfs_for="/boot/initrd.img-{}",
)

PROFILES = {p.id: p for p in (ARCH, DEBIAN)}
# distributions that behave as one of the above, by ID_LIKE
_LIKE = {"archarm": "arch", "manjaro": "arch", "endeavouros": "arch", "ubuntu": "debian"}


def profile_for(facts) -> Profile:
    """The profile for the host's distribution (os-release ID, then ID_LIKE)."""
    distro = facts["distro"]
    candidates = [distro.get("id", "")] + distro.get("id_like", "").split()
    for c in candidates:
        c = _LIKE.get(c, c)
        if c in PROFILES:
            return PROFILES[c]
    raise PlanError(
        f"distribution {distro.get('pretty_name') or distro.get('id') or 'unknown'!r} is not supported"
        f" (supported: {', '.join(p.name for p in PROFILES.values())}; /etc/os-release ID or ID_LIKE)")


def _version_key(path: str) -> list:
    """Natural sort: "vmlinuz-6.1.0-10-amd64" after "vmlinuz-6.1.0-9-amd64"."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


@dataclass(frozen=True)
class BootFiles:
    """What a boot entry loads, as paths on the host: the Xen image (multiboot .gz
    for GRUB and Syslinux, EFI binary for UEFI), the dom0 kernel and initramfs,
    and the kernel's root= and options."""

    xen: str
    kernel: str
    initramfs: str
    root: str
    options: tuple[str, ...]


def boot_files(facts, efi: bool = False) -> BootFiles:
    """Pick Xen, the dom0 kernel and its initramfs from the facts, per distribution:
    Arch's vmlinuz-linux and initramfs-linux.img, Debian's newest
    vmlinuz-VERSION and initrd.img-VERSION. Clear errors when one is missing."""
    profile = profile_for(facts)
    kernels = sorted(facts.kernels, key=_version_key)
    if not kernels:
        raise PlanError("no kernel /boot/vmlinuz-* found on the host: install one first")
    kernel = "/boot/vmlinuz-linux" if "/boot/vmlinuz-linux" in kernels else kernels[-1]
    initramfs = profile.initramfs_for.format(kernel.removeprefix("/boot/vmlinuz-"))
    images = sorted((i for i in facts.xen_images if i.endswith(".efi" if efi else ".gz")), key=_version_key)
    if not images:
        if efi:
            raise PlanError(
                "no Xen EFI binary found (looked for " + profile.xen_efi_glob + "): the xen package builds"
                " xen.efi only when binutils supports x86_64-pep (see the article's UEFI section, S9);"
                " rebuild binutils and xen with it, or boot Xen through GRUB")
        raise PlanError("no Xen image /boot/xen*.gz found: is Xen installed (S6)?")
    versioned = [i for i in images if re.search(r"xen-\d", i)]
    root = facts.kernel_cmdline.get("root") or facts.root_device
    if not root:
        raise PlanError("cannot tell the root file system (no / in /etc/fstab, no root= on /proc/cmdline)")
    options = tuple(facts.kernel_cmdline.get("options", [])) or ("rw",)
    return BootFiles((versioned or images)[-1], kernel, initramfs, root, options)
