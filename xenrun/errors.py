"""Every error xenrun raises on purpose, and who raises it.

Errors of the user's making end the run with one line and exit code 2 (nothing was
touched); a failed apply ends with exit code 1 (after rolling back). Anything else is
a bug and keeps its traceback.
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
