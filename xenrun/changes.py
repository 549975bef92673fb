"""Changes: the small frozen values plugins return and only the core applies.

Each says what the target should look like (not how to get there), so the core can
diff it against the target first, show it with --dry, and find nothing to do on a
second run. ``step`` is the article's step id (S1..S27) and ``why`` one line for the
plan; ``plugin`` is filled in by the core.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xenrun.settings import absolute_path, interface, ipv4_address, ipv4_interface

# Every Change checks its own fields when it is made, so that a wrong value is the
# fault of the plugin that made it (named with its file:line by the core), not a
# failure at apply time blamed on other changes.


def _path(value, what: str = "path") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be an absolute path (a string), got {type(value).__name__} {value!r:.60}")
    try:
        return absolute_path(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _argv(value, what: str, allow_empty: bool = False) -> tuple[str, ...]:
    """A list of words, never a shell string (a string would be split into letters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of words such as [\"networkctl\", \"reload\"], not"
                        f" {type(value).__name__} {value!r:.60}")
    if not value and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    for word in value:
        if not isinstance(word, str) or "\0" in word:
            raise TypeError(f"{what}: every word must be a string without NUL, got {word!r:.60}")
    return tuple(value)


def _paths(value, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of absolute paths, not {type(value).__name__} {value!r:.60}"
                        f" (write [{value!r:.60}] for one)")
    return tuple(_path(p, what) for p in value)


def _mode(value, what: str = "mode") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise TypeError(f"{what} must be a file mode such as 0o644, got {value!r:.60}")
    return value


def _validator(value) -> tuple[str, ...]:
    argv = _argv(value, "validate", allow_empty=True)
    if argv and "{}" not in argv:
        raise ValueError(f"validate {list(argv)!r} has no \"{{}}\" word for the file to check")
    return argv


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


@dataclass(frozen=True)
class Change:
    step: str = field(default="", kw_only=True)
    why: str = field(default="", kw_only=True)
    plugin: str = field(default="", kw_only=True)

    def __post_init__(self):
        for what in ("step", "why", "plugin"):
            _text(getattr(self, what), f"{type(self).__name__}: {what}")

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class WriteFile(Change):
    """The file at ``path`` holds exactly ``content``. ``mode`` applies to a new
    file; an existing file keeps its mode and owner. ``validate`` is an argv run on
    the new content before it goes live, with "{}" standing for its path."""

    path: str
    content: bytes
    mode: int = 0o644
    validate: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        _path(self.path, "WriteFile: path")
        if isinstance(self.content, str):
            object.__setattr__(self, "content", self.content.encode())
        elif not isinstance(self.content, bytes):
            raise TypeError(f"WriteFile {self.path}: content must be str or bytes, got {type(self.content).__name__}")
        _mode(self.mode, f"WriteFile {self.path}: mode")
        object.__setattr__(self, "validate", _validator(self.validate))


@dataclass(frozen=True)
class EnsureLine(Change):
    """``line`` is present in the file at ``path``. A line matching the regular
    expression ``replace`` is replaced by it instead of adding a second one; the file
    is created (with ``mode``) if missing. ``validate`` as for WriteFile."""

    path: str
    line: str
    replace: str | None = None
    mode: int = 0o644
    validate: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        _path(self.path, "EnsureLine: path")
        _text(self.line, f"EnsureLine {self.path}: line")
        _mode(self.mode, f"EnsureLine {self.path}: mode")
        object.__setattr__(self, "validate", _validator(self.validate))
        if "\n" in self.line:
            raise ValueError("EnsureLine: line must not contain a newline")
        if self.replace is not None:
            try:
                re.compile(_text(self.replace, f"EnsureLine {self.path}: replace"))
            except re.error as e:
                raise ValueError(f"EnsureLine {self.path}: replace is not a regular expression: {e}") from None


@dataclass(frozen=True)
class Symlink(Change):
    """``path`` is a symbolic link pointing at ``target``."""

    path: str
    target: str

    def __post_init__(self):
        super().__post_init__()
        _path(self.path, "Symlink: path")
        if not _text(self.target, f"Symlink {self.path}: target") or "\0" in self.target:
            raise ValueError(f"Symlink {self.path}: target must be a non-empty path")


@dataclass(frozen=True)
class CopyFile(Change):
    """The file at ``dest`` is a copy of ``src`` (both on the target)."""

    src: str
    dest: str
    mode: int = 0o644

    def __post_init__(self):
        super().__post_init__()
        _path(self.src, "CopyFile: src"), _path(self.dest, "CopyFile: dest")
        _mode(self.mode, f"CopyFile {self.dest}: mode")

    @property
    def path(self) -> str:
        return self.dest


@dataclass(frozen=True)
class RemoveFile(Change):
    """Nothing exists at ``path`` (the original is kept for rollback)."""

    path: str

    def __post_init__(self):
        super().__post_init__()
        _path(self.path, "RemoveFile: path")


@dataclass(frozen=True)
class SparseFile(Change):
    """A sparse file of ``size`` bytes at ``path``. An existing file is never
    truncated or overwritten; it is grown only when ``grow`` is true."""

    path: str
    size: int
    grow: bool = False
    mode: int = 0o600

    def __post_init__(self):
        super().__post_init__()
        _path(self.path, "SparseFile: path")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise TypeError(f"SparseFile {self.path}: size must be a number of bytes, got {self.size!r:.60}")
        if self.size <= 0:
            raise ValueError("SparseFile: size must be more than zero")
        if not isinstance(self.grow, bool):
            raise TypeError(f"SparseFile {self.path}: grow must be true or false")
        _mode(self.mode, f"SparseFile {self.path}: mode")


@dataclass(frozen=True)
class RunCommand(Change):
    """Run ``argv`` (a list of words, never a shell string) when it is needed:
    when a path in ``onchange`` is changed by this plan, when ``creates`` does not
    exist, or when ``unless`` (an argv) exits non-zero. At least one of the three is
    required, so that a second run knows there is nothing to do. ``writes`` names
    files the command rewrites (grub.cfg for grub-mkconfig): they are backed up
    first, so a failure or a rollback puts them back too. ``timeout`` (seconds)
    bounds a command that could hang (it then fails and the run rolls back).
    ``replan``: the command changes what the rest of the plan was made from (a
    package install brings its own files): once it has run, the run commits there
    and everything after it is planned again from fresh facts, as a second run
    under the same lock."""

    argv: tuple[str, ...]
    creates: str | None = None
    unless: tuple[str, ...] | None = None
    onchange: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    timeout: float | None = None
    replan: bool = False

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "argv", _argv(self.argv, "RunCommand: argv"))
        name = f"RunCommand {self.argv[0]}"
        object.__setattr__(self, "onchange", _paths(self.onchange, f"{name}: onchange"))
        object.__setattr__(self, "writes", _paths(self.writes, f"{name}: writes"))
        if self.unless is not None:
            object.__setattr__(self, "unless", _argv(self.unless, f"{name}: unless"))
        if self.creates is not None:
            _path(self.creates, f"{name}: creates")
        if self.creates is None and self.unless is None and not self.onchange:
            raise ValueError(f"{name}: give creates, unless or onchange, so a second run can tell it is done")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not self.timeout > 0):
            raise ValueError(f"{name}: timeout must be a positive number of seconds")
        if not isinstance(self.replan, bool):
            raise TypeError(f"{name}: replan must be true or false, not {type(self.replan).__name__}")


NET_SWITCH = "/usr/local/lib/xenrun/net-switch"  # the core's switch script (xenrun/netswitch.sh)


def _commands(value, what: str) -> tuple[tuple[str, ...], ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of commands (each a list of words), not {type(value).__name__}")
    return tuple(_argv(argv, f"{what}[{i}]") for i, argv in enumerate(value))


@dataclass(frozen=True)
class SwitchNetwork(RunCommand):
    """Make a new network configuration live on a running host without cutting it off
    (S11): the core's switch script runs ``stop`` (with the old ``files`` in place),
    puts the new ``files`` (WriteFile or RemoveFile) in place, runs ``start``, then
    waits up to ``timeout`` seconds for ``uplink`` to be a port of ``bridge``, the
    bridge up with ``address`` ("dhcp": any IPv4 address), the default route through
    it and ``gateway`` (or the route's gateway) answering ping; and then for xenrun to
    confirm, over a new command on the same connection, that it still reaches the host.
    If any of it fails, or no confirmation comes, the script itself runs ``undo``,
    puts the old files back, runs ``restart`` and, if the old addresses are still
    missing, puts them back by hand: a host reached over SSH is never left cut off.

    Off the live host (a --root folder, --files-only) only the files are written:
    the new network starts at the next boot. ``argv`` and ``unless`` are made by the
    core; a second run finds the files and the bridge as planned and does nothing."""

    argv: tuple[str, ...] = ()
    bridge: str = ""
    uplink: str = ""
    address: str = "dhcp"
    files: tuple = ()
    stop: tuple = ()
    start: tuple = ()
    undo: tuple = ()
    restart: tuple = ()
    gateway: str | None = None
    switch_timeout: int = 30

    def __post_init__(self):
        name = f"SwitchNetwork {self.bridge!r:.30}"
        for what, check in (("bridge", interface), ("uplink", interface)):
            try:
                check(getattr(self, what))
            except ValueError as e:
                raise ValueError(f"{name}: {what}: {e}") from None
        if self.bridge == self.uplink:
            raise ValueError(f"{name}: the uplink cannot be the bridge itself")
        try:
            if self.address != "dhcp":
                ipv4_interface(self.address)
            if self.gateway is not None:
                ipv4_address(self.gateway)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if isinstance(self.switch_timeout, bool) or not isinstance(self.switch_timeout, int) \
                or not 1 <= self.switch_timeout <= 3600:
            raise ValueError(f"{name}: switch_timeout must be 1 to 3600 seconds")
        if not isinstance(self.files, (list, tuple)) or not self.files or \
                not all(isinstance(f, (WriteFile, RemoveFile)) for f in self.files):
            raise TypeError(f"{name}: files must be a non-empty list of WriteFile or RemoveFile")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"{name}: files name one path twice")
        if any("\t" in p for p in paths):
            raise ValueError(f"{name}: a path with a tab cannot be switched")
        object.__setattr__(self, "files", tuple(self.files))
        for what in ("stop", "start", "undo", "restart"):
            object.__setattr__(self, what, _commands(getattr(self, what), f"{name}: {what}"))
        if not self.start:
            raise ValueError(f"{name}: start must name at least one command")
        want = self.address
        object.__setattr__(self, "argv", (NET_SWITCH, "run", self.bridge, self.uplink, want,
                                          self.gateway or "-", str(self.switch_timeout)))
        object.__setattr__(self, "unless", (NET_SWITCH, "check", self.bridge, self.uplink, want))
        # bounds a hung stop/start: the script itself gives up and reverts after switch_timeout
        object.__setattr__(self, "timeout", float(self.switch_timeout + 120))
        super().__post_init__()

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.files)


FILE_CHANGES = (WriteFile, EnsureLine, Symlink, CopyFile, RemoveFile, SparseFile)


@dataclass(frozen=True)
class BootEntry:
    """Not a change: how a boot plugin's planned Xen entry boots, so that
    ``xenrun boot-check`` can boot it in QEMU before anyone reboots the host.

    ``kind`` is "grub", "syslinux" or "uefi"; ``config`` the text of the loader's
    configuration as the image holds it, at ``config_path`` inside the image;
    ``files`` maps paths inside the image to the host files they are copied from
    (Xen, the kernel, the initramfs, loader modules); ``fallback`` says the config
    holds the old entry as the loader's fallback."""

    kind: str
    config: str
    config_path: str
    files: dict[str, str]
    fallback: bool = False  # the config has a fallback entry the check may follow
    validate: tuple[str, ...] = ()  # an argv that checks ``config`` ("{}": its path)

    def __post_init__(self):
        _text(self.kind, "BootEntry: kind"), _text(self.config, "BootEntry: config")
        _text(self.config_path, "BootEntry: config_path")  # inside the image: relative
        if not isinstance(self.files, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in self.files.items()):
            raise TypeError("BootEntry: files must map paths inside the image to host paths (strings)")
        object.__setattr__(self, "validate", _validator(self.validate))
