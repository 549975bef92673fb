"""xen: the host-wide steps of the article that are neither boot nor network.
Always selected.

S6 install Xen (apt on Debian; on Arch the AUR package through yay or paru run as
``aur_user``), S12 enable the Xen services (and start them once Xen runs; on Arch
also xen-init-dom0 and xen-qemu-dom0-disk-backend where the package ships them), S13 the
xenfs line in /etc/fstab (unless the package mounts xenfs itself, only under Xen), S27 remove a stale xend udev rule, S14 the dom0 options
handed to the boot plugin. Warns for S1 (no vmx/svm) and S4 (VirtualBox)."""

from __future__ import annotations

import re

from xenrun.api import (hookimpl, checks as check, EnsureLine, RemoveFile, RunCommand, Symlink, PlanError,
                        profile_for, Setting, note, warn)
# nofail: the kept plain-Linux entry (S10) has no xenfs, and without nofail systemd
# would stop that boot in emergency mode over this line; under Xen it mounts as before
XENFS_LINE = "none /proc/xen xenfs defaults,nofail 0 0"
XL_CONF = "/etc/xen/xl.conf"
UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
AUR_HELPERS = ("paru", "yay")


@hookimpl
def declare_settings():
    return {"xen": {
        "dom0_mem": Setting(check.size, None, "fixed memory of dom0, e.g. \"512M\" (S14)"),
        "dom0_max_vcpus": Setting(check.positive_int, None, "at most this many vCPUs for dom0 (S14)"),
        "dom0_vcpus_pin": Setting(check.boolean, False, "pin dom0's vCPUs to physical CPUs (S14)"),
        "options": Setting(check.words, [], "more Xen command-line options, e.g. [\"console=com1\"]"),
        "install": Setting(check.boolean, True, "install Xen when missing (S6)"),
        "aur_user": Setting(check.name, None, "the user an AUR helper builds xen as (Arch)"),
        "services": Setting(check.boolean, True, "enable the Xen services (S12)"),
    }}


@hookimpl
def detect_hardware(probe):
    """Where the Xen unit files are and what enables them ([Install] WantedBy)."""
    units = {}
    for folder in UNIT_DIRS:
        for name in probe.listdir(folder):
            if name.startswith("xen") and name.endswith(".service") and name not in units:
                text = probe.text(f"{folder}/{name}") or ""
                wanted = [w for line in text.splitlines() if line.strip().startswith("WantedBy=")
                          for w in line.split("=", 1)[1].split()]
                units[name] = {"path": f"{folder}/{name}", "wanted_by": wanted}
    # the version the package installed, from the names it leaves (no xl needed)
    names = probe.listdir("/boot") + [n for n in probe.listdir("/usr/lib") if n.startswith("xen-")]
    return {"xen_units": units, "xen_version": xen_version(names), "xenfs_mounted_by": _xenfs_mounter(probe)}


def _xenfs_mounter(probe) -> str | None:
    """The package file that mounts xenfs on /proc/xen only under Xen, if any:
    upstream's proc-xen.mount (ConditionPathExists=/proc/xen), or Debian's xen init
    script (it exits at once when not under Xen, else mounts xenfs itself)."""
    for folder in UNIT_DIRS[1:]:
        text = probe.text(f"{folder}/proc-xen.mount") or ""
        if re.search(r"^\s*ConditionPathExists=/proc/xen/?\s*$", text, re.M):
            return f"{folder}/proc-xen.mount"
    script = probe.text("/etc/init.d/xen") or ""
    if "mount -t xenfs" in script and "/sys/hypervisor/type" in script:
        return "/etc/init.d/xen"
    return None


_VERSION = re.compile(r"^xen-(\d+\.\d+(?:\.\d+)?)(?:[-.].*)?$")


def xen_version(names) -> str | None:
    """The newest Xen version among file names such as Debian's xen-4.17-amd64.gz,
    Arch's xen-4.17.3.gz or the folder xen-4.17 (/usr/lib); None without one."""
    found = [m.group(1) for m in map(_VERSION.match, names) if m]
    return max(found, key=lambda v: [int(x) for x in v.split(".")], default=None)


@hookimpl
def xen_options(facts, host):
    s = host.settings["xen"]
    options = []
    if s["dom0_mem"]:
        mib = s["dom0_mem"] // (1 << 20)
        if facts.memory_mib and not facts.xen_running and mib >= facts.memory_mib:  # under Xen: dom0's own share
            raise host.setting_error("xen", "dom0_mem", f"{mib} MiB is not less than the host's {facts.memory_mib} MiB")
        size = check.xen_size(s["dom0_mem"])
        options.append(f"dom0_mem={size},max:{size}")  # fixed: no ballooning (S14)
    if s["dom0_max_vcpus"]:
        if facts.cpus and s["dom0_max_vcpus"] > facts.cpus:
            raise host.setting_error("xen", "dom0_max_vcpus", f"{s['dom0_max_vcpus']} is more than the host's {facts.cpus} CPUs")
        options.append(f"dom0_max_vcpus={s['dom0_max_vcpus']}")
    if s["dom0_vcpus_pin"]:
        options.append("dom0_vcpus_pin")
    if "noreboot" in s["options"] or any(o.startswith("noreboot=") for o in s["options"]):
        raise host.setting_error("xen", "options", "noreboot would keep a panicked Xen from rebooting into the old"
                                 " Linux entry, the way back (S10)")
    return options + s["options"]


@hookimpl
def configure_host(facts, host):
    s = host.settings["xen"]
    _refuse_other_machines(facts, host)
    profile = profile_for(facts)
    if not facts.xen_running and not facts.hvm:
        warn("no vmx or svm in /proc/cpuinfo: only PV guests will run (S1)")
    for other in facts.other_hypervisors:
        warn(f"{other} is installed: running it beside Xen can freeze the machine (S4)")
    changes = []
    if profile.xen_package not in facts.packages:
        changes += _install(facts, s, profile, host)
    if s["services"]:
        changes += _services(facts, profile)
    changes += _xenfs(facts)
    if s["dom0_mem"]:
        # with dom0's memory fixed on Xen's line, xl must not balloon dom0 down to
        # make room for guests (xl.conf's autoballoon="auto" means exactly that)
        changes.append(EnsureLine(XL_CONF, 'autoballoon="off"', replace=r"^\s*#?\s*autoballoon\s*=",
                                  step="S14", why="dom0_mem is fixed: xl must not balloon dom0"))
    changes.append(RemoveFile("/etc/udev/rules.d/xend.rules", step="S27",
                              why="xend is gone; its udev rule makes errors"))
    return changes


def _xenfs(facts) -> list:
    """S13. Where the package mounts xenfs itself, and only under Xen, no fstab
    line: under the kept plain-Linux entry (S10) there is no /proc/xen, and a line
    would leave a failed mount unit there, nofail or not."""
    mounter = facts.get("xenfs_mounted_by")
    if not mounter:
        return [EnsureLine("/etc/fstab", XENFS_LINE, replace=r"^\s*\S+\s+/proc/xen\s",
                           step="S13", why="mount xenfs on /proc/xen")]
    note(f"S13: {mounter} (from the Xen package) mounts xenfs on /proc/xen, only under Xen: no /etc/fstab line")
    return []


X86_VENDORS = ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls", "  Shanghai  ")


def _refuse_other_machines(facts, host) -> None:
    """The article's Xen is a dom0 on an x86-64 machine of its own: not a Xen guest,
    not ARM, s390 or POWER (whose /proc/cpuinfo has processors but no x86 vendor)."""
    if facts.get("xen_domu"):
        raise PlanError(f"{host.name}: this machine is a Xen guest (domU: /proc/xen/capabilities has no"
                        " control_d): xenrun makes a dom0 of a machine of its own")
    vendor = facts.get("cpu_vendor")
    if (vendor or facts.get("cpus")) and vendor not in X86_VENDORS:
        raise PlanError(f"{host.name}: not an x86-64 machine (/proc/cpuinfo: vendor {vendor or 'none'},"
                        f" {facts.get('cpu_model') or 'no x86 model name'}): the article's Xen dom0 is x86 only")


def _install(facts, s, profile, host) -> list[RunCommand]:
    """The package lists fetched, then the package installed. The install brings
    files the later steps edit (/etc/xen/xl.conf, Debian's grub.d/xen.cfg, the unit
    files): ``replan`` has the rest of the plan made again once it has run, so those
    steps edit the package's files instead of writing them from nothing."""
    if not s["install"]:
        raise PlanError(f"{host.name}: Xen ({profile.xen_package}) is not installed and [plugin.xen] install = false")
    argv = profile.install_argv + (profile.xen_package,)
    if profile.xen_from_aur:
        helper = next((h for h in AUR_HELPERS if h in facts.programs), None)
        if helper is None:
            raise PlanError(f"{host.name}: Xen is not installed and comes from the AUR, but no AUR helper"
                            f" ({' or '.join(AUR_HELPERS)}) is installed: install one and set [plugin.xen]"
                            " aur_user, or build and install the xen package by hand (multilib must be enabled; S6)")
        if not s["aur_user"]:
            raise host.setting_error("xen", "aur_user", f"needed on {host.name}: {helper} builds AUR packages"
                                     " as a normal user, never as root (S6)")
        argv = ("runuser", "-u", s["aur_user"], "--", helper) + argv
    refresh = [RunCommand(profile.refresh_argv, creates=profile.xl, step="S6",
                          why="fetch the package lists before installing Xen")] if profile.refresh_argv else []
    return refresh + [RunCommand(argv, creates=profile.xl, replan=True, step="S6",
                                 why=f"install Xen ({profile.xen_package})")]


def _services(facts, profile) -> list:
    changes = []
    shipped = [u for u in profile.xen_services_if_shipped if u in facts.xen_units]
    missing = [u for u in profile.xen_services_if_shipped if u not in facts.xen_units]
    if missing and profile.xen_package not in facts.packages:
        # facts are read before S6 installs the package: its unit files are not there yet
        note(f"{' and '.join(missing)}: enabled once {profile.xen_package} is installed, if it ships them"
             " (the plan is made again after the install)")
    for unit in profile.xen_services + tuple(shipped):
        known = facts.xen_units.get(unit)
        if known and known["wanted_by"]:
            # what `systemctl enable` does, as links the journal can undo
            changes += [Symlink(f"/etc/systemd/system/{wb}.wants/{unit}", known["path"], step="S12",
                                why=f"enable {unit}") for wb in known["wanted_by"]]
        else:
            changes.append(RunCommand(("systemctl", "enable", unit),
                                      unless=("systemctl", "is-enabled", "--quiet", unit),
                                      step="S12", why=f"enable {unit}"))
        if facts.xen_running and facts.live:  # they only start under Xen
            changes.append(RunCommand(("systemctl", "start", unit),
                                      unless=("systemctl", "is-active", "--quiet", unit),
                                      step="S12", why=f"start {unit}"))
    return changes
