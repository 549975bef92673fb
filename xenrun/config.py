"""Site configuration: plugins.toml read with tomllib and checked before anything runs.

Shape (see examples/plugins.toml)::

    [defaults]            boot, network, disks, plugins
    [hosts.NAME]          the same keys, plus address (user@host[:port] for SSH),
                          identity (the SSH key file), timeout (seconds an SSH
                          host may stay silent; also in [defaults]), and root: a machine root
                          folder (relative to plugins.toml), or with address an
                          absolute folder on that host holding a machine's root;
    [hosts.NAME.plugin.P] settings of plugin P for this host only
    [plugin.P]            settings of plugin P for every host
    [groups]              NAME = ["host", ...]: hosts run together (--host @NAME)

Every error is a ConfigError naming file, line and key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenrun import settings as check
from xenrun.errors import ConfigError
from xenrun.settings import Setting, check_keys

# boot, network and disk plugins are chosen in plugins.toml; none until a site says so
DEFAULTS = {"boot": "none", "network": "none", "disks": [], "plugins": []}
_SELECTION_KEYS = ("boot", "network", "disks", "plugins")
_HOST_KEYS = _SELECTION_KEYS + ("root", "address", "identity", "timeout", "plugin")
_TOP_KEYS = ("defaults", "hosts", "plugin", "groups")
NONE = "none"  # boot = "none" / network = "none": leave that part alone


class KeyLines:
    """Finds the line a key was written on. tomllib reports lines only for syntax
    errors, so this scans the text for table headers and ``key =`` lines."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")

    def __init__(self, text: str):
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            if m := self._HEADER.match(line):
                table = self._split(m.group(1))
                self.lines.setdefault(table, number)
            elif m := self._KEY.match(line):
                self.lines.setdefault(table + self._split(m.group(1)), number)

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", dotted)
        return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)

    def find(self, path: tuple[str, ...]) -> int | None:
        """The line of ``path``, or of its nearest enclosing table."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


@dataclass(frozen=True)
class HostSpec:
    """What plugins.toml says about one host, defaults merged in, not yet checked
    against the plugins' own settings."""

    name: str
    boot: str
    network: str
    disks: tuple[str, ...]
    plugins: tuple[str, ...]
    root: Path | None = None  # a local folder (no address) or a folder on the SSH host
    address: str | None = None
    identity: Path | None = None
    timeout: float | None = None  # seconds an SSH host may stay silent (None: the target's default)
    configured: bool = False  # False when the host has no [hosts.NAME] table

    @property
    def selected(self) -> tuple[str, ...]:
        """Plugin names this host selects, in call order, without duplicates."""
        names = ["facts", "xen", self.boot, self.network, *self.disks, *self.plugins]
        return tuple(dict.fromkeys(n for n in names if n != NONE))


@dataclass
class Site:
    """A whole plugins.toml, structurally checked."""

    file: Path | None
    data: dict = field(default_factory=dict)
    keylines: KeyLines = field(default_factory=lambda: KeyLines(""))

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        return ConfigError(self.file or "<defaults>", ".".join(path), message, self.keylines.find(path))

    @property
    def folder(self) -> Path:
        return self.file.parent if self.file else Path.cwd()

    @property
    def host_names(self) -> list[str]:
        return list(self.data.get("hosts", {}))

    @property
    def groups(self) -> dict[str, list[str]]:
        """[groups]: name -> host names (checked by load_site)."""
        return dict(self.data.get("groups", {}))

    def host(self, name: str) -> HostSpec:
        defaults = {**DEFAULTS, **self.data.get("defaults", {})}
        table = self.data.get("hosts", {}).get(name)
        merged = {**defaults, **(table or {})}
        root, address, identity = merged.get("root"), merged.get("address"), merged.get("identity")
        if root and not address:
            root = (self.folder / root).resolve()
        return HostSpec(
            name=name, boot=merged["boot"], network=merged["network"],
            disks=tuple(merged["disks"]), plugins=tuple(merged["plugins"]),
            root=Path(root) if root else None, address=address,
            identity=(self.folder / identity).resolve() if identity else None, timeout=merged.get("timeout"),
            configured=table is not None)

    def selection_origin(self, host: str, name: str) -> tuple[str, ...]:
        """The TOML path that selected plugin ``name`` for ``host`` (for errors)."""
        for table in (("hosts", host), ("defaults",)):
            values = self.data
            for part in table:
                values = values.get(part, {})
            for key in _SELECTION_KEYS:
                value = values.get(key)
                if value == name or (isinstance(value, list) and name in value):
                    return table + (key,)
        return ("defaults",)

    def raw_settings(self, host: str, plugin: str) -> tuple[dict, dict[str, tuple[str, ...]]]:
        """Settings of ``plugin`` for ``host``: site-wide values overridden by the
        host's own, and for each key the TOML path it came from (for errors)."""
        values, origin = {}, {}
        for path in (("plugin", plugin), ("hosts", host, "plugin", plugin)):
            table = self.data
            for part in path:
                table = table.get(part, {}) if isinstance(table, dict) else {}
            for key, value in table.items():
                values[key], origin[key] = value, path + (key,)
        return values, origin

    def plugin_tables(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every plugin name given settings anywhere, with the path that names it."""
        found = [(p, ("plugin", p)) for p in self.data.get("plugin", {})]
        for host, table in self.data.get("hosts", {}).items():
            found += [(p, ("hosts", host, "plugin", p)) for p in table.get("plugin", {})]
        return found

    def check_settings(self, host: str, plugin: str, declared: dict[str, Setting]) -> dict[str, Any]:
        """Check ``plugin``'s settings for ``host`` against what it declared."""
        raw, origin = self.raw_settings(host, plugin)
        known = ", ".join(sorted(declared)) or "none"
        return check_keys(raw, declared, lambda key, msg: self.error(origin[key] if key else ("plugin", plugin), msg),
                          f"unknown setting of plugin {plugin!r} (known: {known})",
                          lambda key, s: f"{key} is missing: plugin {plugin!r} needs it ({s.help or 'no help given'})")


def load_site(path: str | Path | None) -> Site:
    """Read and structurally check plugins.toml. ``path`` None: ./plugins.toml when it
    exists, else the built-in defaults."""
    if path is None:
        candidate = Path("plugins.toml")
        if not candidate.exists():
            return Site(None)
        path = candidate
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text (byte {e.start})") from None
    data = parse_toml(text, path)
    site = Site(path.resolve(), data, KeyLines(text))
    _check_structure(site)
    return site


MAX_TOML_DEPTH = 12  # tables in arrays in tables...: far more than any site needs
MAX_TOML_BYTES = 4 << 20


def parse_toml(text: str, file) -> dict:
    """tomllib.loads, every failure a ConfigError naming the file (and line): bad
    syntax, nesting deep enough to exhaust Python's stack, a file too big."""
    if len(text) > MAX_TOML_BYTES:
        raise ConfigError(file, "", f"{len(text)} bytes: more than {MAX_TOML_BYTES >> 20} MiB of TOML")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line.*\)$", "", str(e))
        raise ConfigError(file, "", f"TOML syntax: {msg}" + (f" (column {m.group(2)})" if m else ""),
                          int(m.group(1)) if m else None) from None
    except RecursionError:
        raise ConfigError(file, "", "arrays or tables nested too deeply") from None
    if _depth(data) > MAX_TOML_DEPTH:
        raise ConfigError(file, "", f"arrays or tables nested more than {MAX_TOML_DEPTH} deep")
    return data


def _depth(value, level: int = 0) -> int:
    if level > MAX_TOML_DEPTH:
        return level
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()] or [level + 1])
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value] or [level + 1])
    return level


def _check_structure(site: Site) -> None:
    data = site.data
    for key in data:
        if key not in _TOP_KEYS:
            raise site.error((key,), f"unknown table (known: {', '.join(_TOP_KEYS)})")
    for key in _TOP_KEYS:
        if key in data and not isinstance(data[key], dict):
            raise site.error((key,), "must be a table, as [" + key + "]")
    _check_selection(site, ("defaults",), data.get("defaults", {}), _SELECTION_KEYS + ("timeout",))
    for plugin, path in site.plugin_tables():
        _named(site, path, plugin)
        table = data
        for part in path:
            table = table[part]
        if not isinstance(table, dict):
            raise site.error(path, "must be a table of settings")
    for host, table in data.get("hosts", {}).items():
        _named(site, ("hosts", host), host)
        if not isinstance(table, dict):
            raise site.error(("hosts", host), "must be a table, as [hosts.NAME]")
        _check_selection(site, ("hosts", host), table, _HOST_KEYS)
        if "address" in table:
            value = table["address"]
            problem = _address_problem(value)
            if problem:
                raise site.error(("hosts", host, "address"), f"{problem}: give an SSH address such as"
                                                             " root@xen01.example.org or root@192.0.2.7:2222")
        if "root" in table:
            value = table["root"]
            if not isinstance(value, str) or not value or "\0" in value or "\n" in value or len(value) > 4095:
                raise site.error(("hosts", host, "root"), "must be a folder path (string, at most 4095 characters)")
            if "address" in table:
                try:
                    check.absolute_path(value)
                except ValueError as e:
                    raise site.error(("hosts", host, "root"), f"with address, a folder on that host: {e}") from None
            elif not _is_dir(site.folder / value):
                raise site.error(("hosts", host, "root"), f"folder {value!r} does not exist (relative to {site.folder})")
            if (site.folder / value).resolve() == Path("/") if "address" not in table else value.rstrip("/") == "":
                # a root of "/" (or one climbing up to it) is the machine itself, which
                # a root is meant to stand in for: say so rather than run there
                raise site.error(("hosts", host, "root"), f"{value!r} is the machine's own root;"
                                                          " leave root out to mean the machine itself")
        if "identity" in table:
            value = table["identity"]
            if not isinstance(value, str) or len(value) > 4095 or not _is_file(site.folder / value):
                raise site.error(("hosts", host, "identity"), f"{value!r} is not an SSH key file (relative to {site.folder})")
        if "plugin" in table and not isinstance(table["plugin"], dict):
            raise site.error(("hosts", host, "plugin"), "must be a table, as [hosts.NAME.plugin.P]")
    for group, members in data.get("groups", {}).items():
        where = ("groups", group)
        _named(site, where, group)
        if not isinstance(members, list):
            raise site.error(where, f"must be a list of host names, got {check._kind(members)}")
        if not members:
            raise site.error(where, "is empty: name at least one host")
        for member in members:
            _named(site, where, member)
            if member not in data.get("hosts", {}):
                raise site.error(where, f"no host {member!r} in [hosts] (hosts: {', '.join(site.host_names) or 'none'})")
        if len(set(members)) != len(members):
            raise site.error(where, "names a host twice")


_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*")


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long, a loop of links: not a folder xenrun can use
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _address_problem(value: Any) -> str | None:
    """Why ``value`` is not user@host[:port] (host a name, an IPv4 address, or an
    IPv6 one, bracketed when a port follows), or None. Nothing that ssh could
    read as an option (a leading '-') gets through."""
    import ipaddress
    if not isinstance(value, str):
        return f"expected an address (string), got {check._kind(value)}"
    user, at, hostport = value.rpartition("@")
    if at and not _USER.fullmatch(user):
        return f"{user!r} is not a user name"
    port = None
    if hostport.startswith("["):  # [v6]:port
        host, _, rest = hostport[1:].partition("]")
        if rest and not rest.startswith(":"):
            return f"{value!r} is not an address"
        port = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host = hostport
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                return f"{value!r} has more than one ':' (the port goes once, at the end)"
    if ":" not in host and not _HOSTNAME.fullmatch(host):
        return f"{host!r} is not a host name or address"
    if port is not None and (not port.isdigit() or not 1 <= int(port) <= 65535):
        return f"port {port!r} is not a number from 1 to 65535"
    return None


def _check_selection(site: Site, path: tuple[str, ...], table: dict, allowed: tuple[str, ...]) -> None:
    for key, value in table.items():
        where = path + (key,)
        if key not in allowed:
            raise site.error(where, f"unknown key (known: {', '.join(allowed)})")
        if key in ("boot", "network"):
            _named(site, where, value)
        elif key == "timeout" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or not 1 <= value <= 3600):
            raise site.error(where, "must be a number of seconds from 1 to 3600 (how long an SSH host may stay silent)")
        elif key in ("disks", "plugins"):
            if not isinstance(value, list):
                raise site.error(where, f"must be a list of plugin names, got {check._kind(value)}")
            for item in value:
                _named(site, where, item)


def _named(site: Site, path: tuple[str, ...], value: Any) -> str:
    try:
        return check.name(value)
    except ValueError as e:
        raise site.error(path, str(e)) from None


@dataclass(frozen=True)
class Host:
    """One host as plugins see it: its spec and every selected plugin's checked
    settings. ``setting("grub", "timeout")`` reads one; ``setting_error`` makes the
    error for a value that is well-formed but wrong for this host (it names the
    file, line and key like any configuration error)."""

    spec: HostSpec
    settings: dict[str, dict[str, Any]]
    site: Site | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def setting(self, plugin: str, key: str) -> Any:
        return self.settings[plugin][key]

    def setting_error(self, plugin: str, key: str, message: str) -> ConfigError:
        site = self.site or Site(None)
        _, origin = site.raw_settings(self.name, plugin)
        return site.error(origin.get(key, ("plugin", plugin, key)), message)
