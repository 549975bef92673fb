"""The guest media xenrun reads without mounting: an installation ISO's label and
files (ISO 9660, S19), and a guest disk's own files (its partitions, its
mkinitcpio.conf: S20, S26), read with debugfs.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path
from typing import Callable

# where Arch ISOs keep the PV kernel and initramfs: the article's (2013) names first,
# then today's; the first one the ISO holds is used
ISO_KERNELS = ("/arch/boot/x86_64/vmlinuz", "/arch/boot/x86_64/vmlinuz-linux")
ISO_RAMDISKS = ("/arch/boot/x86_64/archiso.img", "/arch/boot/x86_64/initramfs-linux.img")
GUEST_MODULES = ("xen-blkfront", "xen-fbfront", "xen-netfront", "xen-kbdfront")  # S20


# -- ISO 9660: the label and files of an installation ISO, without mounting ---------------

SECTOR = 2048


class Iso9660:
    """Reads an ISO 9660 image through ``read_at(offset, length) -> bytes``.
    Names are matched through Rock Ridge (NM) when present, else through the plain
    ISO name (upper case, ";1" dropped), case-insensitively."""

    def __init__(self, read_at: Callable[[int, int], bytes]):
        self.read_at = read_at
        pvd = read_at(16 * SECTOR, SECTOR)
        if len(pvd) < SECTOR or pvd[0] != 1 or pvd[1:6] != b"CD001":
            raise ValueError("not an ISO 9660 image (no primary volume descriptor at sector 16)")
        self.pvd = pvd

    @property
    def label(self) -> str:
        """The volume identifier (bytes 40..72 of the primary volume descriptor):
        what archiso puts in archisolabel=."""
        return self.pvd[40:72].decode("ascii", errors="replace").strip()

    def _records(self, extent: int, length: int):
        data = self.read_at(extent * SECTOR, length)
        pos = 0
        while pos < len(data):
            size = data[pos]
            if size == 0:  # records never cross a sector: skip to the next one
                pos = (pos // SECTOR + 1) * SECTOR
                continue
            rec = data[pos:pos + size]
            pos += size
            if len(rec) < 34:
                break
            name_len = rec[32]
            raw = rec[33:33 + name_len]
            if raw in (b"\x00", b"\x01"):
                continue  # . and ..
            use = rec[33 + name_len + (1 - name_len % 2):]
            name = _rock_ridge_name(use) or raw.decode("ascii", errors="replace").split(";")[0].rstrip(".")
            yield name, struct.unpack_from("<I", rec, 2)[0], struct.unpack_from("<I", rec, 10)[0], bool(rec[25] & 2)

    def find(self, path: str) -> tuple[int, int] | None:
        """(offset, size) in bytes of the file at ``path`` inside the ISO, or None."""
        root = self.pvd[156:156 + 34]
        extent, length, is_dir = struct.unpack_from("<I", root, 2)[0], struct.unpack_from("<I", root, 10)[0], True
        for part in [p for p in path.split("/") if p]:
            if not is_dir:
                return None
            for name, ext, size, folder in self._records(extent, length):
                if name.lower() == part.lower():
                    extent, length, is_dir = ext, size, folder
                    break
            else:
                return None
        return None if is_dir else (extent * SECTOR, length)

    def read(self, path: str) -> bytes | None:
        found = self.find(path)
        return None if found is None else self.read_at(*found)


def _rock_ridge_name(use: bytes) -> str | None:
    """The NM (alternate name) entry of a record's System Use area, if any."""
    pos, parts = 0, []
    while pos + 4 <= len(use):
        sig, length = use[pos:pos + 2], use[pos + 2]
        if length < 4:
            break
        if sig == b"NM":
            flags = use[pos + 4]
            if flags & 0x06:  # "." or ".." names
                return None
            parts.append(use[pos + 5:pos + length].decode("utf-8", errors="replace"))
            if not flags & 0x01:  # no continuation
                break
        elif sig == b"ST":
            break
        pos += length
    return "".join(parts) or None


def iso_reader(target, path: str) -> Iso9660:
    """An Iso9660 over a file of the target. On a local target (the machine or a
    --root folder) only the sectors needed are read; elsewhere the whole file."""
    host_path = target.local_path(path)
    if host_path is not None:

        def read_at(offset: int, length: int) -> bytes:
            with open(host_path, "rb") as f:
                f.seek(offset)
                return f.read(length)
        return Iso9660(read_at)
    data = target.read(path)
    if data is None:
        raise FileNotFoundError(path)
    return Iso9660(lambda offset, length: data[offset:offset + length])


def archiso_extra(label: str) -> str:
    """The kernel line the article gives a PV install from an Arch ISO (S19)."""
    return f"archisobasedir=arch archisolabel={label}"


# -- the guest's own disk: its mkinitcpio.conf, without mounting (S20, S26) ----------------

def mkinitcpio_missing(text: str) -> list[str]:
    """The Xen front-end modules (S20) the MODULES=(...) line of a guest's
    mkinitcpio.conf lacks. Comments ignored; the last MODULES line wins."""
    modules: list[str] = []
    joined = re.sub(r"#[^\n]*", "", text)
    for m in re.finditer(r"^\s*MODULES\s*=\s*(\(([^)]*)\)|\"([^\"]*)\"|'([^']*)'|(\S*))", joined, re.M):
        body = next(g for g in m.groups()[1:] if g is not None)
        modules = [w.strip("\"'") for w in body.split()]
    have = {m.replace("_", "-") for m in modules}
    return [m for m in GUEST_MODULES if m not in have]


def partition_offsets(head: bytes) -> list[int]:
    """Byte offsets of the partitions of a disk image, from its MBR or GPT (first
    34 sectors); [0] when it has no partition table (a bare filesystem)."""
    if len(head) >= 1024 and head[512:520] == b"EFI PART":
        start, count, size = struct.unpack_from("<QII", head, 512 + 72)
        offsets = []
        for i in range(min(count, 128)):
            pos = start * 512 + i * size
            if pos + 48 > len(head):
                break
            if head[pos:pos + 16] != b"\0" * 16:
                offsets.append(struct.unpack_from("<Q", head, pos + 32)[0] * 512)
        return offsets or [0]
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        offsets = []
        for i in range(4):
            entry = head[446 + 16 * i:462 + 16 * i]
            kind, lba = entry[4], struct.unpack_from("<I", entry, 8)[0]
            if kind and lba and kind not in (0x05, 0x0F, 0x85, 0xEE):
                offsets.append(lba * 512)
        return offsets or [0]
    return [0]


def read_guest_file(image: str | Path, path: str) -> bytes | None:
    """A file of the guest's ext2/3/4 root filesystem inside a disk image on this
    machine, read with debugfs (e2fsprogs): no mount, no root needed. None when no
    partition of the image holds it (or debugfs is missing)."""
    try:
        with open(image, "rb") as f:
            head = f.read(34 * 512)
    except OSError:
        return None
    for offset in partition_offsets(head):
        spec = f"{image}?offset={offset}" if offset else str(image)
        try:
            p = subprocess.run(["debugfs", "-R", f"cat {path}", spec], capture_output=True, timeout=60,
                               env={**os.environ, "LC_ALL": "C"})
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        # debugfs prints errors on stderr and exits 0; an empty stdout means "not there"
        if p.returncode == 0 and p.stdout and b"File not found" not in p.stderr:
            return p.stdout
    return None


def guest_notes(domain, images: list[str], read=read_guest_file) -> list[str]:
    """S20/S26: what the guest itself still needs, for the disks xenrun can read
    (image files on this machine). Empty when all is well or nothing can be read."""
    notes = []
    for image in images:
        conf = read(image, "/etc/mkinitcpio.conf")
        if conf is None:
            continue
        missing = mkinitcpio_missing(conf.decode("utf-8", errors="replace"))
        if missing:
            notes.append(f"{domain.name}: the guest's /etc/mkinitcpio.conf (in {image}) lacks {', '.join(missing)}"
                         " in MODULES=(...): add them and run `mkinitcpio -P` in the guest, or it will stop at a"
                         " ctrl-d prompt (S20, S26)")
        else:
            notes.append(f"{domain.name}: the guest's mkinitcpio.conf has the Xen front-end modules (S20)")
        break
    return notes


def lacks_boot_config(images: list[str], read=read_guest_file) -> str | None:
    """The first readable guest disk (one holding a Linux /etc) without
    /boot/grub/grub.cfg, which pygrub boots from; None when all have one or none
    can be read."""
    for image in images:
        if read(image, "/etc/mkinitcpio.conf") is None and read(image, "/etc/fstab") is None:
            continue  # not a filesystem xenrun can read: cannot tell
        return None if read(image, "/boot/grub/grub.cfg") is not None else image
    return None
