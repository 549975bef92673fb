"""Guests (S16 to S26), planned: domains.toml's guests of a host, their disks (the
disk plugins answer create_domain), xl configs, and the ``xl`` commands run through
guarded RunCommands. The flows here (create, finish-install, shutdown, destroy)
go through run.execute like setup; xenrun/domain_tasks.py holds only the tasks
that parse the command line and print.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import structlog

from xenrun import registry, run, xlcfg
from xenrun.changes import Change, RemoveFile, RunCommand, SparseFile, Symlink, WriteFile
from xenrun.domains import CONFIG_DIR, LOADERS, PHY, PVGRUB2, Domain, derived_mac, load_domains, random_mac, with_disk_keys
from xenrun.installs import with_install_keys
from xenrun.guestmedia import ISO_KERNELS, ISO_RAMDISKS, archiso_extra, guest_notes, iso_reader, lacks_boot_config
from xenrun.errors import PlanError, UsageError

log = structlog.get_logger()
# exits 0 when the guest is NOT running: the guard of shutdown and destroy. Static
# text; the guest's name reaches it as an argument, never inside the script.
NOT_RUNNING = ("sh", "-c", '! xl list "$1" >/dev/null 2>&1', "sh")
# `xl shutdown -w` returns once the guest has shut down, a moment before the xl
# process watching it removes the domain; "off" means gone from `xl list`
SHUTDOWN = ("sh", "-c", 'xl shutdown -w "$1" && while xl list "$1" >/dev/null 2>&1; do sleep 1; done', "sh")
SHUTDOWN_WAIT = 300  # seconds a guest has to power off after `xl shutdown`


@dataclasses.dataclass(frozen=True)
class DomainOptions:
    run: run.Options
    domains: str | None = None  # domains.toml; default: beside plugins.toml


# -- loading ---------------------------------------------------------------------------

def domains_file(p: run.Prepared, given: str | None) -> Path:
    return Path(given) if given else p.site.folder / "domains.toml"


def host_domains(p: run.Prepared, given: str | None) -> list[Domain]:
    """The guests of this host, checked (names, MACs, displays unique per host)."""
    path = domains_file(p, given)
    if given and not path.exists():
        raise UsageError(f"--domains: {path} does not exist")
    return [d for d in load_domains(path, p.site.host_names) if d.for_host(p.host.name)]


def the_domain(domains: list[Domain], name: str, p: run.Prepared, given: str | None) -> Domain:
    for d in domains:
        if d.name == name:
            return d
    known = ", ".join(d.name for d in domains) or "none"
    raise UsageError(f"no domain {name!r} for host {p.host.name} in {domains_file(p, given)} (domains: {known})")


def with_disk_plugins(p: run.Prepared, domain: Domain) -> tuple[run.Prepared, Domain]:
    """The host's plugins plus the disk plugins ``domain`` names (image, lvm): a
    domain's disk backend selects its plugin. When plugins.toml lists the host's
    ``disks``, a backend outside that list is refused. Also ``domain`` with its
    disks' keys checked against what those plugins declare (declare_disk_keys)."""
    wanted = [d.backend for d in domain.disks if d.backend != PHY]
    known = registry.known_names()
    for disk in domain.disks:
        if disk.backend == PHY:
            continue
        if disk.backend not in known or disk.backend not in registry.disk_backends():
            backends = ", ".join([PHY] + registry.disk_backends())
            what = "no plugin" if disk.backend not in known else "not a disk plugin"
            raise domain.disk_error(disk, "backend", f"{disk.backend!r}: {what} (disk backends: {backends})")
        if disk.backend not in p.spec.selected and p.spec.disks:
            raise domain.disk_error(disk, "backend", f"{disk.backend!r} is not among host {p.host.name}'s disk"
                                                     f" plugins (disks = {list(p.spec.disks)} in plugins.toml)")
    installers = []
    if domain.install is not None:
        method = domain.install.method
        if method not in known or method not in registry.installers():
            what = "no plugin" if method not in known else "not an installer plugin"
            raise domain.error("install.method", f"{method!r}: {what} (installers:"
                                                 f" {', '.join(registry.installers()) or 'none'})")
        installers.append(method)
    p = run.with_disk_plugins(p, wanted, installers)
    domain = with_install_keys(domain, p.plugins.install_keys())
    return p, with_disk_keys(domain, p.plugins.disk_keys())


# -- what the host already has ---------------------------------------------------------

def other_configs(target, domain: Domain) -> dict[str, list]:
    """Parsed /etc/xen/*.cfg of the host's other guests (unparsable ones skipped:
    lint reports them when pointed at them)."""
    out = {}
    for name in target.listdir(CONFIG_DIR) or []:
        path = f"{CONFIG_DIR}/{name}"
        if not name.endswith(".cfg") or path == domain.config_path:
            continue
        info = target.stat(path)
        data = target.read(path) if info is not None and info.kind == "file" else None
        try:
            out[path] = xlcfg.parse(data.decode("utf-8", errors="replace")) if data else []
        except xlcfg.XlSyntaxError:
            continue
    return out


def current_config(target, domain: Domain) -> list | None:
    data = target.read(domain.config_path)
    if data is None:
        return None
    try:
        return xlcfg.parse(data.decode("utf-8", errors="replace"))
    except xlcfg.XlSyntaxError:
        return []


def resolve_macs(domain: Domain, others: list[Domain], configs: dict[str, list], current: list | None) -> Domain:
    """Fill in MACs the spec leaves open: derived from the name (stable across runs),
    or for mac = "random" the one the guest's config already has, else a random
    one; never one another guest of the host has."""
    taken = {v.mac for d in others if d.name != domain.name for v in d.vifs if v.mac not in ("", "random")}
    for entries in configs.values():
        taken |= {mac for mac, _ in xlcfg.macs_of(entries)}
    existing = [mac for mac, _ in xlcfg.macs_of(current or [])]
    vifs = []
    for i, vif in enumerate(domain.vifs):
        mac = vif.mac
        if mac == "":
            mac = derived_mac(domain.name if i == 0 else f"{domain.name}-{i}", taken)
        elif mac == "random":
            mac = existing[i] if i < len(existing) and existing[i] not in taken else random_mac(taken)
        taken.add(mac)
        vifs.append(dataclasses.replace(vif, mac=mac))
    return dataclasses.replace(domain, vifs=tuple(vifs))


def finished_with(domain: Domain, current: list | None) -> str | None:
    """The loader ("pygrub", "pvgrub2") of a PV guest installed from its ISO whose
    config has been through finish-install, else None: create keeps it that way
    instead of going back to the ISO."""
    if not (domain.type == "pv" and domain.iso_boot and current):
        return None
    kernels = [e.value for e in current if e.key == "kernel"]
    if not kernels and any(e.key == "bootloader" for e in current):
        return "pygrub"
    if kernels == [PVGRUB2] and not any(e.key == "ramdisk" for e in current):
        return "pvgrub2"
    return None


# -- plans -----------------------------------------------------------------------------

def plan_create(p: run.Prepared, facts, domain: Domain, all_domains: list[Domain]) -> tuple[list[Change], list[str]]:
    """Disk(s) (S16), boot files from the ISO (S19), the xl config (S17 to S19),
    autostart (S22), `xl create` (S22)."""
    target = p.target
    changes: list[Change] = []
    notes: list[str] = []
    current = current_config(target, domain)
    configs = other_configs(target, domain)
    loader = finished_with(domain, current)
    spec = domain.finished(loader) if loader else domain
    if loader:
        notes.append(f"{domain.name}: installed (finish-install was applied): kept booting through {loader};"
                     f" {_loader_advice(loader)} and drop iso_boot in domains.toml")
    spec = resolve_macs(spec, all_domains, configs, current)
    entries = []
    mine: dict[str, object] = {}  # disk path -> this guest's disk there
    for disk in spec.disks:
        if disk.backend == PHY:
            if not target.exists(disk.device):
                notes.append(f"{domain.name}: {disk.device} does not exist on this target; xl create needs it")
            entries.append(f"phy:{disk.device},{disk.vdev},{disk.access}")
            continue
        plugin, answer = p.plugins.domain_disk(facts, p.host, spec, disk)
        if answer is None:
            raise spec.error(f"{disk.key}.backend", f"no plugin answered for backend {disk.backend!r}")
        _check_disk_files(p, spec, disk, answer.changes, current)
        mine[xlcfg.disk_target(answer.entry)] = disk
        changes += answer.changes
        entries.append(answer.entry)
        notes += answer.notes
    _check_not_shared(p, facts, spec, mine, all_domains)
    if spec.install is not None:
        changes += plan_install(p, facts, spec, entries[0])
    boot: dict = {}
    if spec.iso and not spec.iso_boot and not target.exists(spec.iso):
        notes.append(f"{domain.name}: the ISO {spec.iso} does not exist on this target; xl create needs it")
    if spec.iso_boot:
        boot_changes, boot = iso_boot_files(target, spec)
        changes += boot_changes
    text = xlcfg.render_domain(spec, entries, **boot)
    planned = {c.path for c in changes if isinstance(c, WriteFile)}
    other_macs = {mac: f"{path}:{line}" for path, e in configs.items() for mac, line in xlcfg.macs_of(e)}
    findings = xlcfg.lint(text, exists=lambda path: path in planned or target.exists(path),
                          allow_open_vnc=spec.allow_open_vnc, other_macs=other_macs)
    for f in findings:  # a finding about a value of the spec points at domains.toml
        if f.key in ("kernel", "ramdisk") and getattr(spec, f.key):
            raise spec.error(f.key, f.message)
    if findings:
        raise PlanError(f"{domain.config_path} as planned: " + "; ".join(_finding(f) for f in findings))
    secret = bool(spec.vnc and spec.vnc.password)
    info = target.stat(domain.config_path)
    if secret and info is not None and info.mode & 0o077:
        # WriteFile keeps an existing file's mode: a config that now holds a password
        # is written anew so that it is created 0600
        changes.append(RemoveFile(domain.config_path, step="S18", why="re-created 0600: it holds the VNC password"))
    kind = "S18" if spec.type == "hvm" else "S19"
    changes.append(WriteFile(domain.config_path, text, 0o600 if secret else 0o644, step=kind,
                             why=f"xl config of {spec.type.upper()} guest {domain.name}"))
    link = target.lstat(domain.auto_path)
    if spec.autostart:
        changes.append(Symlink(domain.auto_path, domain.config_path, step="S22", why="start with xendomains at boot"))
    elif link is not None and (link.kind != "link" or link.link == domain.config_path):
        changes.append(RemoveFile(domain.auto_path, step="S22", why="autostart = false"))
    changes.append(RunCommand(("xl", "create", domain.config_path), unless=("xl", "list", domain.name), step="S22",
                              why=f"start {domain.name}" + (" (then: xenrun domain.console)" if spec.type != "hvm" else
                                                            f" (VNC on port {5900 + spec.vnc.display})"
                                                            if spec.vnc and spec.vnc.display is not None else "")))
    return [c if c.plugin else dataclasses.replace(c, plugin="domain") for c in changes], notes


def plan_install(p: run.Prepared, facts, domain: Domain, entry: str) -> list[Change]:
    """The installer's Changes for the guest's first disk (xl disk ``entry``), which
    this plan makes when it does not exist yet."""
    path = xlcfg.disk_target(entry)
    if not path:
        raise domain.error("install", f"cannot tell the first disk's path from its xl entry {entry!r}")
    return p.plugins.domain_install(facts, p.host, domain, path, new=not p.target.exists(path))


def _check_disk_files(p: run.Prepared, domain: Domain, disk, changes, current: list | None) -> None:
    """A disk image may only be made where nothing is, or be a regular file that is
    already this guest's (its xl config uses it) or in its plugin's disk folder
    (the plugin's ``dir`` setting): never any other file of the host, which it
    would grow with zeros and hand to the guest to write on."""
    ours = {xlcfg.disk_target(d) for e in current or [] if e.key == "disk" and isinstance(e.value, list)
            for d in e.value}
    folder = str(p.host.settings.get(disk.backend, {}).get("dir") or "").rstrip("/")
    for change in changes:
        if not isinstance(change, SparseFile):
            continue
        info = p.target.lstat(change.path)
        if info is None:
            continue
        # the key that gave the path, when the spec gave it; else the backend that chose it
        key = next((k for k, v in disk.options.items() if v == change.path), "backend")
        if info.kind != "file":
            raise domain.disk_error(disk, key, f"{change.path} is a {info.kind} on {p.target}, not a disk image file")
        if change.path not in ours and not (folder and change.path.startswith(folder + "/")):
            raise domain.disk_error(disk, key, f"{change.path} is an existing file outside the disk folder"
                                               f" ({folder or 'none'}) that {domain.name}'s config does not use:"
                                               " xenrun will not make it a disk")


def _check_not_shared(p: run.Prepared, facts, domain: Domain, mine: dict, all_domains: list[Domain]) -> None:
    """Two guests of a host never share a disk: the paths of this guest's plugin
    disks against those the same plugins give the host's other guests in
    domains.toml (phy devices are compared when domains.toml is read)."""
    declared = p.plugins.disk_keys()
    notes_before = len(p.plugins.notes)
    try:
        for other in all_domains:
            if other.name == domain.name:
                continue
            try:
                other = with_disk_keys(other, declared)
            except UsageError:
                continue  # its own error, when that guest is planned
            for disk in other.disks:
                if disk.backend == PHY or disk.backend not in p.plugins.names:
                    continue
                try:
                    _plugin, answer = p.plugins.domain_disk(facts, p.host, other, disk)
                except UsageError:
                    continue
                path = xlcfg.disk_target(answer.entry) if answer else None
                if path in mine:
                    raise domain.disk_error(mine[path], "", f"the same disk ({path}) as guest {other.name}'s"
                                                            f" {disk.key.replace('.', '[')}]: guests never share a disk")
    finally:
        del p.plugins.notes[notes_before:]  # notes about the other guests are not this plan's


def _finding(f: xlcfg.Finding) -> str:
    return f"line {f.line}: {f.key}: {f.message}" if f.line else f"{f.key}: {f.message}"


def iso_boot_files(target, domain: Domain) -> tuple[list[Change], dict]:
    """S19 without loop-mounting: the kernel and initramfs copied out of the ISO
    (read in place, ISO 9660 with Rock Ridge) into the guest's boot folder, and the
    ISO's own volume label as archisolabel=."""
    if not target.exists(domain.iso):
        raise domain.error("iso", f"{domain.iso} does not exist on this target: iso_boot reads the kernel from it")
    try:
        iso = iso_reader(target, domain.iso)
    except ValueError as e:
        raise domain.error("iso", f"{domain.iso}: {e}") from None
    files = {}
    for key, wanted, candidates in (("kernel", domain.iso_kernel, ISO_KERNELS),
                                    ("ramdisk", domain.iso_ramdisk, ISO_RAMDISKS)):
        tried = (wanted,) if wanted else candidates
        inside = next((c for c in tried if iso.find(c)), None)
        if inside is None:
            raise domain.error(f"iso_{key}" if wanted else "iso", f"{domain.iso} has no {' or '.join(tried)}"
                                                                  f" (give iso_{key} = its path inside the ISO)")
        files[key] = (inside, iso.read(inside))
    changes, boot = [], {}
    for key, (inside, data) in files.items():
        path = f"{domain.guest_boot_dir}/{inside.rsplit('/', 1)[1]}"
        changes.append(WriteFile(path, data, 0o644, step="S19", why=f"PV install {key}, from {domain.iso}:{inside}"))
        boot[key] = path
    label = iso.label
    if not label:
        raise domain.error("iso", f"{domain.iso} has no volume label for archisolabel=")
    boot["extra"] = archiso_extra(label)
    return changes, boot


def _loader_advice(loader: str) -> str:
    return f'set kernel = "{PVGRUB2}"' if loader == "pvgrub2" else 'set bootloader = "pygrub"'


def plan_finish(p: run.Prepared, domain: Domain, loader: str = "pygrub") -> tuple[list[Change], list[str]]:
    """S21: kernel, ramdisk and extra dropped, bootloader = "pygrub" (or the
    pvgrub2 image as the kernel), the ISO removed from disk; S20/S26 notes on the
    guest's own disk where readable."""
    if domain.type != "pv":
        raise UsageError(f"{domain.name} is a{'n HVM' if domain.type == 'hvm' else ' PVH'} guest: finish-install"
                         " is the article's PV step (S21)")
    data = p.target.read(domain.config_path)
    if data is None:
        raise UsageError(f"{domain.config_path} does not exist on {p.target}: create the guest first (domain.create)")
    text = data.decode("utf-8", errors="replace")
    try:
        new = xlcfg.without_install(text, loader)
    except xlcfg.XlSyntaxError as e:
        raise PlanError(f"{domain.config_path}: {e}") from None
    notes = []
    # the pvgrub2 image must be on the host (grub-xen-host); pygrub's kernel is on the guest's disk
    findings = xlcfg.lint(new, allow_open_vnc=domain.allow_open_vnc,
                          exists=p.target.exists if loader == "pvgrub2" else None)
    if findings:
        raise PlanError(f"{domain.config_path} after finish-install: " + "; ".join(_finding(f) for f in findings))
    images = guest_images(p, domain)
    if (bare := lacks_boot_config(images)) is not None:
        raise PlanError(f"{domain.name}: no /boot/grub/grub.cfg in the guest's disk ({bare}): {loader} would find"
                        " nothing to boot; install GRUB's config in the guest first (grub-mkconfig -o"
                        " /boot/grub/grub.cfg, with the root partition's UUID: S20), then finish-install")
    notes += guest_notes(domain, images)
    if p.target.live and not p.target.cannot_execute(("xl", "list", domain.name)) and \
            p.target.execute(("xl", "list", domain.name), timeout=60).rc == 0:
        notes.append(f"{domain.name} is running: power it off inside the guest, then `xl create -c"
                     f" {domain.config_path}` boots it from its disk (S21)")
    if domain.iso_boot:
        notes.append(f"{domain.name}: {_loader_advice(loader)} and drop iso_boot in domains.toml to match")
    change = WriteFile(domain.config_path, new, 0o644, step="S21", why=f"boot the installed guest through {loader}",
                       plugin="domain")
    return [change], notes


def guest_images(p: run.Prepared, domain: Domain) -> list[str]:
    """Paths on this machine of the guest's disks that xenrun can read (local
    targets only): where its disk plugins say each disk is (the target of the xl
    disk entry they plan), image files always, devices on the running machine."""
    if p.target.local_path("/") is None:  # the target's files are elsewhere (SSH)
        return []
    facts = run.gather_facts(p)
    out = []
    for disk in domain.disks:
        if disk.backend == PHY:
            path = disk.device
        else:
            _plugin, answer = p.plugins.domain_disk(facts, p.host, domain, disk)
            path = xlcfg.disk_target(answer.entry) if answer else None
        if not path or (path.startswith("/dev/") and not p.target.live):
            continue
        here = p.target.local_path(path)
        if here is not None and os.path.exists(here):
            out.append(str(here))
    return out


def plan_xl(domain: Domain, action: str) -> list[Change]:
    """S23: shutdown (waits until the guest is off) or destroy, when it runs."""
    argv = SHUTDOWN + (domain.name,) if action == "shutdown" else ("xl", "destroy", domain.name)
    # a guest that ignores the request would be waited on for ever: fail, and say what to do
    return [RunCommand(argv, unless=NOT_RUNNING + (domain.name,), step="S23", plugin="domain",
                       timeout=SHUTDOWN_WAIT if action == "shutdown" else 120,
                       why=f"{action} {domain.name}" + (f" (gives up after {SHUTDOWN_WAIT} s: then"
                                                        f" `xenrun domain.destroy {domain.name}`)"
                                                        if action == "shutdown" else ""))]


def plan_delete(p: run.Prepared, domain: Domain, purge: bool) -> tuple[list[Change], list[str]]:
    """domain.delete: the guest shut down (S23), its autostart link and config
    removed (both kept as originals: a rollback brings them back), and with
    ``purge`` its disks removed too, which nothing can undo. A disk xenrun did not
    make (``phy``, a device of the host's) is never removed."""
    target = p.target
    changes: list[Change] = plan_xl(domain, "shutdown")
    notes: list[str] = []
    link = target.lstat(domain.auto_path)
    if link is not None and (link.kind != "link" or link.link == domain.config_path):
        changes.append(RemoveFile(domain.auto_path, step="S22", why=f"{domain.name} no longer starts at boot"))
    if target.exists(domain.config_path):
        changes.append(RemoveFile(domain.config_path, step="S17", why=f"xl config of {domain.name}"))
    facts = run.gather_facts(p) if purge else None
    for disk in domain.disks:
        if disk.backend == PHY:
            notes.append(f"{domain.name}: {disk.device} is a device of the host's: kept")
            continue
        _plugin, answer = p.plugins.domain_disk(facts, p.host, domain, disk) if purge else (None, None)
        path = xlcfg.disk_target(answer.entry) if answer else None
        if not purge or not path:
            notes.append(f"{domain.name}: disk {disk.vdev} kept ({disk.backend}); --purge removes it")
            continue
        if not answer.remove:
            notes.append(f"{domain.name}: disk {disk.vdev} kept: the {disk.backend} plugin does not remove its disks")
            continue
        gone = ("sh", "-c", '! test -e "$1"', "sh", path)  # exits 0 once the disk is gone
        changes.append(RunCommand(answer.remove, unless=gone, step="S16", timeout=300,
                                  why=f"--purge: remove disk {disk.vdev} of {domain.name} (cannot be undone)"))
    return [dataclasses.replace(c, plugin="domain") for c in changes], notes


# -- the flows ---------------------------------------------------------------------

def create(opts: DomainOptions, name: str, confirm) -> run.Result:
    p = run.prepare(opts.run)
    domains = host_domains(p, opts.domains)
    domain = the_domain(domains, name, p, opts.domains)
    p, domain = with_disk_plugins(p, domain)
    facts = run.gather_facts(p)
    return run.execute(p, lambda: plan_create(p, facts, domain, domains), opts.run, confirm)


def finish_install(opts: DomainOptions, name: str, confirm, loader: str = "pygrub") -> run.Result:
    if loader not in LOADERS:  # before anything is read
        raise UsageError(f"--loader {loader!r}: one of {', '.join(LOADERS)}")
    p = run.prepare(opts.run)
    domain = the_domain(host_domains(p, opts.domains), name, p, opts.domains)
    p, domain = with_disk_plugins(p, domain)  # their settings say where the guest's disks are
    return run.execute(p, lambda: plan_finish(p, domain, loader), opts.run, confirm)


def delete(opts: DomainOptions, name: str, purge: bool, confirm) -> run.Result:
    p = run.prepare(opts.run)
    domain = the_domain(host_domains(p, opts.domains), name, p, opts.domains)
    p, domain = with_disk_plugins(p, domain)  # they say where the disks are
    return run.execute(p, lambda: plan_delete(p, domain, purge), opts.run, confirm)


def xl_action(opts: DomainOptions, name: str, action: str, confirm) -> run.Result:
    p = run.prepare(opts.run)
    domain = the_domain(host_domains(p, opts.domains), name, p, opts.domains)
    return run.execute(p, lambda: (plan_xl(domain, action), []), opts.run, confirm)


def listing(opts: DomainOptions) -> dict:
    """The host's guests: spec, config written, autostart, running (when xl can run)."""
    p = run.prepare(opts.run)
    domains = host_domains(p, opts.domains)
    running, why = None, None
    reason = p.target.cannot_execute(("xl", "list"))
    if reason:
        why = f"xl cannot run here: {reason}"
    else:
        r = p.target.execute(("xl", "list"), timeout=60)
        if r.rc == 0:
            running = {line.split()[0] for line in r.stdout.splitlines()[1:] if line.split()}
        else:
            why = f"xl list failed (S24: not booted into Xen, or xencommons not running): {(r.stderr or r.stdout).strip()[:160]}"
    rows = []
    for d in domains:
        link = p.target.lstat(d.auto_path)
        rows.append({"name": d.name, "type": d.type, "memory_mib": d.memory_mib, "vcpus": d.vcpus,
                     "config": d.config_path if p.target.exists(d.config_path) else None,
                     "autostart": bool(link and link.kind == "link"),
                     "running": None if running is None else d.name in running})
    return {"host": p.host.name, "target": str(p.target), "domains": rows,
            "other_running": sorted((running or set()) - {d.name for d in domains} - {"Domain-0", "Name"}),
            "note": why}


def lint_paths(paths: list[str], root: str | None = None, allow_open_vnc: bool = False) -> list[str]:
    """Lint configs on this machine (a folder: its *.cfg); kernel paths are looked
    up under ``root`` (default /). MACs are checked across all the files given."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files += sorted(f for f in path.glob("*.cfg") if f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"domain.lint: {given} does not exist")
    if not files:
        raise UsageError(f"domain.lint: no *.cfg in {', '.join(paths)}")
    base = Path(root).resolve() if root else Path("/")
    if root:
        from xenrun.targets.local import LocalTarget
        exists = LocalTarget(base).exists
    else:
        exists = os.path.exists
    out: list[str] = []
    macs: dict[str, str] = {}
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise UsageError(f"domain.lint: cannot read {f}: {e.strerror}") from None
        findings = xlcfg.lint(text, exists=exists, allow_open_vnc=allow_open_vnc, other_macs=macs)
        out += [finding.format(str(f)) for finding in findings]
        try:
            macs.update({mac: f"{f}:{line}" for mac, line in xlcfg.macs_of(xlcfg.parse(text)) if mac not in macs})
        except xlcfg.XlSyntaxError:
            pass
    return out


