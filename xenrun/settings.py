"""Typed settings and the value checks shared by configuration and domain specs.

A check takes the raw TOML value and returns the clean value or raises ValueError
with a message that reads well after "key: ".
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62}))*")
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
MAX_NAME = 63


def name(value: Any) -> str:
    """A host, plugin, domain or volume name: safe as a file name, an LV name and an
    argv word. Letters, digits, '-', '_', and single dots between parts."""
    if not isinstance(value, str):
        raise ValueError(f"expected a name (string), got {_kind(value)}")
    if len(value) > MAX_NAME:
        raise ValueError(f"name is {len(value)} characters long; at most {MAX_NAME}")
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, '-', '_' and single dots,"
            " starting with a letter or digit (no '/', spaces, quotes or shell characters)")
    return value


def interface(value: Any) -> str:
    """A Linux network interface name (at most 15 characters)."""
    if not isinstance(value, str) or not _IFNAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid interface name (letters, digits, '-', '_', '.'; 1-15 characters)")
    return value


def size(value: Any) -> int:
    """A size in bytes, from an integer (bytes) or a string such as "512M", "10G",
    "10GiB" (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as \"512M\" or \"10G\", got a boolean")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if not m:
            raise ValueError(f"{value!r} is not a size: write a number with K, M, G or T, as \"512M\"")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    else:
        raise ValueError(f"expected a size such as \"512M\", got {_kind(value)}")
    if n <= 0:
        raise ValueError(f"size must be more than zero, got {value!r}")
    return n


def xen_size(nbytes: int) -> str:
    """Render a size the way Xen's command line reads it (largest exact unit)."""
    for unit in ("T", "G", "M", "K"):
        if nbytes % _UNITS[unit] == 0:
            return f"{nbytes // _UNITS[unit]}{unit}"
    return str(nbytes)


def absolute_path(value: Any) -> str:
    """An absolute path with no '..' part, no NUL or newline."""
    if not isinstance(value, str):
        raise ValueError(f"expected a path (string), got {_kind(value)}")
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    if any(c in value for c in "\0\n\r") or ".." in value.split("/"):
        raise ValueError(f"{value!r:.200} is not a safe path (no '..', newlines or NUL)")
    if len(value) > 4095 or any(len(part) > 255 for part in value.split("/")):
        raise ValueError(f"{value[:60]!r}...: a path of at most 4095 characters, 255 per name")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of 1 or more, got {value!r}")
    return value


def word(value: Any) -> str:
    """A single command-line word: printable, no whitespace, quotes or shell characters."""
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    if not re.fullmatch(r"[A-Za-z0-9_.,:=+/@%{}-]+", value):
        raise ValueError(f"{value!r} has characters not allowed in an option (spaces, quotes, shell characters)")
    return value


def words(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_kind(value)}")
    return [word(v) for v in value]


def ipv4_interface(value: Any) -> str:
    """An IPv4 address with prefix, as "192.168.1.10/24"."""
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"expected an address with prefix such as \"192.168.1.10/24\", got {value!r}")
    try:
        return str(ipaddress.IPv4Interface(value))
    except ValueError as e:
        raise ValueError(f"{value!r} is not an IPv4 address with prefix: {e}") from None


def ipv4_address(value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(value if isinstance(value, str) else object()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of: {', '.join(options)}")
        return value
    return check


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Setting:
    """One key a plugin reads from ``[plugin.NAME]`` (declare_settings) or from a
    guest's disk table (declare_disk_keys): its check, its default (used when the key
    is absent; None means "not set"), one line of help, and ``required``: the key must
    be given (its absence is an error naming the table)."""

    check: Callable[[Any], Any]
    default: Any = None
    help: str = ""
    examples: tuple = field(default=())
    required: bool = False


def check_keys(given: dict, declared: dict[str, Setting], error: Callable[[str, str], Exception],
               unknown: str, missing: Callable[[str, Setting], str]) -> dict[str, Any]:
    """``given`` (a table a user wrote) checked against ``declared``: every key known
    (else ``unknown``), every value through its Setting's check, required keys present
    (else ``missing(key, setting)``), defaults filled in. ``error(key, message)``
    makes the exception, key "" meaning the table itself."""
    clean = {}
    for key, value in given.items():
        if key not in declared:
            raise error(key, unknown)
        try:
            clean[key] = declared[key].check(value)
        except ValueError as e:
            raise error(key, str(e)) from None
    for key, setting in declared.items():
        if key not in clean:
            if setting.required:
                raise error("", missing(key, setting))
            clean[key] = setting.default
    return clean
