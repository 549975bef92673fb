"""Apply: carry out a plan's "change" outcomes, safely.

- One lock per target (STATE/lock); a second run fails at once naming the holder.
- A journal per run (STATE/runs/ID/journal, JSON lines, fsynced): before a file is
  touched its original is copied to STATE/runs/ID/orig/N and recorded, so the run
  can always be undone byte for byte.
- Every write is atomic (xenrun.target.write_atomic); a validator checks the new
  content before it goes live.
- Any failure undoes every file this run changed, and the run ends with ApplyError.
- A run killed at any point leaves a journal without an end record; the next run
  undoes it before planning (``recover``), so nothing stays half-done.
- ``rollback_plan`` turns the last committed run's originals into a plan that puts
  them back, applied through this same machinery.

XENRUN_CRASH_AT=N (tests only) kills the process with SIGKILL at the N-th crash
point, so the tests can prove the claims above at every point.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import structlog

from xenrun.changes import RemoveFile, RunCommand, SparseFile, Symlink, WriteFile
from xenrun.errors import ApplyError
from xenrun.plan import CHANGE, PENDING, Outcome, State

STATE_DIR = "/var/lib/xenrun"
END_RECORDS = ("commit", "undone", "failed")


def _sha(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


class CrashPoints:
    """Counts the points where a crash test may kill the run."""

    def __init__(self):
        self.count = 0
        at = os.environ.get("XENRUN_CRASH_AT")
        self.at = int(at) if at and at.isdigit() else None

    def __call__(self, label: str) -> None:
        self.count += 1
        if self.at is not None and self.count == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Journal:
    """A run's records. ``write`` makes a record durable at once (with any noted
    before it); ``note`` keeps it until the next ``flush`` or ``write``, for
    records nothing depends on until then: the applier flushes before it touches
    a file or runs a command, so every "saved" record is on disk before its file
    changes, and one fsync covers the "done" of a change and the "saved" of the
    next. A crash loses only records that recovery does not need."""

    target: object
    run_id: str
    records: list[dict] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return f"{STATE_DIR}/runs/{self.run_id}"

    def note(self, **record) -> None:
        self.records.append(record)
        self.pending.append(json.dumps(record, sort_keys=True))

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = "\n".join(self.pending), []
            self.target.append_line(f"{self.folder}/journal", lines)

    def write(self, **record) -> None:
        self.note(**record)
        self.flush()

    @classmethod
    def read(cls, target, run_id: str) -> "Journal":
        data = target.read(f"{STATE_DIR}/runs/{run_id}/journal") or b""
        records = []
        for line in data.decode(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line: the run died writing it
        return cls(target, run_id, records)

    @property
    def ended(self) -> str | None:
        ends = [r["op"] for r in self.records if r.get("op") in END_RECORDS]
        return ends[-1] if ends else None

    @property
    def kind(self) -> str:
        return self.records[0].get("kind", "apply") if self.records else "apply"


PENDING_FILE = f"{STATE_DIR}/pending"  # commands --files-only runs left for the host


def owed_commands(target) -> frozenset:
    """The argv tuples an earlier --files-only run left for the host and no run has
    carried out since (a command guarded only by ``onchange`` would otherwise be
    forgotten: the files it follows are unchanged on the next run)."""
    data = target.read(PENDING_FILE)
    if not data:
        return frozenset()
    try:
        return frozenset(tuple(argv) for argv in json.loads(data)["commands"]
                         if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv))
    except (ValueError, KeyError, TypeError):
        structlog.get_logger().warning("unreadable; no command is taken as left for the host", file=PENDING_FILE)
        return frozenset()


def still_owed(outcomes: list[Outcome], owed: frozenset, results: list[str] | None = None) -> frozenset:
    """What is owed after a run: commands left pending now, and those owed before
    that did not run (``results``: the apply's status per outcome)."""
    now = set()
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome.change, RunCommand):
            ran = results is not None and results[index] == "changed"
            if outcome.action == PENDING or (outcome.change.argv in owed and not ran):
                now.add(outcome.change.argv)
    return frozenset(now)


def remember_owed(target, owed: frozenset, now: frozenset) -> None:
    """Write the commands owed (under the lock), or remove the file when none are."""
    if now == owed:
        return
    if now:
        text = json.dumps({"commands": sorted(list(argv) for argv in now)}, indent=1) + "\n"
        target.write_atomic(PENDING_FILE, text.encode(), 0o600)
    else:
        target.remove(PENDING_FILE)


def run_ids(target) -> list[str]:
    return target.listdir(f"{STATE_DIR}/runs") or []


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}-{os.getpid()}"


class Applier:
    """Applies outcomes on one target, under its lock."""

    def __init__(self, target, host: str, log, kind: str = "apply", **begin):
        self.target, self.host, self.log, self.kind, self.begin = target, host, log, kind, begin
        self.point = CrashPoints()
        self.journal: Journal | None = None
        self._saved: set[str] = set()
        self._copies = 0

    # -- lock and recovery -------------------------------------------------------
    def lock(self) -> None:
        self.target.lock(f"{STATE_DIR}/lock",
                         f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")

    def unlock(self) -> None:
        self.target.unlock()

    def recover(self) -> list[str]:
        """Undo every run that died before its end record. Returns their ids."""
        undone = []
        for run_id in run_ids(self.target):
            journal = Journal.read(self.target, run_id)
            if journal.records and journal.ended is None:
                self.log.warning("undoing an interrupted run", run=run_id)
                _undo(self.target, journal)
                journal.write(op="undone", reason="interrupted; undone by a later run")
                undone.append(run_id)
        return undone

    # -- apply -------------------------------------------------------------------
    def apply(self, outcomes: list[Outcome]) -> dict:
        """Carry out the "change" outcomes in order. Returns {"run": id, "results":
        [status per outcome]}; on failure undoes this run and raises ApplyError."""
        todo = [o for o in outcomes if o.action == CHANGE]
        results = [o.action for o in outcomes]
        if not todo:
            return {"run": None, "results": results}
        self.journal = Journal(self.target, new_run_id())
        self.target.makedirs(f"{self.journal.folder}/orig")
        self.journal.note(op="begin", kind=self.kind, host=self.host, pid=os.getpid(), time=time.time(),
                           **self.begin)
        self.point("begin")
        current = None
        try:
            for index, outcome in enumerate(outcomes):
                if outcome.action != CHANGE:
                    continue
                current = outcome
                self._apply_one(outcome)
                results[index] = "changed"
        except BaseException as e:
            _undo(self.target, self.journal)
            what = _describe(current.change) if current else "apply"
            self.journal.write(op="failed", step=what, error=str(e))
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ApplyError(f"{self.host}: {what} failed: {e}; every file this run changed was put back") from e
        self.journal.write(op="commit", time=time.time())
        self.point("commit")
        return {"run": self.journal.run_id, "results": results}

    def _save(self, path: str, follow: bool = True) -> None:
        """Copy the original of ``path`` into the run's folder, once per run.
        ``follow``: a link to a file is saved as that file's content (the change
        edits through the link); otherwise the link itself is saved."""
        if path in self._saved:
            return
        info = self.target.lstat(path)
        followed = self.target.stat(path) if info is not None else None
        if info is None:
            state = {"kind": "absent"}
        elif info.kind == "link" and (not follow or followed is None or followed.kind != "file"):
            state = {"kind": "link", "target": info.link}
        else:
            real = self.target.stat(path)
            data = self.target.read(path)
            self._copies += 1
            copy = f"{self.journal.folder}/orig/{self._copies}"
            self.target.write_new(copy, data, 0o600)  # referred to only by the record below
            state = {"kind": "file", "copy": copy, "mode": real.mode, "uid": real.uid, "gid": real.gid,
                     "sha256": _sha(data)}
            self.point("original copied")
        self.journal.note(op="saved", path=path, state=state)  # flushed before the file is touched
        self._saved.add(path)
        self.point("original recorded")

    def _parents(self, path: str) -> None:
        for folder in self.target.makedirs(path.rpartition("/")[0] or "/"):
            self.journal.write(op="mkdir", path=folder)
            self.point("folder created")

    def _apply_one(self, outcome: Outcome) -> None:
        change = outcome.change
        if isinstance(change, RunCommand):
            for path in change.writes:
                self._save(path, follow=False)  # a link the command replaces comes back as a link
            self.log.info("running", command=" ".join(change.argv), step=change.step)
            self.journal.flush()  # the originals of what it writes are on record
            result = self.target.run(change.argv, timeout=change.timeout)
            self.journal.note(op="ran", argv=list(change.argv), rc=result.rc)
            self.point("command ran")
            if result.rc != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"exit code {result.rc}" + (f": {' / '.join(tail)}" if tail else ""))
            return
        path = outcome.path
        self._parents(path)
        if isinstance(change, SparseFile):
            before = self.target.stat(path)
            self.journal.note(op="saved", path=path, state={"kind": "sparse", "size": before.size}
                              if before else {"kind": "absent", "image": True})
            self.point("original recorded")
            self.journal.flush()
            self.target.make_sparse(path, change.size, change.mode)
        else:
            self._save(path, follow=not isinstance(change, (Symlink, RemoveFile)))
            self.journal.flush()  # the original is on record before the file changes
            self._write_state(path, outcome.after, getattr(change, "validate", ()))
        self.journal.note(op="done", path=path, sha256=_sha(outcome.after.data))
        self.point("file done")

    def _write_state(self, path: str, after: State, validate: tuple[str, ...]) -> None:
        if after.kind == "absent":
            self.target.remove(path)
        elif after.kind == "link":
            self.target.symlink(path, after.link)
        else:
            info = self.target.stat(path)
            uid, gid = (info.uid, info.gid) if info else (None, None)

            def before_rename(tmp):
                self.point("temp written")
                if validate:
                    result = self.target.run_on_file(validate, tmp)
                    if result.rc != 0:
                        msg = (result.stderr or result.stdout).strip().splitlines()
                        raise RuntimeError(f"{' '.join(validate)} rejected the new {path}"
                                           + (f": {msg[-1]}" if msg else ""))
            self.target.write_atomic(path, after.data, after.mode if after.mode is not None else 0o644,
                                     uid, gid, before_rename=before_rename)
        self.point("file written")


def _undo(target, journal: Journal) -> None:
    """Put back every file a run touched, newest first, and remove the folders it
    made. Safe to repeat: every step sets a final state."""
    for record in reversed(journal.records):
        op, path = record.get("op"), record.get("path")
        if op == "saved":
            state = record["state"]
            tmp = path.rpartition("/")
            target.remove(f"{tmp[0]}/.{tmp[2]}.xenrun-tmp")
            if state["kind"] == "absent":
                target.remove(path)
            elif state["kind"] == "link":
                target.symlink(path, state["target"])
            elif state["kind"] == "sparse":
                target.truncate(path, state["size"])
            else:
                data = target.read(state["copy"])
                if data is None:
                    continue  # the copy itself was never finished: the file was not touched
                target.write_atomic(path, data, state["mode"], state["uid"], state["gid"])
        elif op == "mkdir":
            target.rmdir(path)


def _describe(change) -> str:
    if isinstance(change, RunCommand):
        return f"command {' '.join(change.argv)}"
    return f"{change.kind} {getattr(change, 'path', '')}".strip()


def remove_created_folders(target, run_id: str) -> None:
    """After a rollback: remove the folders run ``run_id`` created, if empty."""
    for record in reversed(Journal.read(target, run_id).records):
        if record.get("op") == "mkdir":
            target.rmdir(record["path"])


def rollback_changes(target) -> tuple[str | None, list]:
    """The last committed apply run (not itself undone or rolled back) and the
    changes that put its originals back. Files edited since that run are refused."""
    rolled = set()
    runs = sorted(run_ids(target))
    journals = [Journal.read(target, r) for r in runs]
    for j in journals:
        for r in j.records:
            if r.get("op") == "begin" and r.get("rollback_of"):
                if j.ended == "commit":
                    rolled.add(r["rollback_of"])
    for j in reversed(journals):
        if j.ended != "commit" or j.kind != "apply" or j.run_id in rolled:
            continue
        changes, done = [], {r["path"]: r.get("sha256") for r in j.records if r.get("op") == "done"}
        for r in j.records:
            if r.get("op") != "saved":
                continue
            path, state = r["path"], r["state"]
            if state["kind"] == "sparse" or state.get("image"):
                # a disk image may hold a guest's data by now: never removed or shrunk by a rollback
                structlog.get_logger().warning("disk image kept; remove or shrink it by hand if unwanted", path=path)
                continue
            now = target.read(path) if done.get(path) and (target.lstat(path) or State("absent")).kind == "file" else None
            if path in done and done[path] and now is not None and _sha(now) != done[path]:
                raise ApplyError(f"{path} was changed after run {j.run_id}; not rolling back over that edit"
                                 " (restore it by hand from " f"{STATE_DIR}/runs/{j.run_id}/orig)")
            why = f"rollback of run {j.run_id}"
            if state["kind"] == "absent":
                changes.append(RemoveFile(path, why=why))
            elif state["kind"] == "link":
                changes.append(Symlink(path, state["target"], why=why))
            elif state["kind"] == "file":
                changes.append(WriteFile(path, target.read(state["copy"]), mode=state["mode"], why=why))
        return j.run_id, changes
    return None, []
