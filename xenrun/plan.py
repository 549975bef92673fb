"""Plans: every Change diffed against the target before anything happens.

``assess`` walks the changes in order over an overlay of the target, so a change
sees what the changes before it will have done (two lines ensured in one fstab, a
command whose ``creates`` an earlier change makes). The result is a list of
Outcomes; ``--dry`` shows them and apply carries out exactly the ones marked
"change".
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from xenrun.changes import (
    Change,
    CopyFile,
    EnsureLine,
    RemoveFile,
    RunCommand,
    SparseFile,
    SwitchNetwork,
    Symlink,
    WriteFile,
)
from xenrun.errors import PlanError
from xenrun.netswitch import expand

CHANGE, UNCHANGED, PENDING = "change", "unchanged", "pending"


@dataclass(frozen=True)
class State:
    """What is (or will be) at a path: kind "file" (data, mode), "link" (link),
    "absent", "dir", or "sparse" (size only: images are never read)."""

    kind: str
    data: bytes | None = None
    mode: int | None = None
    link: str | None = None
    size: int = 0


ABSENT = State("absent")


@dataclass
class Outcome:
    change: Change
    action: str  # CHANGE, UNCHANGED or PENDING (a command left for the host)
    reason: str
    before: State | None = None
    after: State | None = None
    diff: str = ""
    files: tuple = ()  # (path, State after) of the files a SwitchNetwork puts in place

    @property
    def path(self) -> str | None:
        return getattr(self.change, "path", None)


class Overlay:
    """The target as it will be after the changes assessed so far."""

    def __init__(self, target):
        self.target = target
        self.planned: dict[str, State] = {}

    def destination(self, path: str, plugin: str) -> State:
        """The state of a file a change writes. A symbolic link there is refused:
        writing through it would change another file than the one planned (and
        shown), which a rollback would then not know."""
        self.refuse_link(path, plugin)
        return self.state(path)

    def refuse_link(self, path: str, plugin: str) -> None:
        if path not in self.planned:
            info = self.target.lstat(path)
            if info is not None and info.kind == "link":
                raise PlanError(f"{path} is a symbolic link (to {info.link}) on {self.target}: xenrun does not write"
                                f" through links ({plugin or 'a plugin'} plans it); replace the link by the file"
                                " itself, then run again")

    def state(self, path: str, follow: bool = True) -> State:
        """``follow``: a link to a file is seen as that file (edits go through the
        link); without it the link itself is seen (Symlink, RemoveFile)."""
        if path in self.planned:
            return self.planned[path]
        info = self.target.lstat(path)
        if info is None:
            return ABSENT
        if info.kind == "link" and follow:
            # a link to a file: managed through the file it leads to
            followed = self.target.stat(path)
            if followed is None or followed.kind != "file":
                return State("link", link=info.link)
            info = followed
        if info.kind == "link":
            return State("link", link=info.link)
        if info.kind == "dir":
            return State("dir")
        if info.kind != "file":
            return State("other")
        return State("file", data=self.target.read(path), mode=info.mode, size=info.size)

    def exists(self, path: str) -> bool:
        return self.state(path).kind != "absent"


def ensure_line(text: str, line: str, replace: str | None) -> str:
    """``text`` with ``line`` present: replacing the first line matching ``replace``
    (later matches dropped), else appended (with a newline before it if needed)."""
    lines = text.splitlines()
    if replace:
        pattern = re.compile(replace)
        hits = [i for i, existing in enumerate(lines) if pattern.search(existing)]
        if hits:
            lines[hits[0]] = line
            lines = [x for i, x in enumerate(lines) if i not in hits[1:]]
            return "\n".join(lines) + "\n"
    if line in lines:
        return text
    return text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"


def _same_line_endings(before: State, data: bytes) -> bytes:
    """``data`` with CRLF line endings when the file it replaces has only those:
    plugins edit text with "\\n", and a CRLF file must converge and roll back
    byte for byte rather than be rewritten on every run."""
    old = before.data or b""
    if before.kind != "file" or b"\r\n" not in old or old.count(b"\r\n") != old.count(b"\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def unified(path: str, before: State, after: State) -> str:
    def lines(s: State) -> list[str]:
        if s.kind == "file":
            try:
                return (s.data or b"").decode().splitlines(keepends=True)
            except UnicodeDecodeError:
                return [f"<binary, {len(s.data or b'')} bytes>\n"]
        if s.kind == "link":
            return [f"-> {s.link}\n"]
        if s.kind == "sparse":
            return [f"<sparse file, {s.size} bytes>\n"]
        return []
    a = "/dev/null" if before.kind == "absent" else f"a{path}"
    b = "/dev/null" if after.kind == "absent" else f"b{path}"
    text = "".join(difflib.unified_diff(lines(before), lines(after), a, b))
    return text if text.endswith("\n") or not text else text + "\n\\ No newline at end of file\n"


def assess(changes: list[Change], target, pending: frozenset = frozenset()) -> list[Outcome]:
    """Diff every change against the target, in order. Reads only. ``pending``: argv
    tuples of commands an earlier --files-only run left for the host (still needed)."""
    # a network switch runs only on the live host; elsewhere only its files are written
    changes = expand(changes, live=target.live and not target.files_only)
    read, look = _paths_of(changes)
    target.prefetch(read, stat_only=look)  # an SSH target: every path in one round trip
    view = Overlay(target)
    changed_paths: set[str] = set()
    outcomes = []
    for change in changes:
        outcome = _assess_one(change, view, target, changed_paths, pending)
        if outcome.action == CHANGE and outcome.path:
            changed_paths.add(outcome.path)
            view.planned[outcome.path] = outcome.after
        for path, after in outcome.files:
            changed_paths.add(path)
            view.planned[path] = after
        outcomes.append(outcome)
    return _leave_what_cannot_run(outcomes, target)


def _leave_what_cannot_run(outcomes: list[Outcome], target) -> list[Outcome]:
    """Commands to run that cannot run on this target become "pending" (left for
    the host). Asked once the plan is known, so an SSH root looks up every
    program at once."""
    runs = [o for o in outcomes if o.action == CHANGE and isinstance(o.change, RunCommand)]
    if runs:
        target.find_programs([o.change.argv[0] for o in runs])
    asked = {id(o) for o in runs}
    written: set[str] = set()  # executables the plan writes before a command runs them (a helper script)
    for index, outcome in enumerate(outcomes):
        if outcome.action == CHANGE and isinstance(outcome.change, WriteFile) and outcome.change.mode & 0o111:
            written.add(outcome.change.path)
        blocked = target.cannot_execute(outcome.change.argv, outcome.change.argv[0] in written) \
            if id(outcome) in asked else None
        if blocked:
            outcomes[index] = Outcome(outcome.change, PENDING, f"left for the host: {blocked}; needed: {outcome.reason}",
                                      diff=outcome.diff)
    return outcomes


def _paths_of(changes: list[Change]) -> tuple[list[str], list[str]]:
    """The paths assessing (and applying) ``changes`` reads: (read, stat only)."""
    read: list[str] = []
    look: list[str] = []
    for c in changes:
        if isinstance(c, SparseFile):
            look.append(c.path)  # a disk image is never read
        elif isinstance(c, SwitchNetwork):
            read += list(c.paths)
        elif isinstance(c, RunCommand):
            look += [c.creates] if c.creates else []
            read += list(c.writes)  # backed up before it runs
        elif isinstance(c, CopyFile):
            read += [c.src, c.dest]
        elif getattr(c, "path", None):
            read.append(c.path)
    return list(dict.fromkeys(read)), [p for p in dict.fromkeys(look) if p not in read]


def _file_outcome(change, path: str, before: State, after: State, same_reason: str) -> Outcome:
    if before.kind in ("dir", "other"):
        raise PlanError(f"{change.plugin or 'plan'}: {path} is a {before.kind}, expected a file")
    if before == after or (before.kind == after.kind == "file" and before.data == after.data):
        return Outcome(change, UNCHANGED, same_reason, before, before)
    verb = "create" if before.kind == "absent" else "remove" if after.kind == "absent" else "update"
    return Outcome(change, CHANGE, f"{verb} {path}", before, after, unified(path, before, after))


def _assess_one(change: Change, view: Overlay, target, changed: set[str], pending: frozenset = frozenset()) -> Outcome:
    if isinstance(change, WriteFile):
        before = view.destination(change.path, change.plugin)
        after = State("file", _same_line_endings(before, change.content),
                      before.mode if before.kind == "file" else change.mode)
        return _file_outcome(change, change.path, before, after, "content already as planned")
    if isinstance(change, EnsureLine):
        before = view.destination(change.path, change.plugin)
        old = (before.data or b"").decode(errors="surrogateescape") if before.kind == "file" else ""
        new = ensure_line(old, change.line, change.replace).encode(errors="surrogateescape")
        after = State("file", _same_line_endings(before, new), before.mode if before.kind == "file" else change.mode)
        return _file_outcome(change, change.path, before, after, "line already present")
    if isinstance(change, Symlink):
        before = view.state(change.path, follow=False)
        after = State("link", link=change.target)
        return _file_outcome(change, change.path, before, after, f"already links to {change.target}")
    if isinstance(change, CopyFile):
        source = view.state(change.src)
        if source.kind != "file":
            raise PlanError(f"{change.plugin or 'plan'}: cannot copy {change.src}: it does not exist on the target")
        before = view.destination(change.dest, change.plugin)
        after = State("file", source.data, before.mode if before.kind == "file" else change.mode)
        return _file_outcome(change, change.dest, before, after, f"already a copy of {change.src}")
    if isinstance(change, RemoveFile):
        before = view.state(change.path, follow=False)
        return _file_outcome(change, change.path, before, ABSENT, "already absent")
    if isinstance(change, SparseFile):
        return _assess_sparse(change, view)
    if isinstance(change, SwitchNetwork):
        return _assess_switch(change, view, target, changed, pending)
    if isinstance(change, RunCommand):
        return _assess_command(change, view, target, changed, pending)
    raise PlanError(f"unknown change type {type(change).__name__} from plugin {change.plugin!r}")


def _assess_sparse(change: SparseFile, view: Overlay) -> Outcome:
    view.refuse_link(change.path, change.plugin)  # never a disk through a link (and never read: it is big)
    info = view.target.stat(change.path) if change.path not in view.planned else None
    before = (view.planned.get(change.path) or
              (State("sparse", size=info.size) if info and info.kind == "file" else
               ABSENT if info is None else State(info.kind)))
    if before.kind not in ("absent", "sparse"):
        raise PlanError(f"{change.plugin or 'plan'}: {change.path} is a {before.kind}, expected a disk image file")
    if before.kind == "sparse":
        if before.size >= change.size:
            return Outcome(change, UNCHANGED, f"exists ({before.size} bytes); never truncated", before, before)
        if not change.grow:
            return Outcome(change, UNCHANGED, f"exists with {before.size} bytes, less than {change.size};"
                           " not grown unless asked (grow = true)", before, before)
    after = State("sparse", size=change.size)
    verb = "grow" if before.kind == "sparse" else "create sparse"
    return Outcome(change, CHANGE, f"{verb} {change.path} to {change.size} bytes", before, after,
                   unified(change.path, before, after))


def _assess_command(change: RunCommand, view: Overlay, target, changed: set[str],
                    pending: frozenset = frozenset()) -> Outcome:
    word = " ".join(change.argv)
    reasons = []
    if change.argv in pending:  # its onchange files changed in that run, not in this one
        reasons.append("left for the host by an earlier --files-only run")
    if change.onchange and changed.intersection(change.onchange):
        reasons.append(f"{', '.join(sorted(changed.intersection(change.onchange)))} changed")
    if change.creates is not None and not view.exists(change.creates):
        reasons.append(f"{change.creates} does not exist")
    if change.unless is not None:
        blocked = target.cannot_execute(change.unless)
        if blocked and change.unless[0] in view.planned and not view.target.exists(change.unless[0]):
            reasons.append(f"not done yet ({change.unless[0]}, which checks it, is new in this plan)")
        elif blocked:
            reasons.append(f"cannot check whether done ({change.unless[0]} cannot run)")
        elif target.execute(change.unless, timeout=60).rc != 0:
            reasons.append(f"{' '.join(change.unless)} says not done")
    if not reasons:
        done = [f"{change.creates} exists"] if change.creates else []
        done += [f"{' '.join(change.unless)} says done"] if change.unless else []
        done += ["nothing it depends on changed"] if change.onchange else []
        return Outcome(change, UNCHANGED, "; ".join(done))
    return Outcome(change, CHANGE, "; ".join(reasons), diff=f"$ {word}\n")  # or pending: _leave_what_cannot_run


def _assess_switch(change: SwitchNetwork, view: Overlay, target, changed: set[str], pending: frozenset) -> Outcome:
    """A network switch: its files diffed as WriteFile and RemoveFile would be, and
    its run needed when one of them changes or the bridge is not as planned."""
    files, diffs = [], []
    for file in change.files:
        outcome = _assess_one(file, view, target, changed)
        if outcome.action == CHANGE:
            files.append((file.path, outcome.after))
            diffs.append(outcome.diff)
    command = _assess_command(change, view, target, changed, pending)
    if files:
        reason = f"{', '.join(p for p, _ in files)} to change" + (
            f"; {command.reason}" if command.action == CHANGE else "")
        return Outcome(change, CHANGE, reason, diff="".join(diffs) + f"$ {' '.join(change.argv)}\n",
                       files=tuple(files))
    return command
