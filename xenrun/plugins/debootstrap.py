"""debootstrap: a Debian system installed onto a guest's first disk, as xen-tools'
xen-create-image does (issue 14.1).

    [domain.web1.install]
    method = "debootstrap"
    suite = "bookworm"                       # default: the plugin's setting
    mirror = "http://deb.debian.org/debian"  # or a local repository, file:///srv/debian
    packages = ["less", "vim-tiny"]
    ssh_key_file = "/root/.ssh/id_ed25519.pub"   # or ssh_key = "ssh-ed25519 AAAA..."
    address = "192.168.1.20/24"              # default "dhcp"
    gateway = "192.168.1.1"
    dns = ["192.168.1.1"]

The plan writes the installer script (debootstrap.sh, as /usr/local/lib/xenrun/
debootstrap-guest) and runs it once: debootstrap into a scratch folder, the guest's
files (hostname, fstab by a UUID derived from the guest's name, eth0 by DHCP or the
static address, root's authorized_keys, /boot/grub/grub.cfg for pygrub and pvgrub2,
console=hvc0 on the kernel line, so systemd starts a getty there), then one ext4
filesystem on the whole disk (``mkfs.ext4 -d``). The guard asks the disk itself: a
disk that holds the complete system is left alone (a second run does nothing), and
the script refuses a disk that holds anything but its own half-written filesystem.
The install keys only shape a new system: changing them later changes nothing on a
disk already installed.
"""

from __future__ import annotations

import re
import uuid
from importlib import resources
from pathlib import Path

from xenrun.api import RunCommand, Setting, WriteFile, checks as check, hookimpl

NAME = "debootstrap"
SCRIPT_PATH = "/usr/local/lib/xenrun/debootstrap-guest"
SCRIPT = resources.files(__package__).joinpath("debootstrap.sh").read_text()
# what every installed guest has: an init, the Debian kernel (its initramfs holds
# xen-blkfront: initramfs-tools' MODULES=most), OpenSSH, ifupdown with a DHCP client
BASE_PACKAGES = ("systemd-sysv", "udev", "kmod", "linux-image-amd64", "initramfs-tools", "openssh-server",
                 "ifupdown", "isc-dhcp-client", "iproute2", "netbase")
INSTALL_TIMEOUT = 3600  # seconds: debootstrap from a slow mirror
# the guest's root filesystem UUID: derived from its name, so a plan is the same every run
UUID_SPACE = uuid.UUID("6c1b6a53-3b1e-4f0e-9a55-7c2d0e8f4a10")

_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com"
                  r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}(?: [\x20-\x7e]*)?")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_HOSTNAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MIRROR = re.compile(r"(?:https?://[A-Za-z0-9.-]+(?::\d+)?|file://)/[A-Za-z0-9._~/%+-]*")


def _ssh_key(value) -> str:
    if not isinstance(value, str) or not _KEY.fullmatch(value.strip()):
        raise ValueError("expected one OpenSSH public key line, as in id_ed25519.pub (\"ssh-ed25519 AAAA... comment\")")
    return value.strip()


def _ssh_key_file(value) -> str:
    """A public key file on the machine running xenrun, read now: its first key."""
    path = check.absolute_path(value)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{path} holds no public key")
    try:
        return _ssh_key(lines[0])
    except ValueError:
        raise ValueError(f"{path}: not an OpenSSH public key (give the .pub file, never the private key)") from None


def _packages(value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) and _PACKAGE.fullmatch(p) for p in value):
        raise ValueError('expected a list of Debian package names, e.g. ["less", "vim-tiny"]')
    return list(value)


def _hostname(value) -> str:
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a host name (lowercase letters, digits and '-', at most 63)")
    return value


def _mirror(value) -> str:
    if not isinstance(value, str) or not _MIRROR.fullmatch(value):
        raise ValueError(f"{value!r} is not a mirror URL (http://, https:// or file:///, no spaces or quotes)")
    return value.rstrip("/")


def _suite(value) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z]{2,20}", value):
        raise ValueError(f"{value!r} is not a Debian suite name (bookworm, trixie, stable ...)")
    return value


def _address(value) -> str:
    return "dhcp" if value == "dhcp" else check.ipv4_interface(value)


def _dns(value) -> list[str]:
    if not isinstance(value, list):
        raise ValueError('expected a list of IPv4 addresses, e.g. ["192.168.1.1"]')
    return [check.ipv4_address(v) for v in value]


@hookimpl
def declare_settings():
    return {NAME: {
        "mirror": Setting(_mirror, "http://deb.debian.org/debian", "the Debian mirror (or file:/// repository)"),
        "suite": Setting(_suite, "bookworm", "the Debian suite installed"),
        "check_gpg": Setting(check.boolean, True, "check the mirror's Release signature (false: an unsigned"
                                                  " local repository)"),
    }}


@hookimpl
def declare_install_keys():
    return {NAME: {
        "suite": Setting(_suite, None, "the Debian suite (default: the plugin's suite setting)"),
        "mirror": Setting(_mirror, None, "the mirror (default: the plugin's mirror setting)"),
        "check_gpg": Setting(check.boolean, None, "check the mirror's signature (default: the plugin's setting)"),
        "packages": Setting(_packages, [], "Debian packages installed beside the base system"),
        "hostname": Setting(_hostname, None, "the guest's host name (default: the domain's name)"),
        "ssh_key": Setting(_ssh_key, None, "root's SSH public key (one line of a .pub file)"),
        "ssh_key_file": Setting(_ssh_key_file, None, "a .pub file on this machine holding root's SSH key"),
        "address": Setting(_address, "dhcp", "eth0 on xenbr0: \"dhcp\" or a static A.B.C.D/N"),
        "gateway": Setting(check.ipv4_address, None, "the default route, with a static address"),
        "dns": Setting(_dns, [], "name servers written to /etc/resolv.conf"),
    }}


def root_uuid(domain) -> str:
    return str(uuid.uuid5(UUID_SPACE, domain.name))


@hookimpl
def install_domain(facts, host, domain, disk, new):
    if domain.install is None or domain.install.method != NAME:
        return None
    o = domain.install.options
    settings = host.settings[NAME]
    if o["ssh_key"] and o["ssh_key_file"]:
        raise domain.error("install.ssh_key_file", "give ssh_key or ssh_key_file, not both")
    key = o["ssh_key"] or o["ssh_key_file"]
    if not key:
        raise domain.error("install", "ssh_key or ssh_key_file is missing: root logs in with that key only"
                                      " (the guest has no password)")
    if o["gateway"] and o["address"] == "dhcp":
        raise domain.error("install.gateway", "only with a static address (DHCP gives the route)")
    suite = o["suite"] or settings["suite"]
    mirror = o["mirror"] or settings["mirror"]
    gpg = settings["check_gpg"] if o["check_gpg"] is None else o["check_gpg"]
    packages = ",".join(dict.fromkeys(BASE_PACKAGES + tuple(o["packages"])))
    ident = ("--disk", disk, "--uuid", root_uuid(domain))
    argv = (SCRIPT_PATH, "install", *ident, "--suite", suite, "--mirror", mirror, "--include", packages,
            "--hostname", o["hostname"] or domain.name, "--address", o["address"])
    argv += ("--gateway", o["gateway"]) if o["gateway"] else ()
    argv += ("--dns", " ".join(o["dns"])) if o["dns"] else ()
    argv += ("--ssh-key", key) + (() if gpg else ("--no-check-gpg", "yes"))
    return [
        WriteFile(SCRIPT_PATH, SCRIPT, mode=0o755, validate=("sh", "-n", "{}"), step="S16",
                  why="the guest installer (debootstrap, then one ext4 filesystem on the disk)"),
        RunCommand(argv, unless=(SCRIPT_PATH, "check", *ident), timeout=INSTALL_TIMEOUT, step="S16",
                   why=f"install Debian {suite} onto {disk} for {domain.name}"
                       + (" (a new disk)" if new else " (the disk exists: only if it is empty)")),
    ]
