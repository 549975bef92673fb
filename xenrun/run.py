"""The flow of one host: site -> target -> plugins -> facts -> plan -> apply.

tasks.py calls ``setup``, ``facts``, ``rollback`` and ``plugins`` here; everything
of the user's making raises a UsageError (exit 2) before the target is touched.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
from dataclasses import dataclass

import structlog

from xenrun import plugins as registry
from xenrun.apply import STATE_DIR, Applier, Journal, remove_created_folders, rollback_changes, run_ids
from xenrun.changes import Change
from xenrun.config import Host, HostSpec, Site, load_site
from xenrun.errors import TargetError, UsageError
from xenrun.facts import Facts, Probe
from xenrun.plan import CHANGE, PENDING, Outcome, assess
from xenrun.settings import name as check_name
from xenrun.target import LocalTarget

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
    target: LocalTarget
    pm: object
    host: Host


def prepare(options: Options) -> Prepared:
    """Everything that can be checked before reading the target: the site, the
    host's selection, its plugins and their settings, and the target itself."""
    site = load_site(options.config)
    if options.host and site.host_names and options.host not in site.host_names and not options.root:
        raise UsageError(f"--host: no host {options.host!r} in {site.file} (hosts: {', '.join(site.host_names)})")
    root = options.root
    if root is None and options.host:
        spec = site.host(options.host)
        if spec.root is not None:
            root = str(spec.root)
        elif spec.address:
            raise UsageError(f"{options.host}: SSH targets (address = {spec.address!r}) are not built yet;"
                             " use --root or run xenrun on the host itself")
    if root is not None:
        from pathlib import Path
        if not Path(root).is_dir():
            raise UsageError(f"--root: {root} is not a folder")
    target = LocalTarget(root or "/", files_only=options.files_only)
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
    return Prepared(site, spec, target, pm, Host(spec, settings, site))


def _hostname(target: LocalTarget) -> str:
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
    xen_options: list[str] = []
    for plugin, result in call_each(p.pm, "xen_options", facts=facts, host=p.host):
        xen_options += list(result or [])
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
    p = prepare(options)
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        if options.dry:
            notes = [f"an interrupted run ({r}) will be undone first by the next apply" for r in interrupted_runs(p.target)]
            outcomes = assess(make_plan(p, gather_facts(p)), p.target)
            stop = blocked(outcomes, p.target)
            return Result(p.host.name, str(p.target), outcomes, "planned", notes=notes + ([stop] if stop else []))
        # Plan without the lock first: a run that is refused or has nothing to do
        # leaves no trace on the target. Then lock, and plan again under the lock.
        interrupted = interrupted_runs(p.target)
        changes = make_plan(p, gather_facts(p)) if not interrupted else None
        if changes is not None:
            outcomes = assess(changes, p.target)
            stop = blocked(outcomes, p.target)
            if stop:
                raise TargetError(stop)
            if not any(o.action == CHANGE for o in outcomes):
                return Result(p.host.name, str(p.target), outcomes, "nothing to do")
        applier = Applier(p.target, p.host.name, log)
        applier.lock()
        try:
            recovered = applier.recover()
            if recovered or changes is None:
                changes = make_plan(p, gather_facts(p))
            outcomes = assess(changes, p.target)
            stop = blocked(outcomes, p.target)
            if stop:
                raise TargetError(stop)
            result = Result(p.host.name, str(p.target), outcomes, "planned",
                            notes=[f"undid interrupted run {r}" for r in recovered])
            if not any(o.action == CHANGE for o in outcomes):
                result.status = "nothing to do"
                return result
            if not options.yes and not confirm(result):
                result.status = "not applied"
                return result
            done = applier.apply(outcomes)
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


__all__ = ["Options", "setup", "rollback", "facts", "plugin_table", "STATE_DIR"]
