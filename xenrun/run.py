"""The flow of one host: site -> target -> plugins -> facts -> plan -> apply.

tasks.py calls ``setup``, ``facts``, ``rollback`` and ``plugins`` here; everything
of the user's making raises a UsageError (exit 2) before the target is touched.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import sys
from dataclasses import dataclass

import structlog

from xenrun import logs
from xenrun import registry
from xenrun.apply import (STATE_DIR, Applier, Journal, left_by, owed_commands, read_state, remember_owed,
                          remove_created_folders, rollback_changes, run_ids, still_owed)
from xenrun.changes import Change
from xenrun.config import Host, HostSpec, Site, load_site
from xenrun.errors import TargetError, UsageError
from xenrun.facts import Facts, Probe
from xenrun.plan import CHANGE, PENDING, Outcome, assess
from xenrun.settings import name as check_name
from xenrun.targets import LocalTarget, Target

log = structlog.get_logger()


@dataclass(frozen=True)
class Options:
    root: str | None = None
    host: str | None = None
    config: str | None = None
    dry: bool = False
    yes: bool = False
    files_only: bool = False
    format: str = "text"

    def __post_init__(self):
        if self.format not in ("text", "json"):
            raise UsageError(f"--format: {self.format!r} is not one of: text, json")
        if self.host is not None:
            try:
                check_name(self.host)
            except ValueError as e:
                raise UsageError(f"--host: {e}") from None


@dataclass
class Prepared:
    site: Site
    spec: HostSpec
    target: Target
    pm: object
    host: Host


def prepare(options: Options) -> Prepared:
    """Everything that can be checked before reading the target: the site, the
    host's selection, its plugins and their settings, and the target itself."""
    return prepare_in(load_site(options.config), options)


def prepare_in(site: Site, options: Options) -> Prepared:
    """``prepare`` with plugins.toml already loaded (a fleet reads it once)."""
    if options.host and site.host_names and options.host not in site.host_names and not options.root:
        raise UsageError(f"--host: no host {options.host!r} in {site.file} (hosts: {', '.join(site.host_names)})")
    root = options.root
    remote = None
    if root is None and options.host:
        spec = site.host(options.host)
        if spec.address:
            from xenrun.targets.ssh import SSHTarget  # fabric and paramiko load only for SSH hosts
            keys = {"key_filename": str(spec.identity), "look_for_keys": False, "allow_agent": False} \
                if spec.identity else {}
            remote = SSHTarget(spec.address, root=str(spec.root) if spec.root else None,  # connects on first use
                               files_only=options.files_only, connect_kwargs=keys, timeout=spec.timeout)
        elif spec.root is not None:
            root = str(spec.root)
    if root is not None:
        from pathlib import Path
        if not Path(root).is_dir():
            raise UsageError(f"--root: {root} is not a folder")
    target = remote or LocalTarget(root or "/", files_only=options.files_only)
    name = options.host or _hostname(target)
    spec = site.host(name)
    known = set(registry.known_names())
    for plugin in spec.selected:
        if plugin not in known:
            raise site.error(site.selection_origin(name, plugin),
                             f"unknown plugin {plugin!r} (known: {', '.join(sorted(known))})")
    pm = registry.plugin_manager(spec.selected)
    declared: dict = {}
    for plugin, result in call_each(pm, "declare_settings"):
        for owner, table in (result or {}).items():
            if owner in declared:
                raise UsageError(f"plugin {plugin!r} declares settings for {owner!r}, already declared")
            declared[owner] = table
    for plugin, path in site.plugin_tables():
        if plugin not in known:
            raise site.error(path, f"unknown plugin (known: {', '.join(sorted(known))})")
    settings = {p: site.check_settings(name, p, declared.get(p, {})) for p in spec.selected}
    target.warm_up_with(lambda: warm_up_reads(target, spec.selected))
    return Prepared(site, spec, target, pm, Host(spec, settings, site))


def warm_up_reads(target: Target, selected) -> None:
    """What a target with a cache (SSH) reads ahead before its first read, when no
    read_ahead came first (facts, rollback): the journal scan of a setup and the
    detect_hardware of the host's plugins, against the cache (their reads then
    cost no round trip each)."""
    target.lstat(f"{STATE_DIR}/lock")  # taken before an apply
    read_state(target)
    for name in selected:
        try:
            detect = getattr(registry.load(name), "detect_hardware", None)
            if detect is not None:
                detect(probe=Probe(target))
        except Exception:  # noqa: BLE001 - choking on placeholders; the real run will tell
            pass


def _hostname(target: Target) -> str:
    data = target.read("/etc/hostname")
    name = data.decode().strip() if data else (socket.gethostname() if target.is_host else "")
    try:
        return check_name(name.split(".")[0])
    except ValueError:
        raise UsageError(f"cannot tell the host's name from {target} /etc/hostname; give --host") from None


def call_each(pm, hook: str, **kwargs) -> list[tuple[str, object]]:
    """Call every implementation of ``hook`` in registration (selection) order, with
    the plugin's name bound to the log; returns (plugin, result) pairs."""
    out = []
    impls = getattr(pm.hook, hook).get_hookimpls()
    for impl in impls:
        with structlog.contextvars.bound_contextvars(plugin=impl.plugin_name):
            out.append((impl.plugin_name, impl.function(**{a: kwargs[a] for a in impl.argnames})))
    return out


def gather_facts(p: Prepared) -> Facts:
    merged: dict = {}
    owner: dict = {}
    for plugin, fragment in call_each(p.pm, "detect_hardware", probe=Probe(p.target)):
        if fragment is None:
            continue
        if not isinstance(fragment, dict):
            raise UsageError(f"plugin {plugin!r}: detect_hardware returned {type(fragment).__name__}, not a dict")
        for key, value in fragment.items():
            if key in merged:
                raise UsageError(f"plugins {owner[key]!r} and {plugin!r} both answer the fact {key!r}")
            merged[key], owner[key] = value, plugin
    return Facts(merged)


def _changes(plugin: str, hook: str, result) -> list[Change]:
    if result is None:
        return []
    if not isinstance(result, list) or not all(isinstance(c, Change) for c in result):
        raise UsageError(f"plugin {plugin!r}: {hook} must return a list of Changes, got {result!r:.80}")
    return [dataclasses.replace(c, plugin=plugin) for c in result]


def make_plan(p: Prepared, facts: Facts) -> list[Change]:
    changes: list[Change] = []
    for plugin, result in call_each(p.pm, "configure_host", facts=facts, host=p.host):
        changes += _changes(plugin, "configure_host", result)
    xen_options = xen_options_of(p, facts)
    for hook, kwargs in (("configure_boot", {"xen_options": xen_options}), ("configure_network", {})):
        for plugin, result in call_each(p.pm, hook, facts=facts, host=p.host, **kwargs):
            if result is not None:  # first result wins
                changes += _changes(plugin, hook, result)
                break
    return changes


def summary(outcomes: list[Outcome], results: list[str] | None = None) -> dict:
    actions = results or [o.action for o in outcomes]
    return {"changed": sum(a in (CHANGE, "changed") for a in actions),
            "unchanged": sum(a == "unchanged" for a in actions),
            "pending": sum(a == PENDING for a in actions)}


def blocked(outcomes: list[Outcome], target) -> str | None:
    """Why the run must stop before changing anything: commands that cannot run on
    this target (unless --files-only)."""
    stuck = [o for o in outcomes if o.action == PENDING]
    if stuck and not target.files_only:
        first = stuck[0]
        why = first.reason.removeprefix("left for the host: ").split("; needed:")[0]
        return (f"{target}: {len(stuck)} command(s) cannot run here, first {' '.join(first.change.argv)}: {why};"
                " nothing was changed. Give --files-only to write the files and leave the commands for the host")
    return None


def interrupted_runs(target) -> list[str]:
    return [r for r in run_ids(target) if (j := Journal.read(target, r)).records and j.ended is None]


@dataclass
class Result:
    host: str
    target: str
    outcomes: list[Outcome]
    status: str  # planned, applied, nothing to do, not applied
    run: str | None = None
    results: list[str] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        return summary(self.outcomes, self.results)


def setup(options: Options, confirm) -> Result:
    """Plan (and unless --dry, apply) one host. ``confirm(result)`` is asked before
    applying when --yes was not given; it returns True to go on."""
    return setup_prepared(prepare(options), options, confirm)


def setup_prepared(p: Prepared, options: Options, confirm) -> Result:
    """``setup`` of a host already prepared (a fleet prepares every host first, so
    that a bad configuration stops the run before any host is touched)."""
    read_ahead(p, lambda: make_plan(p, gather_facts(p)))
    return execute(p, lambda: (make_plan(p, gather_facts(p)), []), options, confirm)


def read_ahead(p: Prepared, make) -> None:
    """On an SSH host: run the whole read side of a run (xenrun's state, every
    plugin's facts, ``make()``'s plan and its assessment) against
    the target's cache, quietly, fetching what it asks for in bulk, a round per
    level of reads that depend on others; facts and plan then take no round trip
    of their own. Elsewhere nothing."""
    def reads():
        with logs.quiet():
            p.target.lstat(f"{STATE_DIR}/lock")  # taken before an apply
            read_state(p.target)
            assess(make(), p.target, owed_commands(p.target))
    p.target.read_ahead(reads)


def execute(p: Prepared, make, options: Options, confirm, notes_first=()) -> Result:
    """Assess ``make()`` -> (changes, notes) and show it (--dry), or apply it under
    the target's lock. Used by setup and the domain tasks alike.

    The plan is made first without the lock, so a run that is refused or has
    nothing to do leaves no trace on the target; then, under the lock, an
    interrupted run is undone (and the plan made again), and the plan applied."""
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        changes, notes = make()
        notes = list(notes_first) + list(notes)
        owed = owed_commands(p.target)
        outcomes = assess(changes, p.target, owed)
        stop = blocked(outcomes, p.target)
        interrupted = interrupted_runs(p.target)
        if options.dry:
            notes += [f"an interrupted run ({r}) will be undone first by the next apply" for r in interrupted]
            return Result(p.host.name, str(p.target), outcomes, "planned", notes=notes + ([stop] if stop else []))
        if stop:
            raise TargetError(stop)
        if not interrupted and not any(o.action == CHANGE for o in outcomes) and \
                still_owed(outcomes, owed) == owed:
            return Result(p.host.name, str(p.target), outcomes, "nothing to do", notes=notes)
        applier = Applier(p.target, p.host.name, log)
        applier.lock()
        try:
            recovered = applier.recover()
            if recovered:
                changes, notes = make()
                notes = list(notes_first) + list(notes)
            owed = owed_commands(p.target)
            outcomes = assess(changes, p.target, owed)  # again, under the lock
            if stop := blocked(outcomes, p.target):
                raise TargetError(stop)
            result = Result(p.host.name, str(p.target), outcomes, "planned",
                            notes=[f"undid interrupted run {r}" for r in recovered] + notes)
            if not any(o.action == CHANGE for o in outcomes):
                remember_owed(p.target, owed, still_owed(outcomes, owed))
                result.status = "nothing to do"
                return result
            if not options.yes and not confirm(result):
                result.status = "not applied"
                return result
            done = applier.apply(outcomes)
            remember_owed(p.target, owed, still_owed(outcomes, owed, done["results"]), done["run"])
            result.status, result.run, result.results = "applied", done["run"], done["results"]
            return result
        finally:
            applier.unlock()


def rollback(options: Options, confirm) -> Result:
    """Put back the originals of the last committed run (one run per call)."""
    p = prepare(options)
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        applier = Applier(p.target, p.host.name, log)
        if not options.dry:
            applier.lock()
        try:
            recovered = [] if options.dry else applier.recover()
            run_id, changes = rollback_changes(p.target)
            outcomes = assess(changes, p.target)
            result = Result(p.host.name, str(p.target), outcomes, "planned",
                            notes=[f"undid interrupted run {r}" for r in recovered]
                            + ([f"rolling back run {run_id}"] if run_id else ["no run to roll back"]))
            if options.dry or run_id is None:
                return result
            if not options.yes and not confirm(result):
                result.status = "not applied"
                return result
            done = Applier(p.target, p.host.name, log, kind="rollback", rollback_of=run_id).apply(outcomes)
            remove_created_folders(p.target, run_id)
            owed, dropped = owed_commands(p.target), left_by(p.target, run_id)
            if dropped:  # what that run left for the host follows files that are back as they were
                remember_owed(p.target, owed, owed - dropped)
                result.notes += [f"no longer left for the host (run {run_id} is rolled back): {' '.join(argv)}"
                                 for argv in sorted(dropped)]
            if done["run"] is None:  # nothing differed: record the rollback all the same
                j = Journal(p.target, f"{run_id}-rb")
                p.target.makedirs(j.folder)
                j.write(op="begin", kind="rollback", rollback_of=run_id)
                j.write(op="commit")
            result.status, result.run, result.results = "applied", done["run"], done["results"]
            return result
        finally:
            if not options.dry:
                applier.unlock()


def facts(options: Options) -> tuple[str, Facts]:
    p = prepare(options)
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        return p.host.name, gather_facts(p)


def plugin_table(options: Options) -> list[dict]:
    """Every plugin that exists, what it implements, and whether this host selects it."""
    try:
        selected = prepare(options).spec.selected
    except UsageError:
        selected = ()
    rows = []
    third = registry.third_party()
    for name in registry.known_names():
        source = "builtin" if name in registry.BUILTIN else f"entry point {third[name].value}"
        try:
            module = registry.load(name)
            hooks = [h for h in registry.hook_names() if hasattr(module, h)]
        except UsageError as e:
            hooks = [f"(failed to load: {e})"]
        rows.append({"name": name, "source": source, "hooks": hooks, "selected": name in selected})
    return rows


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


__all__ = ["Options", "setup", "setup_prepared", "rollback", "facts", "plugin_table", "STATE_DIR"]


# Serial consoles for boot-check: Xen on COM1 (QEMU's stdio), dom0 on Xen's hvc0.
CHECK_XEN_OPTIONS = ["console=com1", "com1=115200,8n1"]
CHECK_LINUX_OPTIONS = ["console=hvc0"]
UNTIL = {"kernel": "dom0 kernel", "userspace": "hypervisor=xen"}


def xen_options_of(p: Prepared, facts: Facts) -> list[str]:
    options: list[str] = []
    for _plugin, result in call_each(p.pm, "xen_options", facts=facts, host=p.host):
        options += list(result or [])
    return options


@dataclass
class BootCheck:
    host: str
    kind: str
    ok: bool
    seconds: float
    stages: dict
    reason: str
    log: str


def boot_check(options: Options, until: str = "kernel", progress=None, timeout: float = 300.0) -> BootCheck:
    """Boot the host's planned Xen entry in QEMU with the host's own Xen, kernel
    and initramfs (read through the target), and report whether Xen started and
    handed over to the dom0 kernel."""
    import tempfile
    from pathlib import Path

    from xenrun import bootcheck

    if until not in UNTIL:
        raise UsageError(f"--until: {until!r} is not one of: {', '.join(UNTIL)}")
    p = prepare(options)
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        facts = gather_facts(p)
        planned = xen_options_of(p, facts)
        xen_options = planned + [o for o in CHECK_XEN_OPTIONS if o not in planned]
        entry = None
        for _plugin, result in call_each(p.pm, "boot_entry", facts=facts, host=p.host, xen_options=xen_options,
                                         linux_options=CHECK_LINUX_OPTIONS):
            if result is not None:
                entry = result
                break
        if entry is None:
            raise UsageError(f"{p.host.name}: boot-check needs a boot plugin (boot = {p.spec.boot!r} in plugins.toml)")
        missing = bootcheck.missing_tools(entry.kind)
        if missing:
            raise UsageError(f"boot-check ({entry.kind}) needs: {', '.join(missing)}")
        with tempfile.TemporaryDirectory(prefix="xenrun-boot-check-") as tmp:
            work = Path(tmp)
            local = {}
            for inside, host_path in entry.files.items():
                data = p.target.read(host_path)
                if data is None:
                    raise UsageError(f"{p.host.name}: {host_path} (for {inside} in the {entry.kind} image) does not exist")
                dest = work / "files" / inside
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                local[inside] = dest
            if entry.validate:
                config_file = work / "config-to-check"
                config_file.write_text(entry.config)
                argv = [str(config_file) if a == "{}" else a for a in entry.validate]
                checked = subprocess.run(argv, capture_output=True, text=True)
                if checked.returncode != 0:
                    return BootCheck(p.host.name, entry.kind, False, 0.0, {}, f"{' '.join(entry.validate)} rejected"
                                     f" the {entry.kind} configuration: {(checked.stderr or checked.stdout).strip()}",
                                     entry.config)
            if progress:
                progress(f"building the {entry.kind} image")
            if entry.kind == "grub":
                image = bootcheck.build_grub_iso(work, entry.config, local)
            elif entry.kind == "syslinux":
                image = bootcheck.build_syslinux_image(work, entry.config, local)
            else:
                prefix = entry.config_path.rsplit("/", 1)[0] + "/"
                xen_efi = local.pop(prefix + "BOOTX64.EFI")
                image = bootcheck.build_esp_image(work, xen_efi, entry.config,
                                                  {k.removeprefix(prefix): v for k, v in local.items()})
            # the VM must hold the host's dom0_mem and Xen's own share beside it
            dom0 = (p.host.settings["xen"].get("dom0_mem") or 0) >> 20
            memory = max(bootcheck.DEFAULT_MEMORY_MB, dom0 + 512)
            result = bootcheck.boot(image, entry.kind, timeout=timeout, progress=progress, require=UNTIL[until],
                                    workdir=work, follow_fallback=entry.fallback, memory_mb=memory)
        return BootCheck(p.host.name, entry.kind, result.ok, result.seconds, dict(result.marker_seconds),
                         result.reason, result.log)


def promote(options: Options, confirm) -> Result:
    """Make Xen the default boot entry, only on a host that runs as Domain-0
    (S15: `xl list` shows it), through the boot plugin's promote_xen."""
    p = prepare(options)
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        facts = gather_facts(p)
        if not options.dry:
            if not facts.xen_dom0:
                raise UsageError(f"{p.host.name}: not running as Xen's Domain-0 (/proc/xen/capabilities);"
                                 " reboot into Xen first (setup boots it once), then promote")
            listing = p.target.run(("xl", "list"), timeout=60)
            if listing.rc != 0 or not re.search(r"^Domain-0\s", listing.stdout, re.M):
                raise UsageError(f"{p.host.name}: `xl list` does not show Domain-0 (S15, S24): "
                                 f"{(listing.stderr or listing.stdout).strip()[:200]}")
        changes: list[Change] = []
        for plugin, result in call_each(p.pm, "promote_xen", facts=facts, host=p.host):
            if result is not None:
                changes = _changes(plugin, "promote_xen", result)
                break
        outcomes = assess(changes, p.target)
        result = Result(p.host.name, str(p.target), outcomes, "planned")
        stop = blocked(outcomes, p.target)
        if options.dry or not any(o.action == CHANGE for o in outcomes):
            result.status = "planned" if options.dry else "nothing to do"
            if stop:
                result.notes.append(stop)
            return result
        if stop:
            raise TargetError(stop)
        if not options.yes and not confirm(result):
            result.status = "not applied"
            return result
        applier = Applier(p.target, p.host.name, log, kind="promote")
        applier.lock()
        try:
            done = applier.apply(outcomes)
        finally:
            applier.unlock()
        result.status, result.run, result.results = "applied", done["run"], done["results"]
        return result
