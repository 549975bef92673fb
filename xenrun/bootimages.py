"""The boot images of the builtin loaders, made the way a host's boot loader sees its
files: an ISO made by grub-mkrescue (GRUB), a Syslinux FAT image, and an EFI system
partition holding xen.efi (UEFI). Their boot plugins hand them to boot-check through
the boot_image hook; xenrun.bootcheck boots them.

Only the standard library is used; every command is an argv list.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

from xenrun.bootcheck import GRUB_PC_DIR, SYSLINUX_BIOS_DIR

__all__ = ["build_grub_iso", "build_syslinux_image", "build_esp_image"]


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc


def _inner(path: str) -> str:
    """Normalise an in-image path; refuse ones that would escape the image."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad path inside image: {path!r}")
    return "/".join(parts)


# Modules the generated ISO needs at run time; leaving the other ~280 out
# makes grub-mkrescue noticeably faster and the ISO smaller.  The core image
# itself already holds iso9660 and biosdisk.
GRUB_MODULES = (
    "normal multiboot2 multiboot linux gzio serial terminal terminfo echo test "
    "configfile search search_fs_file search_fs_uuid search_label ls cat sleep "
    "part_msdos part_gpt iso9660 biosdisk ext2 fat all_video"
)
GRUB_SERIAL_PREAMBLE = (
    "serial --unit=0 --speed=115200\n"
    "terminal_input serial console\n"
    "terminal_output serial console\n"
)


def build_grub_iso(workdir: Path, grub_cfg: str, files: dict[str, Path]) -> Path:
    """Build a BIOS (i386-pc) GRUB rescue ISO and return its path.

    The image tree holds ``boot/grub/grub.cfg`` with ``grub_cfg`` and every
    ``files`` entry (key: path inside the image such as ``"boot/xen.gz"``,
    value: source file).  Unless ``grub_cfg`` sets ``terminal_output`` itself,
    a preamble sending GRUB to the serial line is prepended, since otherwise
    GRUB's "error:" messages never reach :func:`boot`.
    """
    workdir = Path(workdir)
    tree = workdir / "grub-tree"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "boot" / "grub").mkdir(parents=True)
    if "terminal_output" not in grub_cfg:
        grub_cfg = GRUB_SERIAL_PREAMBLE + grub_cfg
    (tree / "boot" / "grub" / "grub.cfg").write_text(grub_cfg)
    for inner, src in files.items():
        dst = tree / _inner(inner)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    iso = workdir / "grub.iso"
    iso.unlink(missing_ok=True)
    _run([
        "grub-mkrescue",
        # BIOS only even if EFI GRUB platforms are installed: no efi.img to
        # build (which would also need mtools).
        f"--directory={GRUB_PC_DIR}",
        f"--install-modules={GRUB_MODULES}",
        "--locales=", "--fonts=", "--themes=",
        "-o", str(iso), str(tree),
    ])
    return iso


def _mtools_env() -> dict[str, str]:
    env = dict(os.environ)
    # A user's ~/.mtoolsrc or drive letters must not change what lands in the image.
    env["MTOOLSRC"] = os.devnull
    # mtools refuses FAT images whose geometry it considers odd unless told not to check.
    env["MTOOLS_SKIP_CHECK"] = "1"
    return env


def _fat_image(path: Path, payload_bytes: int, label: str) -> None:
    # Room for FAT tables, Syslinux's ldlinux.sys/.c32 and slack; whole MiB.
    size_mb = max(16, (payload_bytes * 12 // 10) // (1 << 20) + 8)
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    _run(["mkfs.vfat", "-n", label, str(path)])


def _mcopy(image: Path, files: dict[str, Path], prefix: str = "") -> None:
    env = _mtools_env()
    made: set[str] = set()
    for inner, src in files.items():
        target = _inner(f"{prefix}/{inner}" if prefix else inner)
        parts = target.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                # mmd fails on an existing directory; -D s skips clashes.
                subprocess.run(["mmd", "-D", "s", "-i", str(image), f"::/{d}"],
                               capture_output=True, env=env)
                made.add(d)
        _run(["mcopy", "-o", "-i", str(image), str(src), f"::/{target}"], env=env)


def build_syslinux_image(
    workdir: Path,
    syslinux_cfg: str,
    files: dict[str, Path],
    modules: Iterable[str] = ("mboot.c32", "libcom32.c32"),
) -> Path:
    """Build a bootable Syslinux FAT disk image and return its path.

    ``syslinux.cfg`` (with ``syslinux_cfg``) sits at the FAT root beside the
    ``modules`` copied from /usr/lib/syslinux/modules/bios and the ``files``
    (key: path inside the image).  No mounting: mkfs.vfat, ``syslinux
    --install`` and mtools.  Unless the config has a ``SERIAL`` line,
    ``SERIAL 0 115200`` is prepended so Syslinux talks on COM1.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    img = workdir / "syslinux.img"
    mods = {m: SYSLINUX_BIOS_DIR / m for m in modules}
    payload = sum(Path(p).stat().st_size for p in [*files.values(), *mods.values()])
    _fat_image(img, payload, "XENRUN")
    _run(["syslinux", "--install", str(img)])
    if not re.search(r"^\s*serial\b", syslinux_cfg, re.I | re.M):
        syslinux_cfg = "SERIAL 0 115200\n" + syslinux_cfg
    cfg = workdir / "syslinux.cfg"
    cfg.write_text(syslinux_cfg)
    _mcopy(img, {"syslinux.cfg": cfg, **mods, **files})
    return img


def build_esp_image(workdir: Path, xen_efi: Path, xen_cfg: str, files: dict[str, Path]) -> Path:
    """Build an EFI system partition image (plain FAT, no partition table).

    ``xen_efi`` becomes ``EFI/BOOT/BOOTX64.EFI`` (the removable-media path
    OVMF boots without any NVRAM entry), ``xen_cfg`` becomes
    ``EFI/BOOT/BOOTX64.cfg`` (xen.efi reads the .cfg named after itself) and
    ``files`` (kernel, initrd; keys are names relative to ``EFI/BOOT``) are
    copied beside it.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    img = workdir / "esp.img"
    payload = sum(Path(p).stat().st_size for p in [xen_efi, *files.values()])
    _fat_image(img, payload, "XENRUN_ESP")
    cfg = workdir / "BOOTX64.cfg"
    cfg.write_text(xen_cfg)
    _mcopy(img, {"BOOTX64.EFI": Path(xen_efi), "BOOTX64.cfg": cfg, **files}, prefix="EFI/BOOT")
    return img
