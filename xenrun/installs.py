"""Installed guests: domains.toml's ``[domain.NAME.install]``, an operating system
put onto a guest's first disk when that disk is made (issue 14).

    [domain.web1.install]
    method = "debootstrap"     # the installer plugin (install_domain), selected by this
    suite = "bookworm"         # ... and the keys that plugin declares (declare_install_keys)

domains.toml is read before the plugins are loaded, so only ``method`` is checked
there; the other keys are checked against the plugin's declaration when the guest
is planned (``with_install_keys``), with file:line errors like every other key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from xenrun import settings as check
from xenrun.settings import Setting, check_keys

INSTALL_KEYS = ("method",)


@dataclass(frozen=True)
class InstallSpec:
    """What to install: the installer plugin (``method``) and its keys as written
    (``options``; checked and with defaults once the plugin is loaded)."""

    method: str
    options: dict = field(default_factory=dict)
    where: tuple[str, ...] = field(default=(), compare=False, repr=False)  # the TOML table, for errors


def parse_install(raw, where: tuple[str, ...], error) -> InstallSpec | None:
    """The ``install`` table of a domain (``where`` its TOML path); ``error(path,
    message)`` makes the file:line error."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise error(where, 'must be a table, as [domain.NAME.install] with method = "debootstrap"')
    if "method" not in raw:
        raise error(where, 'method is missing: the installer plugin, e.g. method = "debootstrap"')
    try:
        method = check.name(raw["method"])
    except ValueError as e:
        raise error(where + ("method",), str(e)) from None
    return InstallSpec(method, {k: v for k, v in raw.items() if k not in INSTALL_KEYS}, where)


def with_install_keys(domain, declared: dict[str, dict[str, Setting]]):
    """``domain`` with its install keys checked against what its installer plugin
    declares (``declared``: method -> {key: Setting}) and the defaults filled in."""
    spec = domain.install
    if spec is None:
        return domain
    keys = declared.get(spec.method, {})

    def error(key: str, message: str):
        return domain.source.error(spec.where + ((key,) if key else ()), message) if domain.source else \
            domain.error(f"install.{key}" if key else "install", message)

    options = check_keys(spec.options, keys, error,
                         f"not a key of a {spec.method!r} install (its keys: {', '.join(INSTALL_KEYS + tuple(keys))})",
                         lambda key, s: f"{key} is missing: a {spec.method} install needs {key}"
                                        + (f" ({s.help})" if s.help else ""))
    return replace(domain, install=replace(spec, options=options))
