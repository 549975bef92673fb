"""The public API for plugin authors: everything a plugin needs, from one module.

    from xenrun.api import hookimpl, WriteFile, RunCommand, Setting, checks, PlanError

Builtin plugins import only from here (a test checks it), so a builtin reads exactly
like a third-party plugin. The hooks themselves are documented in
``xenrun.hookspecs``; the author's guide is docs/plugins.md.

- ``hookimpl``: the marker for hook implementations.
- Changes (what a hook returns; only the core applies them): ``WriteFile``,
  ``EnsureLine``, ``Symlink``, ``CopyFile``, ``RemoveFile``, ``SparseFile``,
  ``RunCommand``; ``Change`` is their base. ``SwitchNetwork``: a network plugin's
  new configuration made live by the core's lockout-safe switch (xenrun.netswitch).
- ``BootEntry`` (boot_entry); ``BootImage`` and ``Loader`` (boot_image), with
  ``bootcheck``, the QEMU harness holding the builtin loaders' ``LOADERS``, and
  ``bootimages``, their image builders (``bootimages.build_grub_iso`` ...);
  ``DomainDisk`` (create_domain), and the guest values
  hooks receive: ``Domain``, ``DiskSpec``.
- Settings: ``Setting`` and ``checks`` (the value checks: ``checks.size``,
  ``checks.name``, ``checks.boolean``, ...), for declare_settings and
  declare_disk_keys.
- ``PlanError``: raise it when a plugin cannot plan for this host (one line, exit 2,
  nothing touched). ``Host.setting_error`` makes the error for a setting's value.
  Any other exception in a hook is reported as the plugin's fault (exit 3).
- ``note(text)`` and ``warn(text)``: attach a note or a warning to the plan of the
  host being planned (shown with the plan, and as ``notes`` in --format json).
- ``Facts`` (what hooks read), ``Probe`` (what detect_hardware reads through),
  ``Host`` (the host's configuration and settings), ``parsers`` (the pure parsers
  of the core's facts: ``parsers.parse_os_release``, ``parse_shell_vars``, ...),
  ``netconf`` (network stacks: interfaces(5) and systemd-networkd files, which stack
  is in charge, ``netconf.check_stack`` for a network plugin's refusal).
- Profiles, the per-distribution differences: ``Profile``, ``profile_for``,
  ``boot_files``.
- Test helpers, loaded on first use: ``plan_host``, ``apply_host``, ``changes_for``
  (see ``xenrun.testing``).
"""

from __future__ import annotations

from xenrun import bootcheck, bootimages
from xenrun import facts as parsers
from xenrun import hookimpl, netconf
from xenrun import settings as checks
from xenrun.bootcheck import BootImage, Loader
from xenrun.changes import (BootEntry, Change, CopyFile, EnsureLine, RemoveFile, RunCommand, SparseFile,
                            SwitchNetwork, Symlink, WriteFile)
from xenrun.config import Host
from xenrun.domains import DiskSpec, Domain, DomainDisk
from xenrun.errors import PlanError, TargetError
from xenrun.facts import Facts, Probe, parse_shell_vars
from xenrun.hooks import note, warn
from xenrun.profiles import Profile, boot_files, profile_for
from xenrun.settings import Setting

_TESTING = ("plan_host", "apply_host", "changes_for")

__all__ = [
    "hookimpl",
    "Change", "WriteFile", "EnsureLine", "Symlink", "CopyFile", "RemoveFile", "SparseFile", "RunCommand",
    "SwitchNetwork",
    "BootEntry", "BootImage", "Loader", "bootcheck", "bootimages", "DomainDisk", "Domain", "DiskSpec",
    "Setting", "checks",
    "PlanError", "TargetError", "note", "warn",
    "Facts", "Probe", "Host", "parsers", "parse_shell_vars", "netconf",
    "Profile", "profile_for", "boot_files",
    *_TESTING,
]


def __getattr__(name: str):
    # the test helpers plan and apply whole hosts (the flows): loaded only when a
    # test asks, so that importing the API stays cheap for plugins
    if name in _TESTING:
        from xenrun import testing
        return getattr(testing, name)
    raise AttributeError(f"module 'xenrun.api' has no attribute {name!r}")
