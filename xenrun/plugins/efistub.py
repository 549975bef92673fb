"""efistub: boot Xen directly from UEFI (S9, S10, S14).

Copies the Xen EFI binary to the EFI system partition and writes its xen.cfg
beside it (ASCII, ``[global] default=xen``, ``[xen] options= kernel= ramdisk=``,
root= taken from the running system), as the article does with ESP = /boot: Xen
reads xen.cfg, the kernel and the initramfs from its own folder, so when the
kernel is not in the ESP's root they are copied beside Xen. The firmware entry is
made with ``efibootmgr --create-only``, so the boot order does not change (S10):
Xen is booted once with BootNext, and `xenrun promote` puts it first after it has
been seen to boot. A missing xen.efi is a clear error: building it needs binutils
with x86_64-pep (see the article).
"""

from __future__ import annotations

import posixpath

from xenrun.api import (hookimpl, checks as check, bootcheck, bootimages, BootEntry, BootImage, CopyFile, RunCommand, WriteFile, PlanError,
                        boot_files, Setting)

HELPER = "/usr/local/lib/xenrun/efi-xen"

# Installed on the host: finds the firmware entry by its label in efibootmgr's
# output (entry numbers are only known after it exists). Static text; values come
# in as arguments.
HELPER_SCRIPT = r"""#!/bin/sh
# Installed by xenrun's efistub plugin (S9, S10). Usage:
#   efi-xen has LABEL                      exit 0 when a boot entry LABEL exists
#   efi-xen create LABEL DISK PART LOADER  make it, outside the boot order
#   efi-xen once LABEL                     boot it at the next boot only (BootNext)
#   efi-xen promote LABEL                  put it first in the boot order
#   efi-xen promoted LABEL                 exit 0 when it is first
set -eu
action=${1:-}
label=${2:-}

number() {  # the 4-hex-digit number of the entry named exactly $label
    efibootmgr | awk -v want="$label" '
        /^Boot[0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f][0-9A-Fa-f]\*? / {
            name = $0; sub(/^Boot[0-9A-Fa-f]+\*? /, "", name); sub(/\t.*/, "", name)
            if (name == want) { print substr($1, 5, 4); exit }
        }'
}
need() {
    if [ -z "$1" ]; then echo "efi-xen: no boot entry labelled $label" >&2; exit 1; fi
}

case $action in
has)
    [ -n "$(number)" ] ;;
create)
    [ -n "$(number)" ] && exit 0
    efibootmgr --create-only --disk "$3" --part "$4" --loader "$5" --label "$label" >/dev/null ;;
once)
    n=$(number); need "$n"
    efibootmgr --bootnext "$n" >/dev/null ;;
promote)
    n=$(number); need "$n"
    order=$(efibootmgr | sed -n 's/^BootOrder: //p' | tr ',' '\n' | grep -vix "$n" | paste -sd, -)
    efibootmgr --bootorder "$n${order:+,$order}" >/dev/null ;;
promoted)
    n=$(number); need "$n"
    efibootmgr | sed -n 's/^BootOrder: //p' | cut -d, -f1 | grep -qix "$n" ;;
*)
    echo "usage: efi-xen has|create|once|promote|promoted LABEL [DISK PART LOADER]" >&2; exit 2 ;;
esac
"""


def _disk(value):
    path = check.absolute_path(value)
    if not path.startswith("/dev/") or any(c.isspace() for c in path):
        raise ValueError(f"{value!r} is not a disk device such as /dev/nvme0n1")
    return path


@hookimpl
def declare_settings():
    return {"efistub": {
        "disk": Setting(_disk, None, "the disk holding the EFI system partition (default: found on the host)"),
        "partition": Setting(check.positive_int, None, "the ESP's partition number (default: found on the host)"),
        "label": Setting(check.word, "Xen", "the firmware boot entry's label"),
        "once": Setting(check.boolean, True, "boot Xen once with BootNext after a change (S10)"),
    }}


@hookimpl
def detect_hardware(probe):
    """The ESP's disk and partition number, from the mount table and /sys."""
    esp = None
    for line in (probe.text("/proc/mounts") or "").splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] == "vfat" and f[1] in ("/boot", "/efi", "/boot/efi"):
            esp = f[0]
    disk = part = None
    if esp and esp.startswith("/dev/"):
        name = esp.rsplit("/", 1)[1]
        number = (probe.text(f"/sys/class/block/{name}/partition") or "").strip()
        link = probe.link(f"/sys/class/block/{name}")
        if number.isdigit() and link:
            part, disk = int(number), "/dev/" + link.rstrip("/").split("/")[-2]
    return {"efistub_esp_device": esp, "efistub_esp_disk": disk, "efistub_esp_partition": part}


def _layout(facts):
    """(folder on the ESP for Xen, kernel path there, initramfs path there, files
    to copy in) — the kernel stays where it is when it already lies in the ESP's root."""
    if facts.firmware != "uefi":
        raise PlanError("this host boots with BIOS (no /sys/firmware/efi): use the grub or syslinux plugin (S9)")
    if not facts.esp:
        raise PlanError("no EFI system partition mounted on /boot, /efi or /boot/efi in /etc/fstab (S9)")
    files = boot_files(facts, efi=True)
    copies = []
    if posixpath.dirname(files.kernel) == facts.esp and posixpath.dirname(files.initramfs) == facts.esp:
        folder, kernel, initramfs = facts.esp, files.kernel, files.initramfs
    else:  # Xen only reads its own folder
        folder = f"{facts.esp}/EFI/xen"
        kernel = f"{folder}/{posixpath.basename(files.kernel)}"
        initramfs = f"{folder}/{posixpath.basename(files.initramfs)}"
        copies = [(files.kernel, kernel), (files.initramfs, initramfs)]
    return files, folder, kernel, initramfs, copies


def xen_cfg(xen_options, kernel: str, kernel_options, initramfs: str) -> str:
    text = ("[global]\ndefault=xen\n\n[xen]\n"
            f"options={' '.join(xen_options)}\n"
            f"kernel={' '.join([kernel, *kernel_options])}\n"
            f"ramdisk={initramfs}\n")
    if not text.isascii():
        raise PlanError("xen.cfg must be ASCII (Xen's EFI loader reads it as such)")
    return text


@hookimpl
def configure_boot(facts, host, xen_options):
    s = host.settings["efistub"]
    files, folder, kernel, initramfs, copies = _layout(facts)
    root = f"root={files.root}"
    cfg = xen_cfg(xen_options, posixpath.basename(kernel), [root, *files.options], posixpath.basename(initramfs))
    changes = [CopyFile(files.xen, f"{folder}/xen.efi", step="S9", why="the Xen EFI binary on the ESP")]
    changes += [CopyFile(src, dest, step="S9", why="Xen reads the kernel from its own folder;"
                         " copy again after a kernel update") for src, dest in copies]
    changes.append(WriteFile(f"{folder}/xen.cfg", cfg, step="S9", why="Xen's own configuration (S14 options)"))
    disk = s["disk"] or facts.efistub_esp_disk
    part = s["partition"] or facts.efistub_esp_partition
    if not (disk and part):
        raise host.setting_error("efistub", "disk", f"cannot tell which disk and partition hold the ESP {facts.esp}"
                                 " on this target: set [plugin.efistub] disk and partition")
    loader = "\\" + posixpath.relpath(f"{folder}/xen.efi", facts.esp).replace("/", "\\")
    changes.append(WriteFile(HELPER, HELPER_SCRIPT, mode=0o755, step="S9", why="finds the firmware entry by label"))
    changes.append(RunCommand((HELPER, "create", s["label"], disk, str(part), loader),
                              unless=(HELPER, "has", s["label"]), step="S9",
                              why="a firmware entry for Xen, outside the boot order (S10)"))
    if s["once"] and not facts.xen_dom0:
        changes.append(RunCommand((HELPER, "once", s["label"]), onchange=(f"{folder}/xen.cfg", f"{folder}/xen.efi"),
                                  step="S10", why="boot Xen at the next boot only (BootNext)"))
    return changes


@hookimpl
def promote_xen(facts, host):
    label = host.settings["efistub"]["label"]
    return [RunCommand((HELPER, "promote", label), unless=(HELPER, "promoted", label), step="S10",
                       why="Xen booted: put it first in the boot order")]


@hookimpl
def boot_entry(facts, host, xen_options, linux_options):
    """An ESP image: Xen as EFI/BOOT/BOOTX64.EFI, its cfg beside it, with the
    host's kernel and initramfs."""
    files, *_ = _layout(facts)
    cfg = xen_cfg(xen_options, "vmlinuz", [f"root={files.root}", *files.options, *linux_options], "initrd.img")
    return BootEntry("uefi", cfg, "EFI/BOOT/BOOTX64.cfg",
                     {"EFI/BOOT/BOOTX64.EFI": files.xen, "EFI/BOOT/vmlinuz": files.kernel,
                      "EFI/BOOT/initrd.img": files.initramfs})


@hookimpl
def boot_image(entry):
    """An EFI system partition OVMF boots from its removable-media path."""
    if entry.kind != "uefi":
        return None

    def build(workdir, files):
        folder = entry.config_path.rsplit("/", 1)[0] + "/"
        inside = {path.removeprefix(folder): local for path, local in files.items()}
        return bootimages.build_esp_image(workdir, inside.pop("BOOTX64.EFI"), entry.config, inside)
    return BootImage(bootcheck.LOADERS["uefi"], build)
