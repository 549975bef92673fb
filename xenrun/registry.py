"""The registry: which plugins exist (builtins, then entry points), and the one
factory that builds a plugin manager for a host.

A builtin is an ordinary module in xenrun/plugins/ named by its selectable name,
using only the public API (``xenrun.api``), so it reads exactly like a third-party plugin.
Third-party packages register modules under the entry-point group ``xenrun``; the
entry-point name is the name plugins.toml selects them by.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points

import pluggy

from xenrun import PROJECT, hookspecs
from xenrun.errors import UsageError

# selectable name -> module; nothing is imported until a host selects it
BUILTIN = {
    "facts": "xenrun.plugins.facts",
    "xen": "xenrun.plugins.xen",
    "grub": "xenrun.plugins.grub",
    "netctl": "xenrun.plugins.netctl",
    "ifupdown": "xenrun.plugins.ifupdown",
    "networkd": "xenrun.plugins.networkd",
    "syslinux": "xenrun.plugins.syslinux",
    "efistub": "xenrun.plugins.efistub",
    "image": "xenrun.plugins.image",
    "lvm": "xenrun.plugins.lvm",
    "debootstrap": "xenrun.plugins.debootstrap",
}
ENTRY_POINT_GROUP = PROJECT


@functools.lru_cache(maxsize=1)
def third_party() -> dict:
    """Entry points of installed plugin packages, by name (read once a process:
    a fleet builds a plugin manager per host)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_names() -> list[str]:
    return sorted(set(BUILTIN) | set(third_party()))


def implementing(hook: str) -> list[str]:
    """The known plugins that implement ``hook``; one that fails to load is left
    out (selecting it reports why)."""
    found = []
    for name in known_names():
        try:
            if hasattr(load(name), hook):
                found.append(name)
        except UsageError:
            continue
    return found


def disk_backends() -> list[str]:
    """The known plugins that make guest disks (they implement create_domain)."""
    return implementing("create_domain")


def installers() -> list[str]:
    """The known plugins that install guests' systems (install_domain)."""
    return implementing("install_domain")


def load(name: str):
    """The plugin object (module) selected by ``name``: builtins first, then entry
    points. An unknown name fails listing the names that exist."""
    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name])
    eps = third_party()
    if name not in eps:
        raise UsageError(f"unknown plugin {name!r} (known: {', '.join(known_names())})")
    try:
        return eps[name].load()
    except Exception as e:  # a broken third-party package must not look like our bug
        raise UsageError(f"plugin {name!r} ({eps[name].value}) failed to load: {type(e).__name__}: {e}") from None


def plugin_manager(names: tuple[str, ...] | list[str]) -> pluggy.PluginManager:
    """A fresh manager holding only ``names``, in order. Hook implementations that
    match no hook (a misspelt name) fail here, before anything runs."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in names:
        plugin = load(name)
        try:
            pm.register(plugin, name=name)
        except ValueError:
            raise UsageError(f"plugin {name!r} is selected twice, or another name loads the same module") from None
        except pluggy.PluginValidationError as e:
            raise UsageError(f"plugin {name!r}: {e}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        who = pm.get_name(e.plugin) if e.plugin is not None else "?"
        raise UsageError(f"plugin {who!r} implements a hook that does not exist: {e}"
                         f" (hooks: {', '.join(sorted(hook_names()))})") from None
    return pm


def hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if not n.startswith("_") and hasattr(getattr(hookspecs, n), "xenrun_spec")]
