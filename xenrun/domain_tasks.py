"""Guest tasks (S16 to S26): ``xenrun domain.create | list | console | shutdown |
destroy | finish-install | lint``.

Each parses its flags, calls a flow of xenrun.guests (which plans Changes exactly
as setup does and applies them through run.execute, under the target's lock, with
the same journal, originals and rollback), and prints. Guests are read from
domains.toml beside plugins.toml (``--domains`` to give another file) and checked
before anything runs.
"""

from __future__ import annotations

import json
import os

from invoke import Collection, task
from invoke.exceptions import Exit

from xenrun import logs, run, taskhelp
from xenrun.errors import UsageError
from xenrun.guests import (DomainOptions, create, delete, finish_install, host_domains, lint_paths, listing,
                           the_domain, xl_action)

# -- invoke tasks ----------------------------------------------------------------------

HELP = {**taskhelp.HELP,
        "name": "the guest's name (a [domain.NAME] of domains.toml)",
        "domains": "the guests' domains.toml (default: beside plugins.toml)"}


def _h(*names):
    return {n: HELP[n] for n in names}


_guard, _confirm, _show = taskhelp.guard, taskhelp.confirm, taskhelp.show


def _opts(root, host, config, domains, dry, yes, files_only, format) -> DomainOptions:
    return DomainOptions(run.Options(root=root, host=host, config=config, dry=taskhelp.plan_only(dry, yes), yes=yes,
                                     files_only=files_only, format=format), domains)


_PLAN_FLAGS = ("name", "root", "host", "config", "domains", "dry", "yes", "files_only", "format")


def _plan_task(action, root, host, config, domains, dry, yes, files_only, format) -> None:
    """The body of a task that plans and applies: options checked, ``action(opts)``
    run, its result shown."""
    logs.configure()
    opts = _guard(lambda: _opts(root, host, config, domains, dry, yes, files_only, format))
    _show(_guard(lambda: action(opts)), format)


@task(name="create", positional=["name"], auto_shortflags=False, help=_h(*_PLAN_FLAGS))
def create_task(c, name, root=None, host=None, config=None, domains=None, dry=False, yes=False, files_only=False,
                format="text"):
    """Create a guest: its disk, xl config, autostart link, and `xl create` (S16 to S22)."""
    _plan_task(lambda o: create(o, name, _confirm),
               root, host, config, domains, taskhelp.dry(c, dry), yes, files_only, format)


@task(name="finish-install", positional=["name"], auto_shortflags=False,
      help={**_h(*_PLAN_FLAGS), "loader": "how the installed guest boots from its disk: pygrub (default: run in"
                                          " dom0) or pvgrub2 (GRUB inside the guest; needs grub-xen-host)"})
def finish_install_task(c, name, root=None, host=None, config=None, domains=None, dry=False, yes=False,
                        files_only=False, format="text", loader="pygrub"):
    """After a PV install: boot through pygrub or pvgrub2, drop kernel/ramdisk/extra and the ISO (S21)."""
    _plan_task(lambda o: finish_install(o, name, _confirm, loader),
               root, host, config, domains, taskhelp.dry(c, dry), yes, files_only, format)


@task(name="shutdown", positional=["name"], auto_shortflags=False, help=_h(*_PLAN_FLAGS))
def shutdown_task(c, name, root=None, host=None, config=None, domains=None, dry=False, yes=False, files_only=False,
                  format="text"):
    """Shut a guest down cleanly and wait until it is off (S23)."""
    _plan_task(lambda o: xl_action(o, name, "shutdown", _confirm),
               root, host, config, domains, taskhelp.dry(c, dry), yes, files_only, format)


@task(name="destroy", positional=["name"], auto_shortflags=False, help=_h(*_PLAN_FLAGS))
def destroy_task(c, name, root=None, host=None, config=None, domains=None, dry=False, yes=False, files_only=False,
                 format="text"):
    """Stop a guest at once, as pulling its plug (S23); its disks and config stay."""
    _plan_task(lambda o: xl_action(o, name, "destroy", _confirm),
               root, host, config, domains, taskhelp.dry(c, dry), yes, files_only, format)


@task(name="delete", positional=["name"], auto_shortflags=False,
      help={**_h(*_PLAN_FLAGS), "purge": "remove the guest's disks too (image files, logical volumes): cannot be undone"})
def delete_task(c, name, root=None, host=None, config=None, domains=None, dry=False, yes=False, files_only=False,
                format="text", purge=False):
    """Shut a guest down and remove its config and autostart link; its disks stay unless --purge."""
    _plan_task(lambda o: delete(o, name, purge, _confirm),
               root, host, config, domains, taskhelp.dry(c, dry), yes, files_only, format)


@task(name="list", auto_shortflags=False, help=_h("root", "host", "config", "domains", "format"))
def list_task(c, root=None, host=None, config=None, domains=None, format="text"):
    """The host's guests: config, autostart, running (S23)."""
    logs.configure()
    opts = _guard(lambda: DomainOptions(run.Options(root=root, host=host, config=config, format=format), domains))
    data = _guard(lambda: listing(opts))
    if format == "json":
        print(json.dumps(data, indent=2))
        return
    print(f"host {data['host']} ({data['target']})")
    for r in data["domains"]:
        state = {None: "unknown", True: "running", False: "off"}[r["running"]]
        print(f"  {r['name']:<20} {r['type']:<4} {r['memory_mib']:>6} MiB  {state:<8}"
              f" {'config' if r['config'] else 'no config'}{', autostart' if r['autostart'] else ''}")
    for other in data["other_running"]:
        print(f"  {other:<20} (running, not in domains.toml)")
    if data["note"]:
        print(f"  note: {data['note']}")


@task(name="console", positional=["name"], auto_shortflags=False,
      help=_h("name", "root", "host", "config", "domains", "dry"))
def console_task(c, name, root=None, host=None, config=None, domains=None, dry=False):
    """Attach to a guest's console (S23; leave with Ctrl-]); the running machine only."""
    logs.configure()
    opts = DomainOptions(run.Options(root=root, host=host, config=config))

    def find():
        p = run.prepare(opts.run)
        domain = the_domain(host_domains(p, domains), name, p, domains)
        if not p.target.live and not dry:
            raise UsageError(f"domain.console: {p.target} is not a running machine; attach on the host itself")
        return domain
    domain = _guard(find)
    argv = ["xl", "console", domain.name]
    if taskhelp.dry(c, dry):
        print("$ " + " ".join(argv))
        return
    os.execvp(argv[0], argv)


@task(name="lint", positional=["path"], iterable=["also"], auto_shortflags=False,
      help={"path": "an xl config file, or a folder of *.cfg (such as /etc/xen)",
            "also": "more config files (repeat the flag); MACs are checked across all",
            "root": "look kernel and ramdisk paths up in this machine root (default /)",
            "allow_open_vnc": "accept VNC open to the network without a password"})
def lint_task(c, path, also=None, root=None, allow_open_vnc=False):
    """Check xl configs for the mistakes the article warns about (S25)."""
    logs.configure()
    lines = _guard(lambda: lint_paths([path, *(also or [])], root, allow_open_vnc))
    for line in lines:
        print(line)
    if lines:
        raise Exit(f"xenrun: {len(lines)} problem(s) found", code=1)
    print("no problems found")


ns = Collection("domain", create_task, finish_install_task, shutdown_task, destroy_task, delete_task, list_task,
                console_task, lint_task)
