"""Changes: the small frozen values plugins return and only the core applies.

Each says what the target should look like (not how to get there), so the core can
diff it against the target first, show it with --dry, and find nothing to do on a
second run. ``step`` is the article's step id (S1..S27) and ``why`` one line for the
plan; ``plugin`` is filled in by the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xenrun.settings import absolute_path


def _path(value: str) -> str:
    try:
        return absolute_path(value)
    except ValueError as e:
        raise ValueError(f"change path: {e}") from None


@dataclass(frozen=True)
class Change:
    step: str = field(default="", kw_only=True)
    why: str = field(default="", kw_only=True)
    plugin: str = field(default="", kw_only=True)

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
        _path(self.path)
        if isinstance(self.content, str):
            object.__setattr__(self, "content", self.content.encode())
        object.__setattr__(self, "validate", tuple(self.validate))


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
        _path(self.path)
        object.__setattr__(self, "validate", tuple(self.validate))
        if "\n" in self.line:
            raise ValueError("EnsureLine: line must not contain a newline")


@dataclass(frozen=True)
class Symlink(Change):
    """``path`` is a symbolic link pointing at ``target``."""

    path: str
    target: str

    def __post_init__(self):
        _path(self.path)


@dataclass(frozen=True)
class CopyFile(Change):
    """The file at ``dest`` is a copy of ``src`` (both on the target)."""

    src: str
    dest: str
    mode: int = 0o644

    def __post_init__(self):
        _path(self.src), _path(self.dest)

    @property
    def path(self) -> str:
        return self.dest


@dataclass(frozen=True)
class RemoveFile(Change):
    """Nothing exists at ``path`` (the original is kept for rollback)."""

    path: str

    def __post_init__(self):
        _path(self.path)


@dataclass(frozen=True)
class SparseFile(Change):
    """A sparse file of ``size`` bytes at ``path``. An existing file is never
    truncated or overwritten; it is grown only when ``grow`` is true."""

    path: str
    size: int
    grow: bool = False
    mode: int = 0o600

    def __post_init__(self):
        _path(self.path)
        if self.size <= 0:
            raise ValueError("SparseFile: size must be more than zero")


@dataclass(frozen=True)
class RunCommand(Change):
    """Run ``argv`` (a list of words, never a shell string) when it is needed:
    when a path in ``onchange`` is changed by this plan, when ``creates`` does not
    exist, or when ``unless`` (an argv) exits non-zero. At least one of the three is
    required, so that a second run knows there is nothing to do. ``writes`` names
    files the command rewrites (grub.cfg for grub-mkconfig): they are backed up
    first, so a failure or a rollback puts them back too. ``timeout`` (seconds)
    bounds a command that could hang (it then fails and the run rolls back)."""

    argv: tuple[str, ...]
    creates: str | None = None
    unless: tuple[str, ...] | None = None
    onchange: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    timeout: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "onchange", tuple(self.onchange))
        object.__setattr__(self, "writes", tuple(self.writes))
        if self.unless is not None:
            object.__setattr__(self, "unless", tuple(self.unless))
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError("RunCommand: argv must be a non-empty list of strings")
        if self.creates is None and self.unless is None and not self.onchange:
            raise ValueError(f"RunCommand {self.argv[0]}: give creates, unless or onchange, so a second run can tell it is done")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"RunCommand {self.argv[0]}: timeout must be a positive number of seconds")
        for p in (self.creates, *self.onchange, *self.writes):
            if p is not None:
                _path(p)


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
