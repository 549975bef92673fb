"""What every task of the command line shares: the flags' help, one line for an
error of the user's making, asking before applying, and showing a result.
The tasks (tasks.py, domain_tasks.py) only parse their flags, call a flow, and
print through these."""

from __future__ import annotations

import sys

from invoke.exceptions import Exit

from xenrun import report
from xenrun.errors import XenrunError

HELP = {
    "root": "a machine's root in a folder instead of this machine",
    "host": "the host's name in plugins.toml (default: the target's /etc/hostname)",
    "config": "the site's plugins.toml (default: ./plugins.toml)",
    "dry": "show the plan (diffs and commands) and change nothing",
    "yes": "apply without asking",
    "files_only": "write the files, list the commands left for the host (never runs a command)",
    "format": "text (default) or json",
}


def guard(fn):
    """Run ``fn``; XenrunError -> one line (a block for a plugin's fault) on stderr
    and its exit code."""
    try:
        return fn()
    except XenrunError as e:
        raise Exit(f"xenrun: {e}", code=e.exit_code) from None


def dry(c, given: bool) -> bool:
    """``invoke --dry TASK`` in a site folder: invoke's own --dry (echo commands) is
    taken as xenrun's, never ignored while the plan is applied for real."""
    return given or bool(c.config.run.dry)


def can_ask() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def plan_only(dry: bool, yes: bool) -> bool:
    """Without --yes and without a terminal to ask on, only plan (as --dry)."""
    if not dry and not yes and not can_ask():
        print("Not applied: no terminal to ask on; give --yes to apply. Showing the plan only.", file=sys.stderr)
        return True
    return dry


def confirm(result) -> bool:
    """Show the plan and ask before applying it."""
    sys.stdout.write(report.text(result))
    answer = input(f"Apply {result.summary()['changed']} change(s) to {result.host}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def show(result, fmt: str) -> None:
    sys.stdout.write(report.as_json(result) if fmt == "json" else report.text(result))
