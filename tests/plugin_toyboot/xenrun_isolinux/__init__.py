"""isolinux: a toy boot plugin, written from docs/plugins.md alone, that xenrun's core
knows nothing about. Its boot-check image is an ISO 9660 image booted by ISOLINUX
(Debian's isolinux package) whose mboot.c32 loads Xen, the dom0 kernel and its
initramfs. It plans nothing on the host (a toy); what it proves is that a new boot
loader is one plugin file: its own BootEntry kind, its own Loader (how QEMU is handed
the image, what the loader prints when it fails, the tools it needs) and its own
image builder, driven by ``xenrun boot-check``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from xenrun.api import BootEntry, BootImage, Loader, PlanError, boot_files, hookimpl

ISOLINUX_BIN = "/usr/lib/ISOLINUX/isolinux.bin"
MODULES = "/usr/lib/syslinux/modules/bios"
LOADER = Loader(
    "ISOLINUX", "cdrom",
    soft=(r"Could not find kernel image|not found|[Ff]ailed|Invalid",),
    final=(r"^boot: ?$", r"Boot failed|No bootable device"),
    needs=(("xorriso", "xorriso"), (ISOLINUX_BIN, "isolinux"), (f"{MODULES}/mboot.c32", "syslinux-common")),
)


@hookimpl
def configure_boot(facts, host, xen_options):
    return []  # a toy: it changes nothing on the host


@hookimpl
def boot_entry(facts, host, xen_options, linux_options):
    files = boot_files(facts)
    if not files.xen.endswith(".gz"):
        raise PlanError(f"{host.name}: isolinux boots a multiboot Xen (xen-*.gz), found {files.xen}")
    linux = " ".join([f"root={files.root}", *files.options, *linux_options])
    config = ("SERIAL 0 115200\nDEFAULT xen\nPROMPT 0\nTIMEOUT 1\nLABEL xen\n  KERNEL mboot.c32\n"
              f"  APPEND /xen.gz {' '.join(xen_options)} --- /vmlinuz {linux} --- /initrd.img\n")
    return BootEntry("isolinux", config, "isolinux/isolinux.cfg",
                     {"xen.gz": files.xen, "vmlinuz": files.kernel, "initrd.img": files.initramfs})


@hookimpl
def boot_image(entry):
    if entry.kind != "isolinux":
        return None

    def build(workdir: Path, files: dict[str, Path]) -> Path:
        tree = workdir / "iso-tree"
        (tree / "isolinux").mkdir(parents=True)
        for inside, local in files.items():
            shutil.copyfile(local, tree / inside)
        shutil.copyfile(ISOLINUX_BIN, tree / "isolinux/isolinux.bin")
        for module in ("ldlinux.c32", "mboot.c32", "libcom32.c32"):
            shutil.copyfile(f"{MODULES}/{module}", tree / "isolinux" / module)
        (tree / entry.config_path).write_text(entry.config)
        image = workdir / "isolinux.iso"
        subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(image), "-b", "isolinux/isolinux.bin",
                        "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
                        str(tree)], check=True, capture_output=True)
        return image
    return BootImage(LOADER, build)
