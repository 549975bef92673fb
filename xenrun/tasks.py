"""The tasks, shared by ``invoke`` in a site folder (tasks.py: ``from xenrun.tasks
import ns``) and the installed ``xenrun`` command. Each task parses its flags and
calls into xenrun.run; an error of the user's making becomes one line and an exit
code, anything else keeps its traceback."""

from __future__ import annotations

import json
import sys

from invoke import Collection, task
from invoke.exceptions import Exit

from xenrun import domain_tasks, fleet, logs, report, run, taskhelp
from xenrun.config import load_site

HELP = {**taskhelp.HELP,
        "host": taskhelp.HELP["host"] + "; several: a,b,c or @GROUP ([groups] in plugins.toml)",
        "all": "every host in plugins.toml, in parallel",
        "parallel": f"hosts at once with --all or several --host (default {fleet.DEFAULT_PARALLEL})"}
_guard, _plan_only, _show = taskhelp.guard, taskhelp.plan_only, taskhelp.show


_dry = taskhelp.dry


def _help(*names: str) -> dict:
    return {n: HELP[n] for n in names}


def _options(**kw) -> run.Options:
    return run.Options(**kw)


_MANY = ("root", "host", "config", "dry", "yes", "files_only", "format", "all", "parallel")


def _one_or_many(flow: str, single, root, host, config, dry, yes, files_only, fmt, all_hosts, parallel) -> None:
    """A flow on one host (``single(options)`` -> Result), or on several hosts
    (--all, --host a,b,@group) through the fleet: each isolated, a table at the end."""
    logs.configure()
    if fleet.is_fleet(host, all_hosts):
        return _fleet(flow, root, host, config, dry, yes, files_only, fmt, all_hosts, parallel)
    opts = _guard(lambda: _options(root=root, host=host, config=config, dry=_plan_only(dry, yes), yes=yes,
                                   files_only=files_only, format=fmt))
    _show(_guard(lambda: single(opts)), fmt)


@task(auto_shortflags=False, help=_help(*_MANY))
def setup(c, root=None, host=None, config=None, dry=False, yes=False, files_only=False, format="text",
          all=False, parallel=fleet.DEFAULT_PARALLEL):
    """Make this host (or --root, or --host, or --all hosts) a Xen dom0: facts, plan, apply."""
    _one_or_many("setup", lambda o: run.setup(o, taskhelp.confirm), root, host, config, _dry(c, dry), yes, files_only,
                 format, all, parallel)


def _fleet(flow, root, host, config, dry, yes, files_only, fmt, all_hosts, parallel) -> None:
    """A flow on many hosts: progress on stderr, plans (--dry) and the table or JSON
    on stdout; exit 1 when any host did not end well (3 when only plugins' faults
    stopped them), 2 when nothing could start."""
    if root:
        raise Exit("xenrun: --root names one machine; not with --all or several hosts", code=2)
    dry = flow != "facts" and _plan_only(dry, yes)
    opts = _guard(lambda: _options(config=config, dry=dry, yes=yes, files_only=files_only, format=fmt))
    names = _guard(lambda: fleet.select(load_site(config), host, all_hosts))

    def progress(done, total, host_run) -> None:
        # one write of a whole line: threads' log lines never split it
        sys.stderr.write(report.progress_line(done, total, host_run) + "\n")
        sys.stderr.flush()

    def ask(planned) -> bool:
        sys.stdout.write(report.fleet_text(planned, plans=True))
        hosts = [r for r in planned.hosts if r.ok and r.summary()["changed"]]
        changes = sum(r.summary()["changed"] for r in hosts)
        return input(f"Apply {changes} change(s) to {len(hosts)} host(s)? [y/N] ").strip().lower() in ("y", "yes")

    result = _guard(lambda: fleet.run_hosts(opts, names, parallel=_parallel(parallel), ask=ask, progress=progress,
                                            flow=flow))
    if fmt == "json":
        sys.stdout.write(report.fleet_json(result))
    else:
        if flow == "facts":
            for r in result.hosts:
                if r.facts is not None:
                    _print_facts(r.host, r.facts)
        sys.stdout.write(report.fleet_text(result, plans=dry))
    if result.exit_code:
        raise Exit(code=result.exit_code)


def _parallel(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Exit(f"xenrun: --parallel: {value!r} is not a number of hosts", code=2) from None


@task(auto_shortflags=False, help=_help(*_MANY))
def rollback(c, root=None, host=None, config=None, dry=False, yes=False, files_only=False, format="text",
             all=False, parallel=fleet.DEFAULT_PARALLEL):
    """Put back the files of the last applied run (once more to go further back)."""
    _one_or_many("rollback", lambda o: run.rollback(o, taskhelp.confirm), root, host, config, _dry(c, dry), yes, files_only,
                 format, all, parallel)


@task(auto_shortflags=False, help=_help("root", "host", "config", "format", "all", "parallel"))
def facts(c, root=None, host=None, config=None, format="text", all=False, parallel=fleet.DEFAULT_PARALLEL):
    """Show what xenrun detects on the host (steps S1 to S5)."""
    logs.configure()
    if fleet.is_fleet(host, all):
        return _fleet("facts", root, host, config, False, False, False, format, all, parallel)
    opts = _guard(lambda: _options(root=root, host=host, config=config, format=format))
    name, found = _guard(lambda: run.facts(opts))
    data = found.to_json()
    if format == "json":
        print(json.dumps({"host": name, "facts": data}, indent=2))
        return
    _print_facts(name, data)


def _print_facts(name: str, data: dict) -> None:
    print(f"host {name}")
    skip = {"cpu_flags", "packages", "fstab"}
    for key in sorted(data):
        if key not in skip:
            print(f"  {key}: {json.dumps(data[key])}")
    print(f"  packages: {len(data.get('packages', {}))} installed; cpu_flags: {len(data.get('cpu_flags', []))}")


@task(auto_shortflags=False, help=_help("root", "host", "config", "format"))
def plugins(c, root=None, host=None, config=None, format="text"):
    """List the plugins that exist, their hooks, and which this host selects."""
    logs.configure()
    opts = _guard(lambda: _options(root=root, host=host, config=config, format=format))
    rows = run.plugin_table(opts)
    if format == "json":
        print(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        mark = "*" if r["selected"] else " "
        print(f"{mark} {r['name']:<10} {r['source']:<30} {', '.join(r['hooks'])}")
        _print_settings(r["settings"], "[plugin.{}]")
        _print_settings(r["disk_keys"], '[[domain.NAME.disks]] backend = "{}":')
        _print_settings(r["install_keys"], '[domain.NAME.install] method = "{}":')


def _print_settings(declared: dict, where: str) -> None:
    if "error" in declared:
        print(f"    settings: {declared['error']}")
        return
    for section, keys in declared.items():
        for key, s in keys.items():
            default = (" (required)" if s["required"] else "" if s["default"] is None
                       else f" (default {json.dumps(s['default'], default=str)})")
            print(f"    {where.format(section)} {key}{default}: {s['help'] or 'no help given'}")
            if s["examples"]:
                print(f"        e.g. {'; '.join(f'{key} = {json.dumps(e, default=str)}' for e in s['examples'])}")


@task(auto_shortflags=False, help={**_help("root", "host", "config", "format"),
                                   "until": "kernel (default: Xen handed over to dom0) or userspace (dom0's"
                                            " initramfs ran; for test images that report it)",
                                   "timeout": "seconds before giving up (default 300)"})
def boot_check(c, root=None, host=None, config=None, format="text", until="kernel", timeout=300):
    """Boot the host's planned Xen entry in QEMU before anyone reboots the host."""
    logs.configure()
    opts = _guard(lambda: _options(root=root, host=host, config=config, format=format))

    def progress(stage: str) -> None:
        print(f"boot-check: {stage}", file=sys.stderr, flush=True)

    result = _guard(lambda: run.boot_check(opts, until=until, progress=progress, timeout=float(timeout)))
    if format == "json":
        print(json.dumps({"host": result.host, "kind": result.kind, "ok": result.ok, "seconds": round(result.seconds, 1),
                          "stages": {k: round(v, 1) for k, v in result.stages.items()}, "reason": result.reason,
                          "log": "" if result.ok else result.log}, indent=2))
    else:
        stages = ", ".join(f"{k} at {v:.1f} s" for k, v in result.stages.items())
        verdict = "OK" if result.ok else "FAILED"
        print(f"boot-check {result.host} ({result.kind}): {verdict} in {result.seconds:.1f} s ({stages or 'no stage reached'})")
        if not result.ok:
            print(f"reason: {result.reason}\n--- console ---\n{result.log[-6000:]}")
    if not result.ok:
        raise Exit(code=1)


@task(auto_shortflags=False, help=_help(*_MANY))
def promote(c, root=None, host=None, config=None, dry=False, yes=False, files_only=False, format="text",
            all=False, parallel=fleet.DEFAULT_PARALLEL):
    """Make Xen the default boot entry once `xl list` shows Domain-0 (S10, S15)."""
    _one_or_many("promote", lambda o: run.promote(o, taskhelp.confirm), root, host, config, _dry(c, dry), yes, files_only,
                 format, all, parallel)


ns = Collection(setup, rollback, facts, plugins, boot_check, promote)
ns.add_collection(domain_tasks.ns, "domain")
