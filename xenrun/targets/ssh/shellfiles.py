"""The file writes of an SSHTarget through its persistent shell: no SFTP session.

Every write becomes a step of a small shell program (prologue.sh's x_put, x_new,
x_app, x_mv, x_fsync ...), its data inline as framed base64 (a here-document
ended by the session's marker, which base64 never contains). Steps are queued
and go to the host ahead of the next request (a read, a command, the lock), all
in one brace group: the shell runs nothing of it unless it came whole, then runs
the steps in order and stops at the first that fails (the request itself is not
run then: the answer names the failed step and its stderr, raised as that step's
TargetError). So the host does exactly what the same steps sent one by one would
do, in the same order (data fsynced before a rename, originals and their
journal records durable before the first file they cover is touched), and a
session cut at any moment leaves a prefix of them: the states the SIGKILL tests
prove safe. Only the waiting is shared.

Outside ``deferred()`` every write is sent before it returns (one round trip);
inside it (an apply's forward part) the steps wait for the next request, and
for ``flush()`` at its end (or at an exception). A crash test's kill (XENRUN_CRASH_AT) and pause
flush first, so each crash point is tested with exactly the state its label
says.

Hosts without what this needs (base64 -d, mv -T, sync FILE: checked by the
prologue) get the SFTP writes of sftp.py; so does XENRUN_SFTP_WRITES=1.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex

from xenrun.errors import TargetError
from xenrun.targets.base import FileInfo
from xenrun.targets.ssh.framing import find_line
from xenrun.targets.ssh.sftp import Files

BIG = 8 << 20  # bytes of file data in one call above which SFTP's streaming writes are used


class ShellFiles(Files):
    """Shell writes over Files' SFTP ones (a mixin: the state is SSHTarget's)."""

    # -- the queue -----------------------------------------------------------------
    def _shell_ok(self, size: int = 0) -> bool:
        self._connect()
        return bool(self._shell_writes) and size <= BIG and not os.environ.get("XENRUN_SFTP_WRITES")

    def _step(self, owner: str, command: str, data: bytes | None = None) -> None:
        self._queue.append((owner, command, data))

    def _sent(self) -> None:
        """After a call's steps are queued: sent now unless deferred."""
        if not self._deferring:
            self.flush()

    def flush(self) -> None:
        """Send the queued steps (one round trip), raising the first one's error."""
        if self._queue:
            self._request("printf '%s END 0\\n' \"$N\"")

    @contextlib.contextmanager
    def deferred(self):
        """Writes inside wait for the next request, and for the flush at the end.
        On an exception the steps waiting are sent first (the writes made before
        the failure, as when each was made at once: the run's folder is there for
        its failure record), unless that fails too (the host lost, or the steps'
        own error): then they are dropped, a prefix of the writes as a crash there
        would leave, and the undo that follows reads the host."""
        self._deferring += 1
        try:
            yield
            if self._deferring == 1:
                self.flush()
        except BaseException:
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                self._queue = []
            raise
        finally:
            self._deferring -= 1

    @contextlib.contextmanager
    def _held(self):
        """The steps queued inside go with the next request (the lock's)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def _with_queue(self, script: str) -> tuple[str, list]:
        """``script`` behind the queued steps: (the request, the steps' owners)."""
        queue, self._queue = self._queue, []
        tag = f"{self._nonce}-D"
        lines = ["{ q="]
        for n, (_, command, data) in enumerate(queue):
            if data is None:
                lines.append(f'[ -n "$q" ] || {command} 2>"$X/qe" || q={n}')
            else:
                lines.append(f"[ -n \"$q\" ] || {command} 2>\"$X/qe\" <<'{tag}' || q={n}")
                lines.append(base64.encodebytes(data).decode() + tag)
        lines += ['if [ -n "$q" ]; then x_qfail "$q"; else', script, "fi; }"]
        return "\n".join(lines), [owner for owner, _, _ in queue]

    def _queue_failed(self, answer: bytes, owners: list) -> None:
        line = find_line(answer, f"{self._nonce} QFAIL ".encode())
        if line is None:
            return
        n = line.split()[2]
        owner = owners[int(n)] if n.isdigit() and int(n) < len(owners) else "a write"
        after = answer.partition(line.encode() + b"\n")[2]
        try:
            why = base64.b64decode(after.replace(b"\n", b"")).decode(errors="replace").strip()
        except ValueError:
            why = ""
        why = why.splitlines()[-1] if why else "failed"
        raise TargetError(f"{self}: {owner}: {why}")

    # -- writing -----------------------------------------------------------------
    def makedirs_many(self, paths: list[str]) -> list[str]:
        if not self._shell_ok():
            return super().makedirs_many(paths)
        missing = self._missing_folders(paths)
        if not missing:
            return []
        keys = [self._resolve(sub, True) for sub in missing]
        for sub, key in zip(missing, keys):
            self._forget(key)
            self._step(sub, f"mkdir -m 755 -- {shlex.quote(key)}")
        uid = 0 if self.user in (None, "root") else -1
        for key in keys:
            # a folder just made holds only the folders made in it (until a write there forgets it)
            self._lst[key] = FileInfo("dir", 0o755, uid, uid, 0, -1, None)
            self._dirs[key] = [k.rpartition("/")[2] for k in keys if k.rpartition("/")[0] == key]
        self._sent()
        return missing

    def write_atomic_many(self, files: list[tuple], before_rename=None, links: list[tuple] = (),
                          checks: dict | None = None) -> None:
        """As Files.write_atomic_many: temp files (mode and owner set before the
        data), their fsync, ``before_rename`` on each, the renames, the folders'
        fsync; steps of the shell program, one round trip for them all (and for
        each validator that ``before_rename`` runs)."""
        if not files and not links:
            return
        if not self._shell_ok(sum(len(f[1]) for f in files)):
            return super().write_atomic_many(files, before_rename, links, checks)
        places = self._write_places(files, links, before_rename, checks)  # (path, real, folder, tmp)
        if places is None:
            return
        folders = list(dict.fromkeys(folder for _, _, folder, _ in places))
        q = shlex.quote
        mine, flushes = len(self._queue), self.stats["command"]
        try:
            for (path, data, mode, uid, gid), (_, _, folder, tmp) in zip(files, places):
                owner = (uid, gid) if uid is not None and gid is not None and self.user == "root" else None
                self._step(path, f"x_put {q(tmp)} {self._put_args(mode, owner, folder)}", data)
            for (path, target), (_, _, _, tmp) in zip(links, places[len(files):]):
                self._step(path, f"x_ln {q(target)} {q(tmp)}")
            if files:
                self._step(files[0][0], "x_fsync " + " ".join(q(tmp) for *_, tmp in places[:len(files)]))
            if before_rename:
                # the temp files are on the host for before_rename: sent now, or (deferred: the
                # applier's validators) with its first request
                ahead = [(checks[path], tmp) for path, _, _, tmp in places[:len(files)] if (checks or {}).get(path)]
                if ahead:  # every validator of the batch in one round trip, with the writes before it
                    self.check_files(ahead)
                else:
                    self._sent()
                for path, _, _, tmp in places[:len(files)]:
                    before_rename(path, tmp)
            for path, real, _, tmp in places:
                self._step(path, f"x_mv {q(tmp)} {q(real)}")
            self._step(folders[0], "x_fsync " + " ".join(q(f) for f in folders))
            self._sent()
        except BaseException:
            # this call's steps not sent yet are dropped (all of them since a request went)
            del self._queue[mine if self.stats["command"] == flushes else 0:]
            try:
                self._step("temp files", "rm -f -- " + " ".join(q(tmp) for *_, tmp in places))
                self.flush()
            except (TargetError, OSError, EOFError):
                pass
            self._checked.clear()
            raise

    def _put_args(self, mode: int, owner: tuple[int, int] | None, folder: str) -> str:
        """x_put's UMASK [MODE [UID GID]]. The file is created with its mode by the
        umask (no chmod, no chown) when the mode needs no execute or special bit and
        the file is the login's own: no owner asked, or root:root by root in a
        folder known not to hand its group down (setgid). Else it is made 0600,
        then given its owner and mode, before any data."""
        mode &= 0o7777
        info = self._lst.get(folder)
        own = owner is None or (owner == (0, 0) and info is not None and info.kind == "dir"
                                and not info.mode & 0o2000)
        if own and not mode & ~0o666:
            return f"{0o777 & ~mode:03o}"
        return f"077 {mode:o}" + (f" {int(owner[0])} {int(owner[1])}" if owner else "")

    def write_new_many(self, files: list[tuple[str, bytes, int]]) -> None:
        """As Files.write_new_many (new files, durably, no temp files)."""
        if not files:
            return
        if not self._shell_ok(sum(len(f[1]) for f in files)):
            return super().write_new_many(files)
        reals = [self._resolve(path, True) for path, _, _ in files]
        for real in reals:
            self._forget(real, regular=True)
        q = shlex.quote
        for (path, data, mode), real in zip(files, reals):
            self._step(path, f"x_put {q(real)} {self._put_args(mode, None, real.rpartition('/')[0] or '/')}", data)
        folders = list(dict.fromkeys(real.rpartition("/")[0] or "/" for real in reals))
        self._step(files[0][0], "x_fsync " + " ".join(q(p) for p in reals + folders))
        self._sent()

    def symlink(self, path: str, target: str) -> None:
        if not self._shell_ok():
            return super().symlink(path, target)
        real = self._resolve(path, False)
        folder, tmp = self._temp_beside(real, regular=False)
        q = shlex.quote
        self._step(path, f"x_ln {q(target)} {q(tmp)}")
        self._step(path, f"x_mv {q(tmp)} {q(real)}")
        self._step(path, f"x_fsync {q(folder)}")
        self._sent()

    def remove(self, path: str) -> None:
        if not self._shell_ok():
            return super().remove(path)
        real = self._resolve(path, False)
        self._forget(real)
        folder = real.rpartition("/")[0] or "/"
        self._step(path, f"x_rm {shlex.quote(real)} {shlex.quote(folder)}")
        self._sent()

    def append_line(self, path: str, line: str) -> None:
        """As Files.append_line: the line(s) appended and fsynced (a new file made
        private, mode 0600, before its first line)."""
        if not self._shell_ok() or self._appends:
            return super().append_line(path, line)
        real = self._append_real.get(path) or self._resolve(path, True)
        self._append_real[path] = real
        self._forget(real, regular=True)
        self._step(path, f"x_app {shlex.quote(real)}", (line.rstrip("\n") + "\n").encode())
        self._sent()

    def make_sparse(self, path: str, size: int, mode: int) -> None:
        """As Files.make_sparse: made (mode before anything else) or grown, never
        shrunk, only its size set; fsynced with its folder."""
        if not self._shell_ok() or not self._shell_sparse:
            return super().make_sparse(path, size, mode)
        new = self.stat(path) is None
        real = self._resolve(path, True)
        folder = real.rpartition("/")[0] or "/"
        self._forget(real, regular=True)
        q, made = shlex.quote, "1" if new else "''"
        self._step(path, f"x_sparse {q(real)} {mode & 0o7777:o} {int(size)} {q(folder)} {made}")
        self._sent()

    def truncate(self, path: str, size: int) -> None:
        if not self._shell_ok() or not self._shell_sparse:
            return super().truncate(path, size)
        real = self._resolve(path, True)
        self._forget(real, regular=True)
        self._step(path, f"x_cut {shlex.quote(real)} {int(size)}")
        self._sent()

    def rmdir(self, path: str) -> bool:
        if not self._shell_ok():
            return super().rmdir(path)
        real = self._resolve(path, False)
        self._forget(real)
        _, rc = self._request(f"rmdir -- {shlex.quote(real)} 2>/dev/null; printf '%s END %s\\n' \"$N\" $?")
        return rc == 0
