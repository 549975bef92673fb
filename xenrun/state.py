"""xenrun's state on a target: the folder /var/lib/xenrun, each run's journal (its
records checked for shape when read), and the commands --files-only runs left for
the host (the pending file). Read by the applier, recovery, rollback and the flows;
nothing here writes a managed file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import structlog

from xenrun.errors import TargetError
from xenrun.changes import RunCommand
from xenrun.plan import PENDING, Outcome

STATE_DIR = "/var/lib/xenrun"
END_RECORDS = ("commit", "undone", "failed")
RECOVERY_RECORDS = ("saved", "mkdir")  # what _undo reads: durable before what they cover changes


def digest(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


@dataclass
class Journal:
    """A run's records. ``write`` makes a record durable at once (with any noted
    before it); ``note`` keeps it until the next ``flush`` or ``write``. The
    applier notes the "mkdir" and "saved" records of a stretch of changes
    together and makes them durable (``secure``) before the first of those
    changes; the "done" and "ran" records, which recovery does not read, wait
    for the next flush. A crash loses only records that recovery does not need."""

    target: object
    run_id: str
    records: list[dict] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    needed: bool = False  # a record recovery reads is among the pending ones

    @property
    def folder(self) -> str:
        return f"{STATE_DIR}/runs/{self.run_id}"

    def note(self, **record) -> None:
        self.records.append(record)
        self.pending.append(json.dumps(record, sort_keys=True))
        self.needed = self.needed or record["op"] in RECOVERY_RECORDS

    def flush(self) -> None:
        if self.pending:
            lines, self.pending, self.needed = "\n".join(self.pending), [], False
            self.target.append_line(f"{self.folder}/journal", lines)

    def secure(self) -> None:
        """Flush if recovery needs a pending record (before anything is touched)."""
        if self.needed:
            self.flush()

    def write(self, **record) -> None:
        self.note(**record)
        self.flush()

    @classmethod
    def read(cls, target, run_id: str) -> "Journal":
        path = f"{STATE_DIR}/runs/{run_id}/journal"
        info = target.lstat(f"{STATE_DIR}/runs/{run_id}")
        if info is not None and info.kind != "dir":
            raise _damaged(target, f"{STATE_DIR}/runs/{run_id}", f"is a {info.kind}, not a run's folder")
        data = target.read(path) or b""
        records = []
        lines = data.decode(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                if number == len(lines):
                    break  # a torn last line: the run died writing it
                raise _damaged(target, f"{path}:{number}", "is not a JSON record") from None
            problem = _record_problem(record)
            if problem:
                raise _damaged(target, f"{path}:{number}", problem)
            records.append(record)
        return cls(target, run_id, records)

    @property
    def ended(self) -> str | None:
        ends = [r["op"] for r in self.records if r.get("op") in END_RECORDS]
        return ends[-1] if ends else None

    @property
    def kind(self) -> str:
        return self.records[0].get("kind", "apply") if self.records else "apply"


PENDING_FILE = f"{STATE_DIR}/pending"  # commands --files-only runs left for the host
_STATE_KINDS = {"absent": (), "link": ("target",), "sparse": ("size",), "file": ("copy", "mode", "uid", "gid")}


def _record_problem(record) -> str | None:
    """What is wrong with a journal record's shape (what _undo and rollback read), or None."""
    if not isinstance(record, dict) or not isinstance(record.get("op"), str):
        return "is not a record with an op"
    if record["op"] in ("saved", "mkdir", "done") and not (isinstance(record.get("path"), str)
                                                          and record["path"].startswith("/")):
        return f"has a {record['op']} record without an absolute path"
    if record["op"] == "saved":
        state = record.get("state")
        if not isinstance(state, dict) or state.get("kind") not in _STATE_KINDS:
            return "has a saved record whose state is not one xenrun writes"
        for key in _STATE_KINDS[state["kind"]]:
            wanted = str if key in ("target", "copy") else int
            if not isinstance(state.get(key), wanted) or isinstance(state.get(key), bool):
                return f"has a saved record whose state lacks {key}"
    return None


def _damaged(target, where: str, problem: str) -> TargetError:
    return TargetError(f"{target}: xenrun's state is damaged: {where} {problem}. xenrun cannot tell what that"
                       f" run changed: move the folder away (keep it, its orig/ holds the originals) and run again")


def check_state_folder(target) -> None:
    """xenrun's state folder (journals, originals, the lock) must be a real folder
    of the machine: through a link its records could land outside the root, or
    somewhere a rollback does not look."""
    for folder in (STATE_DIR, f"{STATE_DIR}/runs"):
        info = target.lstat(folder)
        if info is None or info.kind == "dir":
            continue
        what = f"a symbolic link (to {info.link})" if info.kind == "link" else f"a {info.kind}, not a folder"
        raise TargetError(f"{target}: {folder} is {what}: xenrun keeps its state in a real folder there;"
                          " put a folder in its place (moving xenrun's files into it) and run again")


def _pending(target) -> list[tuple[tuple, str | None]]:
    """The pending file's (argv, run that left it) pairs."""
    data = target.read(PENDING_FILE)
    if not data:
        return []
    try:
        text = json.loads(data)
        runs = text.get("runs") or [None] * len(text["commands"])
        return [(tuple(argv), run if isinstance(run, str) else None) for argv, run in zip(text["commands"], runs)
                if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)]
    except (ValueError, KeyError, TypeError, AttributeError):
        structlog.get_logger().warning("unreadable; no command is taken as left for the host", file=PENDING_FILE)
        return []


def pending_commands(target) -> frozenset:
    """The argv tuples an earlier --files-only run left for the host and no run has
    carried out since (a command guarded only by ``onchange`` would otherwise be
    forgotten: the files it follows are unchanged on the next run)."""
    check_state_folder(target)
    return frozenset(argv for argv, _ in _pending(target))


def left_by(target, run_id: str) -> frozenset:
    """The commands pending because run ``run_id`` left them."""
    return frozenset(argv for argv, run in _pending(target) if run == run_id)


def still_pending(outcomes: list[Outcome], pending: frozenset, results: list[str] | None = None) -> frozenset:
    """What is pending after a run: commands left pending now, and those pending before
    that did not run (``results``: the apply's status per outcome)."""
    now = set()
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome.change, RunCommand):
            ran = results is not None and results[index] == "changed"
            if outcome.action == PENDING or (outcome.change.argv in pending and not ran):
                now.add(outcome.change.argv)
    return frozenset(now)


def pending_file_data(target, pending: frozenset, now: frozenset, run: str | None = None) -> bytes | None:
    """The pending file's new content for the commands pending ``now`` (each with
    the run that left it: ``run`` for those new now), None when none are."""
    if not now:
        return None
    before = dict(_pending(target))
    commands = sorted(now)
    text = json.dumps({"commands": [list(argv) for argv in commands],
                       "runs": [before.get(argv) if argv in pending else run for argv in commands]}, indent=1)
    return text.encode() + b"\n"


def remember_pending(target, pending: frozenset, now: frozenset, run: str | None = None) -> None:
    """Write the commands pending (under the lock, outside any run), or remove the
    file when none are."""
    if now == pending:
        return
    if (data := pending_file_data(target, pending, now, run)) is not None:
        target.write_atomic(PENDING_FILE, data, 0o600)
    else:
        target.remove(PENDING_FILE)


def run_ids(target) -> list[str]:
    return target.listdir(f"{STATE_DIR}/runs") or []


def read_state(target) -> None:
    """Read what a run reads of xenrun's state on the target (the commands pending,
    every run's journal): an SSH target fetches it all in one go before."""
    pending_commands(target)
    for run_id in run_ids(target):
        Journal.read(target, run_id)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}-{os.getpid()}"
