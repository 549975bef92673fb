"""The one caller of hooks: a host's selected plugins behind one facade.

``select(site, spec)`` builds it: the plugin manager of the host's selection, every
role checked (the plugin chosen as ``boot`` implements configure_boot, ...), every
plugin's settings declared and checked. The flows then call hooks only through its
typed wrappers (``facts``, ``host_changes``, ``boot_changes`` ...), which

- call implementations in selection order (facts, xen, boot, network, disks,
  plugins: the order plugins.toml reads), not pluggy's last-registered-first, so
  that changes apply in that order and the core's facts come before any plugin's;
- make a first-result hook answered by at most one plugin: two answers are
  refused by name, rather than one silently winning;
- check what each hook returns, and fill in the Change's plugin;
- turn an exception inside a hook into a PluginFault naming the plugin, the hook,
  the host and the plugin's own file:line (PlanError and the other UsageErrors a
  plugin raises on purpose pass through as they are);
- collect the notes and warnings plugins attach with ``note()`` and ``warn()``;
- keep stdout the core's: what a plugin prints goes to stderr, so a plan or
  ``--format json`` is never corrupted.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from contextvars import ContextVar
from dataclasses import dataclass, field

import structlog

from xenrun import registry
from xenrun.bootcheck import BootImage
from xenrun.changes import BootEntry, Change
from xenrun.config import Host, HostSpec, Site
from xenrun.errors import PluginFault, UsageError
from xenrun.facts import Facts, Probe
from xenrun.settings import Setting

log = structlog.get_logger()

# role -> the hook a plugin chosen for it must implement
ROLE_HOOK = {"boot": "configure_boot", "network": "configure_network", "disks": "create_domain"}
# first-result hooks that belong to one role: no other selected plugin may implement them
ROLE_OWNS = {"configure_boot": "boot", "boot_entry": "boot", "boot_image": "boot", "promote_xen": "boot",
             "configure_network": "network"}

# (facade, plugin) while a hook runs on this thread: where note() and warn() go
_running: ContextVar[tuple | None] = ContextVar("xenrun_hook", default=None)


def note(text: str) -> None:
    """Attach a note to the plan of the host being planned (shown with the plan and
    as ``notes`` in --format json). Called outside a hook it is only logged."""
    _attach("note", text)


def warn(text: str) -> None:
    """Attach a warning to the plan of the host being planned (and log it)."""
    _attach("warning", text)


def _attach(level: str, text: str) -> None:
    running = _running.get()
    if running is None:  # a hook called by hand (a plugin's own unit test): only logged
        (log.warning if level == "warning" else log.info)(" ".join(str(text).split()))
        return
    facade, plugin = running
    text = " ".join(str(text).split())
    facade.notes.append(f"warning: {plugin}: {text}" if level == "warning" else f"{plugin}: {text}")
    if level == "warning":
        log.warning(text, plugin=plugin)


class _HookStdout:
    """sys.stdout once a hook has run: writes made while a hook runs on this thread
    go to stderr; everything else goes where stdout went before."""

    def __init__(self, real):
        self._real = real

    def write(self, text):
        return (sys.stderr if _running.get() is not None else self._real).write(text)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _guard_stdout() -> None:
    if not isinstance(sys.stdout, _HookStdout):
        sys.stdout = _HookStdout(sys.stdout)


@dataclass
class HostPlugins:
    """One host's selected plugins (see the module's docstring)."""

    host: str
    names: tuple[str, ...]
    pm: object
    notes: list[str] = field(default_factory=list)

    # -- calling ---------------------------------------------------------------------

    def _impls(self, hook: str) -> list:
        order = {name: i for i, name in enumerate(self.names)}
        return sorted(getattr(self.pm.hook, hook).get_hookimpls(), key=lambda impl: order.get(impl.plugin_name, 0))

    def _call(self, impl, hook: str, kwargs: dict):
        _guard_stdout()
        token = _running.set((self, impl.plugin_name))
        try:
            with structlog.contextvars.bound_contextvars(plugin=impl.plugin_name):
                return impl.function(**{a: kwargs[a] for a in impl.argnames})
        except UsageError:
            raise  # PlanError, a setting's error: the plugin's own words
        except Exception as e:  # noqa: BLE001 - any bug in a plugin becomes its fault, named
            raise self.fault(impl, hook, f"{type(e).__name__}: {e}", _where(impl, e.__traceback__),
                             traceback.format_exc()) from None
        finally:
            _running.reset(token)

    def each(self, hook: str, **kwargs) -> list[tuple[str, object]]:
        """Every implementation of ``hook``, in selection order: (plugin, result) pairs."""
        return [(impl.plugin_name, self._call(impl, hook, kwargs)) for impl in self._impls(hook)]

    def first(self, hook: str, **kwargs) -> tuple[str | None, object]:
        """The one answer to a first-result hook: (plugin, result), or (None, None)
        when no plugin answers. Two answers are refused by name."""
        answers = [(plugin, result) for plugin, result in self.each(hook, **kwargs) if result is not None]
        if len(answers) > 1:
            raise UsageError(f"host {self.host}: plugins {answers[0][0]!r} and {answers[1][0]!r} both answer {hook};"
                             " select one of them")
        return answers[0] if answers else (None, None)

    def fault(self, impl, hook: str, problem: str, where: str, detail: str = "") -> PluginFault:
        return PluginFault(impl.plugin_name, hook, self.host, problem, where, detail)

    def _wrong(self, plugin: str, hook: str, expected: str, got) -> PluginFault:
        impl = next(i for i in self._impls(hook) if i.plugin_name == plugin)
        return self.fault(impl, hook, f"returned {_show(got)}, expected {expected}", _defined_at(impl))

    def _changes(self, plugin: str, hook: str, result) -> list[Change]:
        if result is None:
            return []
        if not isinstance(result, (list, tuple)) or not all(isinstance(c, Change) for c in result):
            raise self._wrong(plugin, hook, "a list of Changes (xenrun.api)", result)
        return [dataclasses.replace(c, plugin=plugin) for c in result]

    # -- the typed wrappers the flows call ----------------------------------------------

    def _declarations(self, hook: str, what: str) -> dict[str, dict[str, Setting]]:
        """{owner: {key: Setting}} merged from every selected plugin's ``hook``; an
        owner (a plugin's settings table, a disk backend) declared twice is refused."""
        declared: dict = {}
        for plugin, result in self.each(hook):
            if result is None:
                continue
            if not isinstance(result, dict) or not all(
                    isinstance(t, dict) and all(isinstance(s, Setting) for s in t.values()) for t in result.values()):
                raise self._wrong(plugin, hook, f"{{{what}: {{key: Setting}}}}", result)
            for owner, table in result.items():
                if owner in declared:
                    raise UsageError(f"plugin {plugin!r} declares the {hook.split('_', 1)[1].replace('_', ' ')}"
                                     f" of {owner!r}, already declared")
                declared[owner] = table
        return declared

    def declared_settings(self) -> dict[str, dict[str, Setting]]:
        return self._declarations("declare_settings", "plugin")

    def disk_keys(self) -> dict[str, dict[str, Setting]]:
        """backend -> {key: Setting}, from every selected plugin's declare_disk_keys."""
        return self._declarations("declare_disk_keys", "backend")

    def install_keys(self) -> dict[str, dict[str, Setting]]:
        """method -> {key: Setting}, from every selected plugin's declare_install_keys."""
        return self._declarations("declare_install_keys", "method")

    def facts(self, probe: Probe) -> Facts:
        merged: dict = {}
        owner: dict = {}
        for plugin, fragment in self.each("detect_hardware", probe=probe):
            if fragment is None:
                continue
            if not isinstance(fragment, dict):
                raise self._wrong(plugin, "detect_hardware", "a dict of facts", fragment)
            for key, value in fragment.items():
                if key in merged:
                    raise UsageError(f"plugins {owner[key]!r} and {plugin!r} both answer the fact {key!r}")
                merged[key], owner[key] = value, plugin
        return Facts(merged)

    def xen_options(self, facts: Facts, host: Host) -> list[str]:
        options: list[str] = []
        for plugin, result in self.each("xen_options", facts=facts, host=host):
            if result is None:
                continue
            if not isinstance(result, (list, tuple)) or not all(isinstance(o, str) for o in result):
                raise self._wrong(plugin, "xen_options", "a list of strings", result)
            options += result
        return options

    def host_changes(self, facts: Facts, host: Host) -> list[Change]:
        changes: list[Change] = []
        for plugin, result in self.each("configure_host", facts=facts, host=host):
            changes += self._changes(plugin, "configure_host", result)
        return changes

    def _first_changes(self, hook: str, **kwargs) -> list[Change]:
        plugin, result = self.first(hook, **kwargs)
        return self._changes(plugin, hook, result) if plugin else []

    def boot_changes(self, facts: Facts, host: Host, xen_options: list[str]) -> list[Change]:
        return self._first_changes("configure_boot", facts=facts, host=host, xen_options=xen_options)

    def network_changes(self, facts: Facts, host: Host) -> list[Change]:
        return self._first_changes("configure_network", facts=facts, host=host)

    def promote_changes(self, facts: Facts, host: Host) -> list[Change]:
        return self._first_changes("promote_xen", facts=facts, host=host)

    def boot_entry(self, facts: Facts, host: Host, xen_options: list[str], linux_options: list[str]) -> BootEntry | None:
        plugin, entry = self.first("boot_entry", facts=facts, host=host, xen_options=xen_options,
                                   linux_options=linux_options)
        if plugin and not isinstance(entry, BootEntry):
            raise self._wrong(plugin, "boot_entry", "a BootEntry", entry)
        return entry

    def boot_image(self, entry: BootEntry) -> BootImage | None:
        plugin, image = self.first("boot_image", entry=entry)
        if plugin and not isinstance(image, BootImage):
            raise self._wrong(plugin, "boot_image", "a BootImage (xenrun.api)", image)
        return image

    def domain_disk(self, facts: Facts, host: Host, domain, disk):
        """(plugin, DomainDisk) of the disk plugin that answers for ``disk``."""
        from xenrun.domains import DomainDisk
        plugin, answer = self.first("create_domain", facts=facts, host=host, domain=domain, disk=disk)
        if plugin is None:
            return None, None
        if not isinstance(answer, DomainDisk):
            raise self._wrong(plugin, "create_domain", "a DomainDisk", answer)
        changes = self._changes(plugin, "create_domain", list(answer.changes))
        return plugin, dataclasses.replace(answer, changes=changes)

    def domain_install(self, facts: Facts, host: Host, domain, disk: str, new: bool) -> list[Change]:
        """The Changes of the installer plugin named by the guest's install method."""
        plugin, answer = self.first("install_domain", facts=facts, host=host, domain=domain, disk=disk, new=new)
        if plugin is None:
            raise domain.error("install.method", f"plugin {domain.install.method!r} did not answer install_domain")
        return self._changes(plugin, "install_domain", answer)


# -- selection ------------------------------------------------------------------------

def select(site: Site, spec: HostSpec) -> tuple[HostPlugins, Host]:
    """The host's plugins and its checked settings; every error names plugins.toml's
    file, line and key, and comes before anything runs."""
    known = set(registry.known_names())
    for plugin in spec.selected:
        if plugin not in known:
            raise site.error(site.selection_origin(spec.name, plugin),
                             f"unknown plugin {plugin!r} (known: {', '.join(sorted(known))})")
    for plugin, path in site.plugin_tables():
        if plugin not in known:
            raise site.error(path, f"unknown plugin (known: {', '.join(sorted(known))})")
    plugins = HostPlugins(spec.name, spec.selected, registry.plugin_manager(spec.selected))
    _check_roles(site, spec, plugins)
    declared = plugins.declared_settings()
    settings = {p: site.check_settings(spec.name, p, declared.get(p, {})) for p in spec.selected}
    return plugins, Host(spec, settings, site)


def _check_roles(site: Site, spec: HostSpec, plugins: HostPlugins) -> None:
    def implements(name: str, hook: str) -> bool:
        return any(impl.plugin_name == name for impl in getattr(plugins.pm.hook, hook).get_hookimpls())

    chosen = {"boot": [spec.boot], "network": [spec.network], "disks": list(spec.disks)}
    for role, names in chosen.items():
        for name in names:
            if name != "none" and not implements(name, ROLE_HOOK[role]):
                raise site.error(_role_origin(site, spec.name, role),
                                 f"plugin {name!r} cannot be the {role.rstrip('s')} plugin:"
                                 f" it does not implement {ROLE_HOOK[role]}")
    for hook, role in ROLE_OWNS.items():
        for impl in getattr(plugins.pm.hook, hook).get_hookimpls():
            name = impl.plugin_name
            if name not in chosen[role]:
                mine = chosen[role][0]
                raise site.error(site.selection_origin(spec.name, name),
                                 f"plugin {name!r} implements {hook}, which only the {role} plugin"
                                 f" ({role} = {mine!r}) may: give it as {role} instead")


def _role_origin(site: Site, host: str, key: str) -> tuple[str, ...]:
    """The TOML path that gave ``host`` its ``key`` (boot, network, disks)."""
    table = site.data.get("hosts", {}).get(host)
    return ("hosts", host, key) if isinstance(table, dict) and key in table else ("defaults", key)


# -- where a fault is -------------------------------------------------------------------

def _defined_at(impl) -> str:
    code = impl.function.__code__
    return f"{code.co_filename}:{code.co_firstlineno}"


def _where(impl, tb) -> str:
    """The plugin's own file:line in a traceback: the innermost frame in the folder
    that holds the hook implementation (its package), else where the hook is."""
    folder = os.path.dirname(os.path.abspath(impl.function.__code__.co_filename)) + os.sep
    for frame in reversed(traceback.extract_tb(tb)):
        if os.path.abspath(frame.filename).startswith(folder):
            return f"{frame.filename}:{frame.lineno}"
    return _defined_at(impl)


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


__all__ = ["HostPlugins", "select", "note", "warn", "ROLE_HOOK"]
