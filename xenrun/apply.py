"""Apply: carry out a plan's "change" outcomes, safely.

- One lock per target (STATE/lock); a second run fails at once naming the holder.
- A journal per run (STATE/runs/ID/journal, JSON lines, fsynced): before a file is
  touched its original is copied to STATE/runs/ID/orig/N and recorded, so the run
  can always be undone byte for byte. This is done per stretch of changes (up to
  and including the next command): every original of the stretch copied and on
  record in one go, then its changes, consecutive file writes together; over SSH
  a stretch costs a fixed number of round trips, not a few per file.
- Every write is atomic (Target.write_atomic, xenrun.targets); a validator checks the new
  content before it goes live.
- Any failure undoes every file this run changed, and the run ends with ApplyError.
- A run killed at any point leaves a journal without an end record; the next run
  undoes it before planning (``recover``), so nothing stays half-done.
- ``rollback_plan`` turns the last committed run's originals into a plan that puts
  them back, applied through this same machinery.

XENRUN_CRASH_AT=N (tests only) kills the process with SIGKILL at the N-th crash
point, so the tests can prove the claims above at every point. XENRUN_PAUSE_AT=
LABEL:K (tests only) stops it (SIGSTOP) at the K-th point of that label, after
saying so on stderr, so the end-to-end test can cut the machine's power there.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import structlog

from xenrun.changes import RemoveFile, RunCommand, SparseFile, SwitchNetwork, Symlink, WriteFile
from xenrun.errors import ApplyError, HostLost, TargetError
from xenrun.netswitch import confirm_argv, plan_folder, run_argv
from xenrun.plan import CHANGE, Outcome, State
from xenrun.state import (PENDING_FILE, STATE_DIR, Journal, check_state_folder, digest, new_run_id, pending_file_data,
                          read_state, run_ids)

def _left_as(after: State) -> dict:
    """A "done" record's account of what the run left at a path, so a rollback can
    tell a hand edit since (new content, a link retargeted or put in a file's place)."""
    left = {"sha256": digest(after.data), "kind": after.kind}
    return {**left, "link": after.link} if after.kind == "link" else left


def _edited_since(target, path: str, done: dict) -> str | None:
    """How ``path`` differs from what the run left there (its "done" record), or None."""
    now = target.lstat(path)
    kind = done.get("kind")
    if kind is None:  # a record of an older xenrun: only the content was noted
        if done.get("sha256") and now is not None and now.kind == "file":
            return "was changed" if digest(target.read(path)) != done["sha256"] else None
        return None
    if kind == "file" and now is not None and now.kind == "file":
        return "was changed" if digest(target.read(path)) != done.get("sha256") else None
    if kind == "link" and now is not None and now.kind == "link":
        return f"was pointed at {now.link}" if now.link != done.get("link") else None
    if kind in ("file", "link") and now is None:
        return None  # removed by hand: putting the original back loses nothing of the user's
    if now is None or (now.kind == kind):
        return None
    return f"is now a {'symbolic link' if now.kind == 'link' else now.kind}"


class CrashPoints:
    """Counts the points where a crash test may kill the run."""

    def __init__(self, flush=None):
        self.flush = flush  # the target's writes waiting: made before a kill or pause (the state the label says)
        self.count = 0
        self.seen: dict[str, int] = {}
        at = os.environ.get("XENRUN_CRASH_AT")
        self.at = int(at) if at and at.isdigit() else None
        label, _, nth = os.environ.get("XENRUN_PAUSE_AT", "").rpartition(":")
        self.pause_at = (label, int(nth)) if label and nth.isdigit() else None

    def __call__(self, label: str) -> None:
        self.count += 1
        self.seen[label] = self.seen.get(label, 0) + 1
        if self.flush is not None and (self.at == self.count or self.pause_at == (label, self.seen[label])):
            self.flush()
        if self.at is not None and self.count == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.pause_at == (label, self.seen[label]):
            os.write(2, f"xenrun: paused at crash point {label}:{self.seen[label]} (XENRUN_PAUSE_AT)\n".encode())
            os.kill(os.getpid(), signal.SIGSTOP)


class Applier:
    """Applies outcomes on one target, under its lock."""

    def __init__(self, target, host: str, log, kind: str = "apply", **begin):
        self.target, self.host, self.log, self.kind, self.begin = target, host, log, kind, begin
        self.point = CrashPoints(target.flush)
        self.journal: Journal | None = None
        self._run_id: str | None = None  # chosen by lock(), for the free space measured with it
        self._saved: set[str] = set()
        self._copies = 0

    # -- lock and recovery -------------------------------------------------------
    def lock(self, room_for: list[Outcome] = ()) -> None:
        """``room_for``: the outcomes the run is expected to apply; a target may
        measure their free space along with the lock (the first stretch's check
        then needs no round trip of its own)."""
        check_state_folder(self.target)
        self._run_id = new_run_id()
        if room_for:
            orig = f"{STATE_DIR}/runs/{self._run_id}/orig"
            self.target.free_space_ahead(list(dict.fromkeys(
                [o.path for o in room_for if o.action == CHANGE and o.path and not isinstance(o.change, RunCommand)]
                + [orig])))
        self.target.lock(f"{STATE_DIR}/lock",
                         f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.target.read_ahead(lambda: read_state(self.target))  # what recovery and the plan under the lock read

    def unlock(self) -> None:
        self.target.unlock()

    def recover(self) -> list[str]:
        """Undo every run that died before its end record. Returns their ids."""
        undone = []
        for run_id in run_ids(self.target):
            journal = Journal.read(self.target, run_id)
            if journal.records and journal.ended is None:
                self.log.warning("undoing an interrupted run", run=run_id)
                failed = _undo(self.target, journal)
                if failed:  # left un-ended: the next run tries again
                    raise ApplyError(f"{self.host}: undoing interrupted run {run_id}: "
                                     + _not_put_back(failed, journal))
                journal.write(op="undone", reason="interrupted; undone by a later run")
                undone.append(run_id)
        return undone

    # -- apply -------------------------------------------------------------------
    def apply(self, outcomes: list[Outcome], pending_after=None) -> dict:
        """Carry out the "change" outcomes in order. Returns {"run": id, "results":
        [status per outcome]}; on failure undoes this run and raises ApplyError.
        ``pending_after(results)`` gives (pending before, pending now): the pending file is
        then written as the run's last change, before its commit record, so a
        crash never loses the commands the run leaves for the host (an undone run
        puts the file back with the others).

        The changes go in stretches that end with a command (or the plan): first
        the stretch's folders are made and the originals of everything it will
        touch are copied and put on record, durably, in one go; then its changes
        are made, consecutive file writes together."""
        todo = [o for o in outcomes if o.action == CHANGE]
        results = [o.action for o in outcomes]
        if not todo:
            return {"run": None, "results": results}
        run_id, self._run_id = self._run_id or new_run_id(), None
        self.journal = Journal(self.target, run_id)
        self.journal.note(op="begin", kind=self.kind, host=self.host, pid=os.getpid(), time=time.time(),
                          **self.begin)
        self.point("begin")
        current: list[Outcome] = []
        try:
            # over SSH the writes wait for the next request, all made by the block's end (targets/ssh/shellfiles.py);
            # a commit record that cannot be written undoes the run now, as the next run would
            with self.target.deferred():
                for number, stretch in enumerate(_stretches(outcomes)):
                    current = [outcomes[i] for i in stretch]
                    self._prepare(current, first=number == 0)
                    for batch in _batches(stretch, outcomes):
                        current = [outcomes[i] for i in batch]
                        if len(batch) > 1 or (_batched(current[0]) and current[0].after.kind == "file"):
                            self._write_batch(current)
                        else:
                            self._apply_one(current[0])
                        for index in batch:
                            results[index] = "changed"
                if pending_after is not None:
                    current = []
                    self._leave_pending(*pending_after(results))
                current = []
                self.journal.write(op="commit", time=time.time())
        except BaseException as e:
            failed = _undo(self.target, self.journal)
            what = ", ".join(_describe(o.change) for o in current[:3]) + (" ..." if len(current) > 3 else "") \
                if current else "apply"
            if isinstance(e, TargetError):  # the machine's own words name the path: the batch is noise
                what = "apply"
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                if not failed:
                    self.journal.write(op="failed", step=what, error=str(e))
                raise
            if failed:  # no end record: the next run undoes what is left
                raise ApplyError(f"{self.host}: {what} failed: {e}; every other file was put back, but "
                                 + _not_put_back(failed, self.journal)) from e
            self.journal.write(op="failed", step=what, error=str(e))
            raise ApplyError(f"{self.host}: {what} failed: {e}; every file this run changed was put back") from e
        self.point("commit")
        return {"run": self.journal.run_id, "results": results}

    def _leave_pending(self, pending: frozenset, now: frozenset) -> None:
        if now == pending:
            return
        data = pending_file_data(self.target, pending, now, self.journal.run_id)
        self._save([(PENDING_FILE, "follow")])
        self.journal.secure()
        self.point("pending on record")
        if data is not None:
            self.target.write_atomic(PENDING_FILE, data, 0o600)
        else:
            self.target.remove(PENDING_FILE)
        self.journal.note(op="done", path=PENDING_FILE, sha256=digest(data))
        self.point("pending written")

    def _prepare(self, stretch: list[Outcome], first: bool) -> None:
        """Before a stretch changes anything: the folders its files need made, and
        the originals of what it touches (the files, the paths its command writes)
        copied once per run and on record, durably."""
        orig = f"{self.journal.folder}/orig"
        files = [o.path for o in stretch if not isinstance(o.change, RunCommand)]
        files += [p for o in stretch if isinstance(o.change, SwitchNetwork) for p in o.change.paths]
        made = self.target.makedirs_many(([orig] if first else []) + [p.rpartition("/")[0] or "/" for p in files])
        for folder in made:
            if folder != orig and not orig.startswith(folder + "/"):  # the run's own folders stay
                self.journal.note(op="mkdir", path=folder)
                self.point("folder created")
        _check_room(self.target, stretch, orig, self._saved)  # the run's folder exists: its failure record fits
        wanted = []  # (path, how): "follow", "link" (a link is saved as a link) or "image"
        for o in stretch:
            if isinstance(o.change, SwitchNetwork):
                wanted += [(p, "follow") for p in o.change.paths]  # the script puts them back itself too
            elif isinstance(o.change, RunCommand):
                wanted += [(p, "link") for p in o.change.writes]  # a link the command replaces comes back as one
            elif isinstance(o.change, SparseFile):
                wanted.append((o.path, "image"))
            else:
                wanted.append((o.path, "link" if isinstance(o.change, (Symlink, RemoveFile)) else "follow"))
        first_how: dict[str, str] = {}
        for path, how in wanted:
            first_how.setdefault(path, how)
        self._save([(p, how) for p, how in first_how.items() if p not in self._saved])
        self.journal.secure()
        self.point("originals on record")

    def _save(self, wanted: list[tuple[str, str]]) -> None:
        """Copy the originals of ``wanted`` (path, how) into the run's folder and
        note their records. A link to a file is saved as that file's content when
        the change edits through it ("follow"), as the link otherwise; a disk
        image by its size, never its data."""
        if wanted:  # an SSH target: every path in one round trip
            self.target.prefetch([p for p, how in wanted if how != "image"], stat_only=[p for p, how in wanted if how == "image"])
        copies, records = [], []
        for path, how in wanted:
            info = self.target.lstat(path)
            followed = self.target.stat(path) if info is not None else None
            if how == "image":
                state = {"kind": "sparse", "size": followed.size} if followed else {"kind": "absent", "image": True}
            elif info is None:
                state = {"kind": "absent"}
            elif info.kind == "link" and (how == "link" or followed is None or followed.kind != "file"):
                state = {"kind": "link", "target": info.link}
            else:
                data = self.target.read(path)
                self._copies += 1
                copy = f"{self.journal.folder}/orig/{self._copies}"
                copies.append((copy, data, 0o600))  # referred to only by the record below
                state = {"kind": "file", "copy": copy, "mode": followed.mode, "uid": followed.uid,
                         "gid": followed.gid, "sha256": digest(data)}
            records.append((path, state))
        if copies:
            self.target.write_new_many(copies)
            self.point("originals copied")
        for path, state in records:
            self.journal.note(op="saved", path=path, state=state)  # made durable before the file is touched
            self._saved.add(path)
            self.point("original recorded")

    def _apply_one(self, outcome: Outcome) -> None:
        change = outcome.change
        self.journal.secure()  # (done by _prepare: the originals are on record)
        if isinstance(change, SwitchNetwork):
            return self._switch(change)
        if isinstance(change, RunCommand):
            self.log.info("running", command=" ".join(change.argv), step=change.step)
            self._run(change.argv, change.timeout)
            return
        path, after = outcome.path, outcome.after
        if isinstance(change, SparseFile):
            self.target.make_sparse(path, change.size, change.mode)
        elif after.kind == "absent":
            self.target.remove(path)
        else:
            self.target.symlink(path, after.link)
        self.journal.note(op="done", path=path, **_left_as(after))
        self.point("file done")

    def _run(self, argv: tuple[str, ...], timeout: float | None) -> None:
        result = self.target.execute(argv, timeout=timeout)
        self.journal.note(op="ran", argv=list(argv), rc=result.rc)
        self.point("command ran")
        if result.rc != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"exit code {result.rc}" + (f": {' / '.join(tail)}" if tail else ""))

    def _switch(self, change: SwitchNetwork) -> None:
        """A network switch (xenrun.netswitch): its plan folder written next to the
        originals just saved, the script run, then confirmed by a command of its
        own, which proves that the host is still reached after the switch; without
        that confirmation the script puts the old network back by itself."""
        folder = f"{self.journal.folder}/switch-{len([r for r in self.journal.records if r.get('op') == 'ran'])}"
        saved = {}
        for record in self.journal.records:
            if record.get("op") == "saved":
                saved.setdefault(record["path"], record["state"])
        self.target.makedirs_many([folder])
        self.target.write_new_many(plan_folder(change, folder, saved))
        for number, file in enumerate(change.files, 1):  # each new file checked before the switch
            if getattr(file, "validate", ()):
                result = self.target.execute_on_file(file.validate, f"{folder}/new.{number}")
                if result.rc != 0:
                    msg = (result.stderr or result.stdout).strip().splitlines()
                    raise RuntimeError(f"{' '.join(file.validate)} rejected the new {file.path}"
                                       + (f": {msg[-1]}" if msg else ""))
        self.log.info("switching the network", bridge=change.bridge, uplink=change.uplink, step=change.step)
        self._run(run_argv(change, folder), change.timeout)
        self._run(confirm_argv(folder), 60)
        for file in change.files:
            self.journal.note(op="done", path=file.path, sha256=digest(getattr(file, "content", None)))
        self.point("file done")

    def _write_batch(self, batch: list[Outcome]) -> None:
        """Write files and make links, each atomically (a validated temp file or a
        temp link renamed over the path; over SSH three round trips for them all)."""
        files, links, checks = [], [], {}
        for o in batch:
            if o.after.kind == "link":
                links.append((o.path, o.after.link))
                continue
            info = self.target.stat(o.path)
            uid, gid = (info.uid, info.gid) if info else (None, None)
            files.append((o.path, o.after.data, o.after.mode if o.after.mode is not None else 0o644, uid, gid))
            checks[o.path] = getattr(o.change, "validate", ())

        def before_rename(path, tmp):
            self.point("temp written")
            if checks[path]:
                result = self.target.execute_on_file(checks[path], tmp)
                if result.rc != 0:
                    msg = (result.stderr or result.stdout).strip().splitlines()
                    raise RuntimeError(f"{' '.join(checks[path])} rejected the new {path}"
                                       + (f": {msg[-1]}" if msg else ""))
        self.journal.secure()  # (done by _prepare: the originals are on record)
        self.target.write_atomic_many(files, before_rename, links, {p: c for p, c in checks.items() if c})
        for o in batch:
            self.journal.note(op="done", path=o.path, **_left_as(o.after))
            self.point("file done")


ROOM_MARGIN_BLOCKS = 16  # the journal's lines, new folders, a filesystem's own rounding


def _check_room(target, stretch: list[Outcome], orig: str, saved: set[str]) -> None:
    """Refuse a stretch whose writes do not fit, before it touches anything: each
    new file is written whole beside the old one (atomic rename), and each original
    is copied into the run's folder first. A full /boot or ESP is common."""
    wants = []  # (path whose filesystem it uses, bytes)
    for o in stretch:
        if isinstance(o.change, RunCommand) or o.after is None:
            continue
        if o.after.kind == "file" and o.after.data is not None:
            wants.append((o.path, len(o.after.data)))
        if o.path not in saved and o.before is not None and o.before.kind == "file" and o.before.data:
            wants.append((orig, len(o.before.data)))
    if not wants:
        return
    space = target.free_space(list(dict.fromkeys(path for path, _ in wants)))
    if not space:
        return
    need: dict[object, list] = {}
    for path, size in wants:
        fs, free, block = space[path]
        entry = need.setdefault(fs, [0, free, block, STATE_DIR if path == orig else path])
        entry[0] += -(-size // block) * block + block
    for used, free, block, path in need.values():
        if used + ROOM_MARGIN_BLOCKS * block > free:
            raise TargetError(f"{target}: not enough free space for {path} and what goes with it on its"
                              f" filesystem: {_size(used)} to write (new files, copies of originals) and a margin of"
                              f" {_size(ROOM_MARGIN_BLOCKS * block)}, {_size(free)} free: free some space and run again")


def _size(n: int) -> str:
    return f"{n / 1048576:.1f} MiB" if n >= 1048576 else f"{n / 1024:.0f} KiB"


def _batched(outcome: Outcome) -> bool:
    """A file write or a link: goes with its neighbours of the same kinds."""
    return not isinstance(outcome.change, (RunCommand, SparseFile)) and outcome.after.kind in ("file", "link")


def _stretches(outcomes: list[Outcome]) -> list[list[int]]:
    """The indices of the "change" outcomes, cut after each command (what a
    command does may change what the next changes find) and before a path
    below one that a link or a removal of the stretch changes (its folders
    and original are those found once that change is made)."""
    stretches, current, moved = [], [], []
    for index, outcome in enumerate(outcomes):
        if outcome.action != CHANGE:
            continue
        path = outcome.path or ""
        if path and any(path.startswith(m.rstrip("/") + "/") for m in moved):
            stretches.append(current)
            current, moved = [], []
        current.append(index)
        if isinstance(outcome.change, RunCommand):
            stretches.append(current)
            current, moved = [], []
        elif outcome.after is not None and outcome.after.kind in ("link", "absent"):
            moved.append(path)
    return stretches + ([current] if current else [])


def _batches(stretch: list[int], outcomes: list[Outcome]) -> list[list[int]]:
    """A stretch cut into runs of file writes and links to different paths (one
    batch each) and single changes."""
    batches: list[list[int]] = []
    for index in stretch:
        if batches and _batched(outcomes[index]) and _batched(outcomes[batches[-1][-1]]) \
                and outcomes[index].path not in {outcomes[i].path for i in batches[-1]}:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _undo(target, journal: Journal) -> list[str]:
    """Put back every file a run touched, newest first, and remove the folders it
    made. Safe to repeat: every step sets a final state. A path it cannot put back
    (an immutable file, a full disk) does not stop it: it goes on with the others
    and returns those it could not, each with why."""
    failed = []
    for record in reversed(journal.records):
        op, path = record.get("op"), record.get("path")
        try:
            if op == "saved":
                _put_back(target, path, record["state"])
            elif op == "mkdir":
                target.rmdir(path)
        except HostLost:
            raise  # the host is gone: nothing more can be put back on this run
        except Exception as e:  # noqa: BLE001 - any fault of the machine: name it, restore the rest
            failed.append(f"{path} ({e})")
    return failed


def _put_back(target, path: str, state: dict) -> None:
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
            return  # the copy itself was never finished: the file was not touched
        now = target.lstat(path)
        if now is not None and now.kind == "file" and now.mode == state["mode"] and target.read(path) == data:
            return  # never changed (its write failed): nothing to put back, even on an immutable file
        target.write_atomic(path, data, state["mode"], state["uid"], state["gid"])


def _not_put_back(failed: list[str], journal: Journal) -> str:
    return (f"could not put back {'; '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}: fix that, then run"
            f" again (the originals are in {journal.folder}/orig)")


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
        changes, done = [], {r["path"]: r for r in j.records if r.get("op") == "done"}
        for r in j.records:
            if r.get("op") != "saved":
                continue
            path, state = r["path"], r["state"]
            if path == PENDING_FILE:  # xenrun's own: the rollback's finish drops what the run left
                continue
            if state["kind"] == "sparse" or state.get("image"):
                # a disk image may hold a guest's data by now: never removed or shrunk by a rollback
                structlog.get_logger().warning("disk image kept; remove or shrink it by hand if unwanted", path=path)
                continue
            edited = _edited_since(target, path, done[path]) if path in done else None
            if edited:
                raise ApplyError(f"{path} {edited} after run {j.run_id}; not rolling back over that edit"
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
