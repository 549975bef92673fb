"""grub: boot Xen through GRUB (S7, S10, S14).

Arch with the xen package's /etc/grub.d/09_xen: XEN_HYPERVISOR_CMDLINE in
/etc/xen/grub.conf, then grub-mkconfig. Elsewhere GRUB's own 20_linux_xen reads
GRUB_CMDLINE_XEN_DEFAULT: from /etc/default/grub.d/xen.cfg on Debian (with
update-grub, and XEN_OVERRIDE_GRUB_DEFAULT=0 so Debian does not make Xen the
default), from /etc/default/grub on Arch without 09_xen.

The hypervisor options already on that line are kept (merge_xen_cmdline):
xenrun's own win by key, the others stay in their order before xenrun's, so the
plan's diff shows them kept; a value only the shell could read is refused.

Never lose the way back (S10): GRUB_DEFAULT=saved with the Linux entry saved as
the default, and the Xen entry booted once with grub-reboot; `xenrun promote`
makes Xen the default after it has been seen to boot. Xen is booted without
`noreboot`, so a panic reboots into the old entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import structlog

from xenrun.api import (hookimpl, checks as check, bootcheck, bootimages, BootEntry, BootImage, EnsureLine, RunCommand,
                        WriteFile, PlanError, parse_shell_vars, boot_files, profile_for, Setting)

log = structlog.get_logger()
HELPER = "/usr/local/lib/xenrun/grub-xen"
DEFAULT_GRUB = "/etc/default/grub"
GRUBENV = "/boot/grub/grubenv"
GRUB_CHECK = ("grub-script-check", "{}")  # for grub.cfg text (boot-check's image)
# /etc/default/grub, grub.d/xen.cfg and /etc/xen/grub.conf are shell that
# grub-mkconfig sources; Debian's stock copies use backticks and $(...), which
# grub-script-check rejects, so they are checked as shell
SHELL_CHECK = ("sh", "-n", "{}")
GRUB_CFG = "/boot/grub/grub.cfg"


@dataclass(frozen=True)
class GrubLayout:
    """Where GRUB's Xen pieces live on a distribution (S7): the file holding the
    hypervisor command line and its variable, and the command that regenerates
    grub.cfg."""

    xen_file: str
    xen_var: str
    mkconfig: tuple[str, ...]


# by Profile.id; Arch's 09_xen comes with the xen package, Debian's is GRUB's own
LAYOUTS = {
    "arch": GrubLayout("/etc/xen/grub.conf", "XEN_HYPERVISOR_CMDLINE", ("grub-mkconfig", "-o", GRUB_CFG)),
    "debian": GrubLayout("/etc/default/grub.d/xen.cfg", "GRUB_CMDLINE_XEN_DEFAULT", ("update-grub",)),
}
# every (file, variable) _xen_cmdline_file can choose: their current values are facts
XEN_CMDLINE_VARS = (*((layout.xen_file, layout.xen_var) for layout in LAYOUTS.values()),
                    (DEFAULT_GRUB, "GRUB_CMDLINE_XEN_DEFAULT"))

# Installed on the host; finds the entries grub-mkconfig made (their titles and ids
# differ between 09_xen and 20_linux_xen) and acts on them. Static text: every
# value reaches it as an argument.
HELPER_SCRIPT = r"""#!/bin/sh
# Installed by xenrun's grub plugin (S10). Usage:
#   grub-xen has-xen|once|keep-linux|promote|promoted [GRUB_CFG [BOOT_DIR]]
# has-xen: exit 0 when GRUB_CFG has a Xen entry; once: boot it at the next boot
# only (grub-reboot); keep-linux: save the first Linux entry as the default unless
# a default is saved already; promote: make the Xen entry the default; promoted:
# exit 0 when it is.
set -eu
action=${1:-}
cfg=${2:-/boot/grub/grub.cfg}
boot=${3:-/boot}

entries() {  # "id<TAB>title" of every top-level menu entry, in order
    awk '
    /^menuentry / {
        title = ""
        if (match($0, /^menuentry '\''[^'\'']*'\''/)) title = substr($0, 12, RLENGTH - 12)
        else if (match($0, /^menuentry "[^"]*"/)) title = substr($0, 12, RLENGTH - 12)
        id = title
        if (match($0, /\$menuentry_id_option '\''[^'\'']*'\''/)) id = substr($0, RSTART + 22, RLENGTH - 23)
        printf "%s\t%s\n", id, title
    }' "$cfg"
}
xen_entry() { entries | awk -F '\t' 'tolower($0) ~ /xen/ { print $1; exit }'; }
linux_entry() { entries | awk -F '\t' 'tolower($0) !~ /xen/ { print $1; exit }'; }
need() {
    if [ -z "$1" ]; then echo "grub-xen: no $2 entry in $cfg" >&2; exit 1; fi
}

case $action in
has-xen)
    [ -n "$(xen_entry)" ] ;;
once)
    id=$(xen_entry); need "$id" Xen
    grub-reboot --boot-directory="$boot" "$id" ;;
keep-linux)
    if grub-editenv "$boot/grub/grubenv" list 2>/dev/null | grep -q '^saved_entry='; then exit 0; fi
    id=$(linux_entry); need "$id" Linux
    grub-set-default --boot-directory="$boot" "$id" ;;
promote)
    id=$(xen_entry); need "$id" Xen
    grub-set-default --boot-directory="$boot" "$id" ;;
promoted)
    id=$(xen_entry); need "$id" Xen
    grub-editenv "$boot/grub/grubenv" list 2>/dev/null | grep -qxF "saved_entry=$id" ;;
*)
    echo "usage: grub-xen has-xen|once|keep-linux|promote|promoted [GRUB_CFG [BOOT_DIR]]" >&2; exit 2 ;;
esac
"""


@hookimpl
def declare_settings():
    return {"grub": {
        "once": Setting(check.boolean, True, "boot Xen once with grub-reboot after a change (S10)"),
        "linux_options": Setting(check.words, [], "more dom0 kernel options for boot-check's entry"),
    }}


@hookimpl
def detect_hardware(probe):
    """The grub.d scripts, /etc/default/grub, and whether GRUB can write grubenv
    (not on LVM or RAID: then grub-reboot cannot work)."""
    boot_spec = None
    for line in (probe.text("/etc/fstab") or "").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[1] in ("/boot", "/"):
            boot_spec = fields[0] if fields[1] == "/boot" or boot_spec is None else boot_spec
    return {
        "grub_cfg": probe.text(GRUB_CFG),
        "grub_separate_boot": any(line.split("#", 1)[0].split()[1:2] == ["/boot"]
                                  for line in (probe.text("/etc/fstab") or "").splitlines()),
        "grub_scripts": probe.listdir("/etc/grub.d"),
        "grub_default": parse_shell_vars(probe.text(DEFAULT_GRUB) or ""),
        "grub_env_device": boot_spec,
        "grub_xen_cmdline": {path: last_assignment(probe.text(path) or "", var) for path, var in XEN_CMDLINE_VARS},
    }


def last_assignment(text: str, var: str) -> dict | None:
    """The last line of a shell file that assigns ``var`` (the one in force), as
    {"line": number, "value": its right-hand side as written}; None without one.
    Commented lines do not count."""
    found = None
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(rf"\s*{var}=(.*)$", line)
        if m:
            found = {"line": number, "value": m.group(1)}
    return found


def shell_value(rhs: str) -> str | None:
    """The value a shell assignment ``VAR=<rhs>`` gives, when it can be read
    without a shell: unquoted, '...' and "..." parts, then an optional comment.
    None when only running it could tell: an expansion ($, backquotes, ~), a
    backslash, a second word (a command), a quote left open."""
    out, i = [], 0
    while i < len(rhs):
        c = rhs[i]
        if c in " \t":
            rest = rhs[i:].strip()
            if rest and not rest.startswith("#"):
                return None
            break
        if c in "'\"":
            end = rhs.find(c, i + 1)
            part = rhs[i + 1:end]
            if end < 0 or c == '"' and re.search(r"[$`\\]", part):
                return None
            out.append(part)
            i = end + 1
        elif c in "$`\\~;&|<>()":
            return None
        else:
            out.append(c)
            i += 1
    return "".join(out)


def option_key(option: str) -> str:
    """What a Xen option sets: the part before '=' (a flag is its own key)."""
    return option.split("=", 1)[0]


def merge_xen_cmdline(existing: str, ours: list[str]) -> str:
    """The hypervisor command line: the options of ``existing`` whose key xenrun
    does not set, in their order, then xenrun's ``ours``. Merging the result
    again gives the same line."""
    keys = {option_key(o) for o in ours}
    return " ".join([o for o in existing.split() if option_key(o) not in keys] + list(ours))


def shell_assignment(var: str, value: str) -> str | None:
    """``var=value`` quoted so that sh reads back exactly ``value``: in double
    quotes, in single quotes when it holds $, `, \\ or "; None when it cannot be."""
    if not re.search(r'[$`\\"]', value):
        return f'{var}="{value}"'
    return f"{var}='{value}'" if "'" not in value else None


def _xen_cmdline(facts, path: str, var: str, ours: list[str]) -> str:
    """The line setting ``var`` in ``path`` to the merged command line."""
    values = facts.grub_xen_cmdline or {}
    current, source = values.get(path), path
    if current is None and path != DEFAULT_GRUB and var == "GRUB_CMDLINE_XEN_DEFAULT":
        # grub.d/xen.cfg is sourced after /etc/default/grub: without its own
        # assignment the options in force are those of /etc/default/grub
        current, source = values.get(DEFAULT_GRUB), DEFAULT_GRUB
    where = f"{source}:{current['line']}: {var}" if current else f"{path}: {var}"
    existing = shell_value(current["value"]) if current else ""
    if existing is None:
        raise PlanError(f"{where}: the value cannot be read without running the shell ($(...), backquotes, $VAR,"
                        " a backslash or an open quote); write its options plainly in quotes, then run setup again")
    if any(option_key(o) == "noreboot" for o in existing.split()):
        raise PlanError(f"{where}: noreboot would keep a panicked Xen from rebooting into the old Linux entry,"
                        " the way back (S10); remove it, then run setup again")
    line = shell_assignment(var, merge_xen_cmdline(existing, ours))
    if line is None:
        raise PlanError(f"{where}: the options hold both a quote and $, ` or \\, which cannot be written back"
                        " in one quoted value; write them plainly, then run setup again")
    return line


def _env_unwritable(facts) -> str | None:
    spec = facts.grub_env_device or ""
    if spec.startswith(("/dev/mapper/", "/dev/md")) or spec.count("/") == 3 and spec.startswith("/dev/") \
            and not spec.startswith(("/dev/disk/", "/dev/sd", "/dev/nvme", "/dev/vd", "/dev/hd", "/dev/xvd")):
        return spec
    return None


def _xen_cmdline_file(facts, profile) -> tuple[str, str, tuple[str, ...]]:
    """(file, variable, validator) holding the hypervisor command line."""
    scripts = facts.grub_scripts
    layout = LAYOUTS[profile.id]
    if profile.id == "arch" and "09_xen" in scripts:
        return layout.xen_file, layout.xen_var, SHELL_CHECK
    if "20_linux_xen" in scripts:
        if profile.id == "debian":
            return layout.xen_file, layout.xen_var, SHELL_CHECK
        return DEFAULT_GRUB, "GRUB_CMDLINE_XEN_DEFAULT", SHELL_CHECK
    raise PlanError("no GRUB script makes Xen entries (/etc/grub.d/09_xen from the xen package, or GRUB's own"
                    f" 20_linux_xen); found: {', '.join(scripts) or 'no /etc/grub.d'}")


@hookimpl
def configure_boot(facts, host, xen_options):
    if "grub" not in facts.bootloaders:
        raise PlanError(f"{host.name}: GRUB is not installed (boot loaders found: "
                        f"{', '.join(facts.bootloaders) or 'none'}); choose another boot plugin")
    profile = profile_for(facts)
    path, var, validate = _xen_cmdline_file(facts, profile)
    changes = [EnsureLine(path, _xen_cmdline(facts, path, var, xen_options), replace=rf"^\s*#?\s*{var}=",
                          validate=validate, step="S7", why="the Xen command line (S14 settings)")]
    if path == LAYOUTS[profile.id].xen_file and profile.id == "debian":
        changes.append(EnsureLine(path, "XEN_OVERRIDE_GRUB_DEFAULT=0", replace=r"^(?:#\s*)?XEN_OVERRIDE_GRUB_DEFAULT=",  # top level only: never Debian's if block
                                  validate=validate, step="S10", why="keep Linux the default until Xen has booted"))
    changes.append(EnsureLine(DEFAULT_GRUB, "GRUB_DEFAULT=saved", replace=r"^\s*#?\s*GRUB_DEFAULT=",
                              validate=SHELL_CHECK, step="S10", why="boot the saved entry (Linux until promoted)"))
    changes.append(WriteFile(HELPER, HELPER_SCRIPT, mode=0o755, step="S10", why="finds GRUB's Xen and Linux entries"))
    changes.append(RunCommand(LAYOUTS[profile.id].mkconfig, onchange=(path, DEFAULT_GRUB), writes=(GRUB_CFG,),
                              unless=(HELPER, "has-xen", GRUB_CFG), step="S7",
                              why="regenerate grub.cfg with the Xen entries"))
    changes.append(RunCommand((HELPER, "keep-linux", GRUB_CFG), onchange=(DEFAULT_GRUB,), writes=(GRUBENV,),
                              step="S10", why="save the Linux entry as the default"))
    if host.settings["grub"]["once"] and not facts.xen_dom0:
        unwritable = _env_unwritable(facts)
        if unwritable:
            raise host.setting_error("grub", "once", f"/boot/grub/grubenv is on {unwritable} (LVM or RAID), which GRUB"
                                     " cannot write, so grub-reboot cannot boot Xen once; set once = false and"
                                     " choose the Xen entry at the GRUB menu")
        changes.append(RunCommand((HELPER, "once", GRUB_CFG), onchange=(path,), writes=(GRUBENV,),
                                  step="S10", why="boot Xen at the next boot only; a failure falls back to Linux"))
    return changes


@hookimpl
def promote_xen(facts, host):
    profile_for(facts)  # a distribution xenrun does not know is refused here too
    return [RunCommand((HELPER, "promote", GRUB_CFG), writes=(GRUBENV,),
                       unless=(HELPER, "promoted", GRUB_CFG),
                       step="S10", why="Xen booted: make it the default")]


def generated_xen_entry(grub_cfg: str) -> str | None:
    """The first top-level menuentry of a generated grub.cfg that boots Xen, as
    text (from its ``menuentry`` line to its closing brace), or None."""
    lines = grub_cfg.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("menuentry ") and re.search(r"xen", line, re.I):
            depth, block = 0, []
            for inner in lines[i:]:
                block.append(inner)
                depth += inner.count("{") - inner.count("}")
                if depth <= 0:
                    return "\n".join(block) + "\n"
    return None


_LOAD = re.compile(r"^(\s*)(multiboot2?|module2?|linux|initrd)(\s+)(.*)$")


def _entry_for_image(entry: str, xen_extra: list[str], linux_extra: list[str], separate_boot: bool):
    """Rewrite a generated entry for a rescue image: each loaded file keeps its
    path inside the image, Xen options it lacks (boot-check's serial console) are
    appended to Xen's line and ``linux_extra`` to the kernel's module line, and
    ``search`` lines go (the image is the root).
    Returns (text, {path in image: host path})."""
    files, out, modules = {}, [], 0
    for line in entry.splitlines():
        if line.strip().startswith("search "):
            continue
        m = _LOAD.match(line)
        if m:
            indent, cmd, space, rest = m.groups()
            words = rest.split()
            flags = [w for w in words if w.startswith("--")]
            args = [w for w in words if not w.startswith("--")]
            path = args[0]
            files[path.lstrip("/")] = ("/boot" + path) if separate_boot else path
            if cmd.startswith("multiboot"):
                args += [o for o in xen_extra if o not in args]  # the generated line has the planned ones
            elif cmd.startswith("module"):
                modules += 1
                if modules == 1:  # the dom0 kernel; the next module is the initramfs
                    args += linux_extra
            line = indent + cmd + space + " ".join(flags + args)
        out.append(line)
    return "\n".join(out) + "\n", files


@hookimpl
def boot_entry(facts, host, xen_options, linux_options):
    """The Xen entry grub-mkconfig generated (09_xen or 20_linux_xen) when
    grub.cfg has one, with the console options for the check; otherwise the
    entry as 20_linux_xen writes it (multiboot2, module2), from the planned
    options. The old Linux entry follows as GRUB's fallback."""
    linux_extra = list(host.settings["grub"]["linux_options"]) + list(linux_options)
    files = boot_files(facts)
    generated = generated_xen_entry(facts.grub_cfg or "")
    if generated:
        entry, paths = _entry_for_image(generated, xen_options, linux_extra, facts.grub_separate_boot)
    else:
        kernel_line = " ".join((f"root={files.root}",) + files.options + tuple(linux_extra))
        entry = (f"menuentry 'Xen (planned by xenrun)' {{\n"
                 f"\tmultiboot2 /boot/xen.gz placeholder {' '.join(xen_options)}\n"
                 f"\tmodule2 /boot/vmlinuz placeholder {kernel_line}\n"
                 f"\tmodule2 --nounzip /boot/initrd.img\n}}\n")
        paths = {"boot/xen.gz": files.xen, "boot/vmlinuz": files.kernel, "boot/initrd.img": files.initramfs}
    # without Xen there is no hvc0: the old entry talks on the first serial port
    plain = [("console=ttyS0,115200" if o == "console=hvc0" else o) for o in linux_extra]
    kernel_line = " ".join((f"root={files.root}",) + files.options + tuple(plain))
    fallback = (f"menuentry 'Linux (the old entry)' {{\n\tlinux /fallback/vmlinuz {kernel_line}\n"
                f"\tinitrd /fallback/initrd.img\n}}\n")
    paths.update({"fallback/vmlinuz": files.kernel, "fallback/initrd.img": files.initramfs})
    config = "set timeout=0\nset default=0\nset fallback=1\ninsmod gzio\n" + entry + fallback
    return BootEntry("grub", config, "boot/grub/grub.cfg", paths, fallback=True, validate=GRUB_CHECK)


@hookimpl
def boot_image(entry):
    """A BIOS GRUB rescue ISO (grub-mkrescue) holding the entry's grub.cfg."""
    if entry.kind == "grub":
        return BootImage(bootcheck.LOADERS["grub"],
                         lambda workdir, files: bootimages.build_grub_iso(workdir, entry.config, files))
