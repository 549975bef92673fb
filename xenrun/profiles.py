"""Per-distribution profiles: where things live and how things are done on Arch and
on Debian, chosen from /etc/os-release, so plugins hold no if-chains on the
distribution. A plugin reads ``profile_for(facts)``."""

from __future__ import annotations

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
    xl: str  # installed by the Xen package: proves it is there
    # services to enable (S12)
    xen_services: tuple[str, ...]
    # GRUB (S7): the file holding the hypervisor command line, its variable, and the
    # command that regenerates grub.cfg
    grub_cfg: str
    grub_mkconfig: tuple[str, ...]
    grub_xen_file: str
    grub_xen_var: str
    grub_xen_script: str  # the grub.d script that makes the Xen entries
    syslinux_modules: str  # folder holding mboot.c32 (S8)
    xen_efi_glob: str  # where the Xen EFI binary is installed (S9)
    kernel_glob: str
    initramfs_for: str  # format with kernel version suffix, see plugins


ARCH = Profile(
    id="arch", name="Arch Linux", xen_package="xen",
    install_argv=("-S", "--needed", "--noconfirm"), xen_from_aur=True, xl="/usr/bin/xl",
    xen_services=("xenstored.service", "xenconsoled.service", "xendomains.service"),
    grub_cfg="/boot/grub/grub.cfg", grub_mkconfig=("grub-mkconfig", "-o", "/boot/grub/grub.cfg"),
    grub_xen_file="/etc/xen/grub.conf", grub_xen_var="XEN_HYPERVISOR_CMDLINE",
    grub_xen_script="/etc/grub.d/09_xen",
    syslinux_modules="/usr/lib/syslinux/bios", xen_efi_glob="/usr/lib/efi/xen*.efi",
    kernel_glob="/boot/vmlinuz-*", initramfs_for="/boot/initramfs-{}.img",
)

DEBIAN = Profile(
    id="debian", name="Debian", xen_package="xen-system-amd64",
    install_argv=("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y"),
    xen_from_aur=False, xl="/usr/sbin/xl",
    xen_services=("xen.service", "xendomains.service"),
    grub_cfg="/boot/grub/grub.cfg", grub_mkconfig=("update-grub",),
    grub_xen_file="/etc/default/grub.d/xen.cfg", grub_xen_var="GRUB_CMDLINE_XEN_DEFAULT",
    grub_xen_script="/etc/grub.d/20_linux_xen",
    syslinux_modules="/usr/lib/syslinux/modules/bios", xen_efi_glob="/boot/xen*.efi",
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
