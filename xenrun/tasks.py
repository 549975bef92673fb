"""The tasks, shared by ``invoke`` in a site folder (tasks.py: ``from xenrun.tasks
import ns``) and the installed ``xenrun`` command. Each task parses its flags and
calls into xenrun.run; an error of the user's making becomes one line and an exit
code, anything else keeps its traceback."""

from __future__ import annotations

import json
import sys

from invoke import Collection, task
from invoke.exceptions import Exit

from xenrun import fleet, logs, report, run
from xenrun.config import load_site
from xenrun.errors import XenrunError

HELP = {
    "root": "a machine's root in a folder instead of this machine",
    "host": "the host's name in plugins.toml (default: the target's /etc/hostname)",
    "config": "the site's plugins.toml (default: ./plugins.toml)",
    "dry": "show the plan (diffs and commands) and change nothing",
    "yes": "apply without asking",
    "files_only": "with --root: write the files, list the commands left for the host",
    "format": "text (default) or json",
}


def _help(*names: str) -> dict:
    return {n: HELP[n] for n in names}


def _options(**kw) -> run.Options:
    return run.Options(**kw)


def _guard(fn):
    """Run ``fn``; XenrunError -> one line on stderr and its exit code."""
    try:
        return fn()
    except XenrunError as e:
        raise Exit(f"xenrun: {e}", code=e.exit_code) from None


def _can_ask() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _plan_only(dry: bool, yes: bool) -> bool:
    """Without --yes and without a terminal to ask on, only plan (as --dry)."""
    if not dry and not yes and not _can_ask():
        print("Not applied: no terminal to ask on; give --yes to apply. Showing the plan only.", file=sys.stderr)
        return True
    return dry


def _confirm(fmt: str):
    def ask(result) -> bool:
        sys.stdout.write(report.text(result))
        answer = input(f"Apply {result.summary()['changed']} change(s) to {result.host}? [y/N] ")
        return answer.strip().lower() in ("y", "yes")
    return ask


def _show(result, fmt: str) -> None:
    sys.stdout.write(report.as_json(result) if fmt == "json" else report.text(result))


@task(auto_shortflags=False, help={
    **HELP, "host": HELP["host"] + "; several: a,b,c or @GROUP ([groups] in plugins.toml)",
    "all": "every host in plugins.toml, in parallel", "parallel": "hosts at once with --all or several --host"
    f" (default {fleet.DEFAULT_PARALLEL})"})
def setup(c, root=None, host=None, config=None, dry=False, yes=False, files_only=False, format="text",
          all=False, parallel=fleet.DEFAULT_PARALLEL):
    """Make this host (or --root, or --host, or --all hosts) a Xen dom0: facts, plan, apply."""
    logs.configure()
    if fleet.is_fleet(host, all):
        return _setup_fleet(root, host, config, dry, yes, files_only, format, all, parallel)
    opts = _guard(lambda: _options(root=root, host=host, config=config, dry=_plan_only(dry, yes), yes=yes,
                                   files_only=files_only, format=format))
    result = _guard(lambda: run.setup(opts, _confirm(format)))
    _show(result, format)


def _setup_fleet(root, host, config, dry, yes, files_only, fmt, all_hosts, parallel) -> None:
    """setup on many hosts: progress on stderr, plans (--dry) and the table or JSON on
    stdout; exit 1 when any host did not end well, 2 when nothing could start."""
    if root:
        raise Exit("xenrun: --root names one machine; not with --all or several hosts", code=2)
    dry = _plan_only(dry, yes)
    opts = _guard(lambda: _options(config=config, dry=dry, yes=yes, files_only=files_only, format=fmt))
    names = _guard(lambda: fleet.select(load_site(config), host, all_hosts))

    def progress(done, total, host_run) -> None:
        # one write of a whole line: threads' log lines never split it
        sys.stderr.write(report.progress_line(done, total, host_run) + "\n")
        sys.stderr.flush()

    def ask(planned) -> bool:
        sys.stdout.write(report.fleet_text(planned, plans=True))
        hosts = [r for r in planned.runs if r.ok and r.summary()["changed"]]
        changes = sum(r.summary()["changed"] for r in hosts)
        return input(f"Apply {changes} change(s) to {len(hosts)} host(s)? [y/N] ").strip().lower() in ("y", "yes")

    result = _guard(lambda: fleet.setup(opts, names, parallel=int(parallel), ask=ask, progress=progress))
    sys.stdout.write(report.fleet_json(result) if fmt == "json" else report.fleet_text(result, plans=dry))
    if not result.ok:
        raise Exit(code=1)


@task(auto_shortflags=False, help=_help("root", "host", "config", "dry", "yes", "format"))
def rollback(c, root=None, host=None, config=None, dry=False, yes=False, format="text"):
    """Put back the files of the last applied run (once more to go further back)."""
    logs.configure()
    opts = _guard(lambda: _options(root=root, host=host, config=config, dry=_plan_only(dry, yes), yes=yes,
                                   format=format))
    result = _guard(lambda: run.rollback(opts, _confirm(format)))
    _show(result, format)


@task(auto_shortflags=False, help=_help("root", "host", "config", "format"))
def facts(c, root=None, host=None, config=None, format="text"):
    """Show what xenrun detects on the host (steps S1 to S5)."""
    logs.configure()
    opts = _guard(lambda: _options(root=root, host=host, config=config, format=format))
    name, found = _guard(lambda: run.facts(opts))
    data = found.to_json()
    if format == "json":
        print(json.dumps({"host": name, "facts": data}, indent=2))
        return
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
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "*" if r["selected"] else " "
        print(f"{mark} {r['name']:<10} {r['source']:<30} {', '.join(r['hooks'])}")


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


@task(auto_shortflags=False, help=_help("root", "host", "config", "dry", "yes", "files_only", "format"))
def promote(c, root=None, host=None, config=None, dry=False, yes=False, files_only=False, format="text"):
    """Make Xen the default boot entry once `xl list` shows Domain-0 (S10, S15)."""
    logs.configure()
    opts = _guard(lambda: _options(root=root, host=host, config=config, dry=_plan_only(dry, yes), yes=yes,
                                   files_only=files_only, format=format))
    result = _guard(lambda: run.promote(opts, _confirm(format)))
    _show(result, format)


ns = Collection(setup, rollback, facts, plugins, boot_check, promote)

from xenrun import domain_tasks  # noqa: E402
ns.add_collection(domain_tasks.ns, "domain")
