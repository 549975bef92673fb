"""syslinux: boot Xen through Syslinux (S8, S10, S14).

Adds a ``LABEL xen`` entry to /boot/syslinux/syslinux.cfg: mboot.c32 loads Xen with
its options, ``---``, the kernel with root= and the options of the existing
default entry, ``---``, its initramfs; paths relative to syslinux.cfg as the
article writes them. mboot.c32 (and libcom32.c32, which Syslinux 6 modules need)
is copied beside syslinux.cfg. The existing entries stay, and so does the DEFAULT
(S10): Xen is booted once with ``extlinux --once=xen`` where extlinux is installed,
and `xenrun promote` makes it the default after it has been seen to boot.
"""

from __future__ import annotations

import posixpath
import re

from xenrun.api import (hookimpl, warn, checks as check, bootcheck, bootimages, BootEntry, BootImage, CopyFile, EnsureLine, RunCommand, WriteFile,
                        PlanError, boot_files, Setting)

CFG = "/boot/syslinux/syslinux.cfg"
BEGIN, END = "# BEGIN xenrun: Xen entry (S8)", "# END xenrun"
MODULES = ("mboot.c32", "libcom32.c32")


@hookimpl
def declare_settings():
    return {"syslinux": {
        "label": Setting(check.name, "xen", "the LABEL of the Xen entry"),
        "once": Setting(check.boolean, True, "boot Xen once with extlinux --once after a change (S10)"),
    }}


@hookimpl
def detect_hardware(probe):
    modules_dir = next((d for d in ("/usr/lib/syslinux/bios", "/usr/lib/syslinux/modules/bios")
                        if probe.exists(f"{d}/mboot.c32")), None)
    return {"syslinux_cfg": probe.text(CFG),
            "syslinux_modules_dir": modules_dir,
            "syslinux_modules": probe.listdir(modules_dir) if modules_dir else []}


def parse_syslinux(text: str) -> dict:
    """syslinux.cfg -> {"default": label, "labels": {label: {"linux", "append",
    "initrd", "menu_label"}}} (keywords are case-insensitive; KERNEL and LINUX
    are the same for a Linux entry)."""
    default, labels, current = None, {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "DEFAULT" and current is None:
            default = rest
        elif word == "LABEL":
            current = labels.setdefault(rest, {})
        elif current is not None and word in ("LINUX", "KERNEL"):
            current["linux"] = rest
        elif current is not None and word in ("APPEND", "INITRD"):
            current[word.lower()] = rest
        elif current is not None and word == "MENU" and rest.upper().startswith("LABEL "):
            current["menu_label"] = rest[6:].strip()
    return {"default": default, "labels": labels}


def _default_entry(facts, parsed: dict) -> dict:
    entry = parsed["labels"].get(parsed["default"] or "")
    if not entry or "linux" not in entry:
        raise PlanError(f"{CFG}: no DEFAULT entry with a LINUX/KERNEL line to take the kernel and root= from"
                        f" (DEFAULT is {parsed['default']!r}, labels: {', '.join(parsed['labels']) or 'none'})")
    return entry


def _entry_parts(facts, host) -> tuple[str, str, list[str], str]:
    """(xen, kernel, kernel options, initramfs) as absolute paths on the host, from
    the default entry (kernel, options, initramfs) and the installed Xen."""
    parsed = parse_syslinux(facts.syslinux_cfg)
    entry = _default_entry(facts, parsed)
    here = posixpath.dirname(CFG)
    kernel = posixpath.normpath(posixpath.join(here, entry["linux"]))
    initrd_items = [i for i in re.split(r"[,\s]+", entry.get("initrd", "")) if i]
    append = entry.get("append", "").split()
    initrd_items += [w[7:] for w in append if w.startswith("initrd=")]
    options = [w for w in append if not w.startswith("initrd=")]
    if not initrd_items:
        raise PlanError(f"{CFG}: the default entry has no INITRD line")
    initramfs = posixpath.normpath(posixpath.join(here, initrd_items[-1]))  # the last is the real one (microcode first)
    return boot_files(facts).xen, kernel, options, initramfs


def xen_entry(label: str, xen: str, xen_options: list[str], kernel: str, options: list[str], initramfs: str,
              path=lambda p: posixpath.relpath(p, posixpath.dirname(CFG))) -> str:
    """The LABEL block; ``path`` turns a host path into what the config says."""
    append = " ".join([path(xen), *xen_options, "---", path(kernel), *options, "---", path(initramfs)])
    return (f"{BEGIN}\nLABEL {label}\n    MENU LABEL Xen\n    KERNEL mboot.c32\n"
            f"    APPEND {append}\n{END}\n")


def with_entry(text: str, block: str) -> str:
    """``text`` with xenrun's block replaced, or appended after the existing entries."""
    pattern = re.compile(rf"^{re.escape(BEGIN)}\n.*?^{re.escape(END)}\n?", re.M | re.S)
    if pattern.search(text):
        return pattern.sub(lambda m: block, text, count=1)
    return text + ("" if text.endswith("\n") else "\n") + "\n" + block


@hookimpl
def configure_boot(facts, host, xen_options):
    if facts.syslinux_cfg is None:
        raise PlanError(f"{host.name}: {CFG} does not exist: Syslinux is not installed there (S8)")
    label = host.settings["syslinux"]["label"]
    if label in parse_syslinux(facts.syslinux_cfg)["labels"] and BEGIN not in facts.syslinux_cfg:
        raise host.setting_error("syslinux", "label", f"{CFG} already has a LABEL {label} that xenrun did not write")
    xen, kernel, options, initramfs = _entry_parts(facts, host)
    new_text = with_entry(facts.syslinux_cfg, xen_entry(label, xen, xen_options, kernel, options, initramfs))
    if not facts.syslinux_modules_dir:
        raise PlanError(f"{host.name}: mboot.c32 not found in /usr/lib/syslinux/bios or"
                        " /usr/lib/syslinux/modules/bios: install syslinux (S8)")
    changes = [CopyFile(f"{facts.syslinux_modules_dir}/{m}", f"/boot/syslinux/{m}", step="S8",
                        why=f"{m} beside syslinux.cfg" + (" (needed by mboot.c32 on Syslinux 6)" if m != "mboot.c32" else ""))
               for m in MODULES if m in facts.syslinux_modules]
    changes.append(WriteFile(CFG, new_text, step="S8", why="the Xen entry; the existing entries and DEFAULT stay"))
    if host.settings["syslinux"]["once"] and not facts.xen_dom0:
        if "extlinux" in facts.programs:
            changes.append(RunCommand(("extlinux", f"--once={label}", "/boot/syslinux"), onchange=(CFG,),
                                      step="S10", why="boot Xen at the next boot only"))
        else:
            warn("extlinux is not installed: choose the Xen entry at the Syslinux menu to boot it once (S10)")
    return changes


@hookimpl
def promote_xen(facts, host):
    label = host.settings["syslinux"]["label"]
    return [EnsureLine(CFG, f"DEFAULT {label}", replace=r"^\s*DEFAULT\s", step="S10",
                       why="Xen booted: make it the default")]


@hookimpl
def boot_entry(facts, host, xen_options, linux_options):
    """A syslinux.cfg at the image's root booting the Xen entry, paths absolute in
    the image, with the host's Xen, kernel and initramfs under /boot."""
    xen, kernel, options, initramfs = _entry_parts(facts, host)
    files = {"boot/xen.gz": xen, "boot/vmlinuz": kernel, "boot/initrd.img": initramfs}
    inside = {xen: "/boot/xen.gz", kernel: "/boot/vmlinuz", initramfs: "/boot/initrd.img"}
    block = xen_entry("xen", xen, xen_options, kernel, options + list(linux_options), initramfs, path=inside.__getitem__)
    config = "DEFAULT xen\nPROMPT 0\nTIMEOUT 1\n" + block
    return BootEntry("syslinux", config, "syslinux.cfg", files)


@hookimpl
def boot_image(entry):
    """A FAT disk made bootable by ``syslinux --install``, syslinux.cfg at its root."""
    if entry.kind == "syslinux":
        return BootImage(bootcheck.LOADERS["syslinux"],
                         lambda workdir, files: bootimages.build_syslinux_image(workdir, entry.config, files))
