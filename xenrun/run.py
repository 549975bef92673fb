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

from xenrun import hooks, logs, registry
from xenrun.apply import Applier, remove_created_folders, rollback_changes
from xenrun.state import STATE_DIR, Journal, left_by, pending_commands, read_state, remember_pending, run_ids, still_pending
from xenrun.changes import Change, RunCommand
from xenrun.config import Host, HostSpec, Site, load_site
from xenrun.errors import ApplyError, TargetError, UsageError
from xenrun.facts import Facts, Probe
from xenrun.hooks import HostPlugins
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
        if self.root is not None:
            from pathlib import Path
            if not self.root.strip() or "\0" in self.root:
                raise UsageError("--root: empty; give a machine's root folder, or leave --root out for this machine")
            if Path(self.root).resolve() == Path("/"):
                raise UsageError(f"--root: {self.root!r} is this machine's own root;"
                                 " leave --root out to mean this machine")
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
    plugins: HostPlugins
    host: Host

    @property
    def pm(self):
        """The host's pluggy manager (for tests that call a hook directly)."""
        return self.plugins.pm


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
    plugins, host = hooks.select(site, spec)
    if site.file is not None and not spec.configured:
        plugins.notes.append(f"host {name!r} has no [hosts.{name}] in {site.file}: its [defaults] were used")
    target.warm_up_with(lambda: warm_up_reads(target, plugins))
    return Prepared(site, spec, target, plugins, host)


def with_disk_plugins(p: Prepared, backends, installers=()) -> Prepared:
    """``p`` with the disk plugins named by ``backends`` selected too (a domain's
    disk backend selects its plugin), and the ``installers`` (its install method),
    their settings checked."""
    extra = [b for b in dict.fromkeys(backends) if b not in p.spec.selected]
    more = [i for i in dict.fromkeys(installers) if i not in p.spec.selected and i not in extra]
    if not extra and not more:
        return p
    spec = dataclasses.replace(p.spec, disks=tuple(p.spec.disks) + tuple(extra),
                               plugins=tuple(p.spec.plugins) + tuple(more))
    plugins, host = hooks.select(p.site, spec)
    plugins.notes[:0] = p.plugins.notes
    return dataclasses.replace(p, spec=spec, plugins=plugins, host=host)


def warm_up_reads(target: Target, plugins: HostPlugins) -> None:
    """What a target with a cache (SSH) reads ahead before its first read, when no
    read_ahead came first (facts, rollback): the journal scan of a setup and the
    detect_hardware of the host's plugins, against the cache (their reads then
    cost no round trip each)."""
    target.lstat(f"{STATE_DIR}/lock")  # taken before an apply
    read_state(target)
    before = len(plugins.notes)
    try:
        with logs.quiet():
            plugins.facts(Probe(target))
    except Exception:  # noqa: BLE001 - choking on placeholders; the real run will tell
        pass
    finally:
        del plugins.notes[before:]  # the real planning notes them


def _hostname(target: Target) -> str:
    data = target.read("/etc/hostname")
    name = data.decode().strip() if data else (socket.gethostname() if target.live else "")
    try:
        return check_name(name.split(".")[0])
    except ValueError:
        raise UsageError(f"cannot tell the host's name from {target} /etc/hostname; give --host") from None


def gather_facts(p: Prepared) -> Facts:
    return p.plugins.facts(Probe(p.target))


def make_plan(p: Prepared, facts: Facts) -> list[Change]:
    changes = p.plugins.host_changes(facts, p.host)
    changes += p.plugins.boot_changes(facts, p.host, p.plugins.xen_options(facts, p.host))
    changes += p.plugins.network_changes(facts, p.host)
    return changes


@dataclass
class Plan:
    """What a flow's ``make()`` returns: the Changes, notes for the user, and for
    a rollback the run it takes back."""

    changes: list[Change]
    notes: list[str] = dataclasses.field(default_factory=list)
    rollback_of: str | None = None
    takes_back: bool = False  # a rollback: the commands pending are not this plan's to carry out


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
    replanned: bool = False  # the plan of what follows a replan command, made after it ran

    def summary(self) -> dict:
        return summary(self.outcomes, self.results)


def read_ahead(p: Prepared, make) -> None:
    """On an SSH host: run the whole read side of a run (xenrun's state, every
    plugin's facts, ``make()``'s plan and its assessment) against
    the target's cache, quietly, fetching what it asks for in bulk, a round per
    level of reads that depend on others; facts and plan then take no round trip
    of their own. Elsewhere nothing."""
    def reads():
        with logs.quiet():
            before = len(p.plugins.notes)
            p.target.lstat(f"{STATE_DIR}/lock")  # taken before an apply
            read_state(p.target)
            assess(make(), p.target, pending_commands(p.target))
            del p.plugins.notes[before:]  # the real planning notes them
    p.target.read_ahead(reads)


def execute(p: Prepared, make, options: Options, confirm, kind: str = "apply", finish=None) -> Result:
    """The one plan-lock-apply of every flow (setup, promote, rollback, the domain
    tasks, xenrun.testing): assess ``make()`` (a Plan, or (changes, notes)) and
    show it (--dry), or apply it under the target's lock.

    The plan is made first without the lock, so a run that is refused or has
    nothing to do leaves no trace on the target; then, under the lock, an
    interrupted run is undone (and the plan made again), and the plan applied.
    ``kind`` names the run in its journal; ``finish(result, plan)`` runs under the
    lock after an apply (a rollback's own bookkeeping)."""
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        plan = _planned(p, make)
        pending = pending_commands(p.target)
        outcomes = assess(plan.changes, p.target, pending)
        stop = blocked(outcomes, p.target)
        interrupted = interrupted_runs(p.target)
        if options.dry:
            plan.notes += [f"an interrupted run ({r}) will be undone first by the next apply" for r in interrupted]
            if (at := _replan_at(outcomes)) is not None:
                plan.notes.append(f"once `{' '.join(outcomes[at].change.argv)}` has run, what follows it is planned"
                                  " again from what it installed (shown here as planned without it)")
            return Result(p.host.name, str(p.target), outcomes, "planned", notes=plan.notes + ([stop] if stop else []))
        if stop:
            raise TargetError(stop)
        if not interrupted and not _to_do(plan, outcomes, pending):
            return Result(p.host.name, str(p.target), outcomes, "nothing to do", notes=plan.notes)
        applier = Applier(p.target, p.host.name, log, kind=kind)
        applier.lock(room_for=outcomes)
        try:
            recovered = applier.recover()
            if recovered:
                plan = _planned(p, make)
            pending = pending_commands(p.target)
            outcomes = assess(plan.changes, p.target, pending)  # again, under the lock
            if stop := blocked(outcomes, p.target):
                raise TargetError(stop)
            result = Result(p.host.name, str(p.target), outcomes, "planned",
                            notes=[f"undid interrupted run {r}" for r in recovered] + plan.notes)
            if not _to_do(plan, outcomes, pending):
                if not plan.takes_back:
                    remember_pending(p.target, pending, still_pending(outcomes, pending))
                result.status = "nothing to do"
                return result
            if not options.yes and not confirm(result):
                result.status = "not applied"
                return result
            if plan.rollback_of:
                applier = Applier(p.target, p.host.name, log, kind=kind, rollback_of=plan.rollback_of)
            at = None if plan.takes_back else _replan_at(outcomes)
            if at is not None:
                return _apply_replanning(p, make, options, confirm, kind, result, at, pending)
            # a rollback's finish drops what its run left instead
            done = applier.apply(outcomes, None if plan.takes_back else pending_after(outcomes, pending))
            result.status, result.run, result.results = "applied", done["run"], done["results"]
            if finish:
                finish(result, plan)
            return result
        finally:
            applier.unlock()


def pending_after(outcomes: list[Outcome], pending: frozenset):
    """For Applier.apply: the commands pending before and after, from its results."""
    return lambda results: (pending, still_pending(outcomes, pending, results))


def _replan_at(outcomes: list[Outcome]) -> int | None:
    """Where the plan stops to be made again: the first command to run that asks
    for it (a package install), unless nothing follows it."""
    at = next((i for i, o in enumerate(outcomes) if o.action == CHANGE and isinstance(o.change, RunCommand)
               and o.change.replan), None)
    return at if at is not None and at + 1 < len(outcomes) else None


def _apply_replanning(p: Prepared, make, options: Options, confirm, kind: str, result: Result, at: int,
                      pending: frozenset) -> Result:
    """Under the lock: apply the plan up to and including the replan command at
    ``at``, as a run of its own, then gather the facts again, plan again and apply
    the rest as a second run (asked again without --yes). A failure of the second
    run puts its own files back; the first (the install) stays committed, and the
    next setup goes on from there."""
    head = result.outcomes[:at + 1]
    first = Applier(p.target, p.host.name, log, kind=kind).apply(head)
    command = " ".join(head[-1].change.argv)
    read_ahead(p, make)
    plan = _planned(p, make)
    outcomes = assess(plan.changes, p.target, pending)
    if stop := blocked(outcomes, p.target):
        raise TargetError(f"{stop} (run {first['run']}, `{command}`, was applied and is kept)")
    # the plan made again repeats what came before the command (done now)
    same = next((i for i, o in enumerate(outcomes) if isinstance(o.change, RunCommand)
                 and o.change.argv == head[-1].change.argv), -1)
    shown = [o for o in outcomes[:same + 1] if o.action == CHANGE] + outcomes[same + 1:]
    rest = Result(p.host.name, str(p.target), shown, "planned", replanned=True,
                  notes=[f"`{command}` ran (run {first['run']}): what follows was planned again from what it"
                         " installed"] + plan.notes)
    combined = Result(p.host.name, str(p.target), head + shown, "applied", first["run"], first["results"]
                      + [o.action for o in shown], notes=result.notes + [n for n in rest.notes if n not in result.notes])
    if not _to_do(plan, outcomes, pending):
        remember_pending(p.target, pending, still_pending(outcomes, pending))
        return combined
    if not options.yes and not confirm(rest):
        combined.notes.append("the rest of the plan was not applied: run setup again to see it")
        return combined
    try:
        done = Applier(p.target, p.host.name, log, kind=kind).apply(outcomes, pending_after(outcomes, pending))
    except ApplyError as e:
        raise ApplyError(f"{e}; run {first['run']} (`{command}`) before it is kept: the next setup goes on"
                         " from there") from e
    index = {id(o): i for i, o in enumerate(outcomes)}
    combined.run = done["run"]
    combined.results = first["results"] + [done["results"][index[id(o)]] for o in shown]
    return combined


def _planned(p: Prepared, make) -> Plan:
    """``make()`` as a Plan, its notes after those the host had before (plugins'
    notes of this planning only: a plan made again under the lock notes once)."""
    before = len(p.plugins.notes)
    made = make()
    plan = made if isinstance(made, Plan) else Plan(list(made[0]), list(made[1]))
    fresh = p.plugins.notes[before:]
    del p.plugins.notes[before:]
    plan.notes = p.plugins.notes + fresh + plan.notes
    return plan


def _to_do(plan: Plan, outcomes, pending) -> bool:
    """Whether applying would change anything: a change, a command pending that this
    plan carries out, or a rollback to record (even with nothing to put back, so
    that the next rollback goes one run further)."""
    return (plan.rollback_of is not None or any(o.action == CHANGE for o in outcomes)
            or not plan.takes_back and still_pending(outcomes, pending) != pending)


def setup(options: Options, confirm) -> Result:
    """Plan (and unless --dry, apply) one host. ``confirm(result)`` is asked before
    applying when --yes was not given; it returns True to go on."""
    return setup_prepared(prepare(options), options, confirm)


def setup_prepared(p: Prepared, options: Options, confirm) -> Result:
    """``setup`` of a host already prepared (a fleet prepares every host first, so
    that a bad configuration stops the run before any host is touched)."""
    read_ahead(p, lambda: make_plan(p, gather_facts(p)))
    return execute(p, lambda: Plan(make_plan(p, gather_facts(p))), options, confirm)


def rollback(options: Options, confirm) -> Result:
    """Put back the originals of the last committed run (one run per call)."""
    return rollback_prepared(prepare(options), options, confirm)


def rollback_prepared(p: Prepared, options: Options, confirm) -> Result:
    def make() -> Plan:
        run_id, changes = rollback_changes(p.target)
        return Plan(changes, [f"rolling back run {run_id}"] if run_id else ["no run to roll back"], run_id,
                    takes_back=True)

    def finish(result: Result, plan: Plan) -> None:
        run_id = plan.rollback_of
        remove_created_folders(p.target, run_id)
        pending, dropped = pending_commands(p.target), left_by(p.target, run_id)
        if dropped:  # what that run left for the host follows files that are back as they were
            remember_pending(p.target, pending, pending - dropped)
            result.notes += [f"no longer left for the host (run {run_id} is rolled back): {' '.join(argv)}"
                             for argv in sorted(dropped)]
        if result.run is None:  # nothing differed: record the rollback all the same
            j = Journal(p.target, f"{run_id}-rb")
            p.target.makedirs(j.folder)
            j.write(op="begin", kind="rollback", rollback_of=run_id)
            j.write(op="commit")

    return execute(p, make, options, confirm, kind="rollback", finish=finish)


def facts(options: Options) -> tuple[str, Facts]:
    p = prepare(options)
    return p.host.name, facts_prepared(p)


def facts_prepared(p: Prepared) -> Facts:
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        return gather_facts(p)


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
            implemented = [h for h in registry.hook_names() if hasattr(module, h)]
        except UsageError as e:
            implemented, module = [f"(failed to load: {e})"], None
        rows.append({"name": name, "source": source, "hooks": implemented, "selected": name in selected,
                     "settings": _declared(module, "declare_settings"),
                     "disk_keys": _declared(module, "declare_disk_keys"),
                     "install_keys": _declared(module, "declare_install_keys")})
    return rows


def _declared(module, hook: str) -> dict:
    """What a plugin's declare_settings (or declare_disk_keys) hook declares:
    {plugin (or backend): {key: {"default", "help", "examples", "required"}}}, or
    {"error": ...}."""
    if module is None or not hasattr(module, hook):
        return {}
    try:
        declared = getattr(module, hook)() or {}
        return {section: {key: {"default": s.default, "help": s.help, "examples": list(s.examples),
                                "required": s.required}
                          for key, s in keys.items()}
                for section, keys in declared.items()}
    except Exception as e:  # a plugin's fault: listed, not fatal to the listing
        return {"error": f"{hook} raised {type(e).__name__}: {e}"}


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


__all__ = ["Options", "Plan", "execute", "setup", "setup_prepared", "rollback", "rollback_prepared", "promote",
           "promote_prepared", "facts", "facts_prepared", "plugin_table", "STATE_DIR"]


# Serial consoles for boot-check: Xen on COM1 (QEMU's stdio), dom0 on Xen's hvc0.
CHECK_XEN_OPTIONS = ["console=com1", "com1=115200,8n1"]
CHECK_LINUX_OPTIONS = ["console=hvc0"]
UNTIL = {"kernel": "dom0 kernel", "userspace": "hypervisor=xen"}


def xen_options_of(p: Prepared, facts: Facts) -> list[str]:
    return p.plugins.xen_options(facts, p.host)


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
        entry = p.plugins.boot_entry(facts, p.host, xen_options, CHECK_LINUX_OPTIONS)
        if entry is None:
            raise UsageError(f"{p.host.name}: boot-check needs a boot plugin (boot = {p.spec.boot!r} in plugins.toml)")
        image = p.plugins.boot_image(entry)
        if image is None:
            raise UsageError(f"{p.host.name}: no selected plugin builds a boot-check image of a {entry.kind!r} entry"
                             " (the boot_image hook)")
        missing = bootcheck.missing_tools(image.loader)
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
            built = image.build(work, local)
            # the VM must hold the host's dom0_mem and Xen's own share beside it
            dom0 = (p.host.settings["xen"].get("dom0_mem") or 0) >> 20
            memory = max(bootcheck.DEFAULT_MEMORY_MB, dom0 + 512)
            result = bootcheck.boot(built, image.loader, timeout=timeout, progress=progress, require=UNTIL[until],
                                    workdir=work, follow_fallback=entry.fallback, memory_mb=memory)
        return BootCheck(p.host.name, entry.kind, result.ok, result.seconds, dict(result.marker_seconds),
                         result.reason, result.log)


def promote(options: Options, confirm) -> Result:
    """Make Xen the default boot entry, only on a host that runs as Domain-0
    (S15: `xl list` shows it), through the boot plugin's promote_xen."""
    return promote_prepared(prepare(options), options, confirm)


def promote_prepared(p: Prepared, options: Options, confirm) -> Result:
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        facts = gather_facts(p)
        if not options.dry:
            _check_dom0(p, facts)
    return execute(p, lambda: Plan(p.plugins.promote_changes(gather_facts(p), p.host)), options, confirm,
                   kind="promote")


def _check_dom0(p: Prepared, facts: Facts) -> None:
    if not facts.xen_dom0:
        raise UsageError(f"{p.host.name}: not running as Xen's Domain-0 (/proc/xen/capabilities);"
                         " reboot into Xen first (setup boots it once), then promote")
    listing = p.target.execute(("xl", "list"), timeout=60)
    if listing.rc != 0 or not re.search(r"^Domain-0\s", listing.stdout, re.M):
        raise UsageError(f"{p.host.name}: `xl list` does not show Domain-0 (S15, S24): "
                         f"{(listing.stderr or listing.stdout).strip()[:200]}")
