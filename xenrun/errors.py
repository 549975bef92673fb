"""Every error xenrun raises on purpose, and who raises it.

Exit codes: 2 for errors of the user's making (one line, nothing was touched); 1 for
a failed apply (after rolling back); 3 for a plugin's fault (its hook raised or
returned the wrong thing while planning: nothing was touched). Anything else is a
bug in xenrun and keeps its traceback.
"""

from __future__ import annotations


class XenrunError(Exception):
    """Base class. ``exit_code`` is what the command line exits with."""

    exit_code = 1


class UsageError(XenrunError):
    """Bad input caught before anything runs: configuration, flags, names. Raised by
    config.py, plugins (through PlanError) and the command line."""

    exit_code = 2


class ConfigError(UsageError):
    """A value in plugins.toml or a domain file is wrong. Raised by config.py.

    The message is one line naming file, line (where known) and key.
    """

    def __init__(self, file, key: str, message: str, line: int | None = None):
        key = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)  # one line, always
        self.file, self.key, self.line, self.reason = str(file), key, line, message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class PlanError(UsageError):
    """A plugin cannot plan for this host (missing package, unsupported layout).
    Raised by plugins; nothing has been changed when it is raised."""


class TargetError(UsageError):
    """The target cannot do what the plan needs (a path escaping --root, chroot not
    possible, host unreachable). Raised by the targets (xenrun.targets) before anything changes."""


class HostLost(TargetError):
    """An SSH host stopped answering (or its connection dropped) mid-run: the
    session was closed, and the target refuses everything after. Exit code 2 as
    for a host that cannot be reached; the next run recovers what this one left.
    Raised by the SSH target (xenrun.targets.ssh)."""


class LockHeld(UsageError):
    """Another run holds the target's lock. Raised by apply.py."""


class ApplyError(XenrunError):
    """A step failed during apply; every file this run changed was put back.
    Raised by apply.py."""

    exit_code = 1


class PluginFault(XenrunError):
    """A plugin's hook raised an exception, or returned something of the wrong type,
    while the host was being planned: nothing was touched. Raised by hooks.py.

    The message is one short block: plugin, hook, host, the problem, and the
    plugin's own file:line; with XENRUN_DEBUG=1 (``--debug``) the traceback too."""

    exit_code = 3

    def __init__(self, plugin: str, hook: str, host: str, problem: str, where: str, detail: str = ""):
        import os
        self.plugin, self.hook, self.host, self.problem, self.where = plugin, hook, host, problem, where
        self.detail = detail
        text = (f"plugin {plugin!r} failed in hook {hook} (host {host}): {problem}\n"
                f"  at {where}\n"
                f"  nothing was changed; this is a fault of the plugin (exit 3)")
        if os.environ.get("XENRUN_DEBUG") == "1" and detail:
            text += "\n" + detail.rstrip()
        elif detail:
            text += "; --debug or XENRUN_DEBUG=1 shows the traceback"
        super().__init__(text)
