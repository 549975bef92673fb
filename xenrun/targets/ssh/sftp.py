"""The file writes of an SSHTarget: SFTP requests in pipelines (atomic writes,
symlinks, removal, sparse files, journal appends)."""

from __future__ import annotations

import socket

from xenrun.errors import TargetError
from xenrun.targets.base import TMP_SUFFIX
from xenrun.targets.ssh.cache import _sftp_info


class Files:
    """The SFTP write part of SSHTarget (a mixin: the state is SSHTarget's)."""

    def _close_appends(self, meanwhile=None) -> None:
        """Close the journal and folder handles kept open; ``meanwhile()`` runs
        while the closes are on their way (the unlock: one wait for both)."""
        handles = [state[0] for state in self._appends.values()] + list(self._dir_handles.values())
        self._appends.clear()
        self._append_real.clear()
        self._dir_handles.clear()
        requests = [self._close_request(h) for h in handles] if self._sftp is not None else []
        try:
            sent = self._send(requests) if requests else []
        except Exception:  # noqa: BLE001 - closing handles of a session that may be gone
            requests = []
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            if requests:
                try:
                    self._collect(requests, sent)
                except Exception:  # noqa: BLE001 - as above
                    pass
    # -- writing -----------------------------------------------------------------
    # Writes go to the SFTP server in pipelines: requests sent back to back, then
    # every answer read (one round trip for all). OpenSSH's sftp-server handles
    # requests one at a time in the order they arrive (fsync@openssh.com returns
    # once the data is on disk), so a pipeline does on the host exactly what the
    # same requests sent one by one would do; only the waiting is shared. A step
    # that may only happen if an earlier one succeeded (the rename after the data,
    # the target after its journal record) waits for that answer first.
    def _pipeline(self, requests: list[tuple], check: bool = True) -> list:
        """Send ``requests`` ((type, *args) each) back to back and read every answer,
        in order. Returns the answers; raises the first error, once all are in.
        An fsync the server does not know (no fsync@openssh.com) becomes one
        remote ``sync`` after the pipeline, and every later fsync a sync too.
        ``check=False``: errors are returned in place of their answers."""
        return self._collect(requests, self._send(requests), check)

    def _send(self, requests: list[tuple]) -> list:
        """Send ``requests`` without waiting; ``_collect`` reads their answers.
        They go out together: one write to the channel, so SSH carries them in
        as few packets as their size allows (each packet costs paramiko's
        Python, and sshd, more than the bytes in it)."""
        from paramiko.sftp import CMD_EXTENDED
        sftp = self.sftp
        sent, out = [], []
        sftp._write_all = out.append  # paramiko's _send_packet ends with _write_all(its bytes)
        try:
            for request in requests:
                if request[0] == "fsync":
                    if not self._fsync_ext:
                        sent.append("sync")
                        continue
                    request = (CMD_EXTENDED, "fsync@openssh.com", request[1])
                sent.append(sftp._async_request(type(None), *request))
        finally:
            del sftp._write_all
        if out:
            sftp._write_all(b"".join(out))
        return sent

    def _collect(self, requests: list[tuple], sent: list, check: bool = True) -> list:
        """The answers to ``requests`` sent as ``sent``: as _pipeline."""
        sftp = self.sftp
        self.stats["sftp_waits"] += 1
        answers, error, sync = [], None, False
        for num in sent:
            if num == "sync":
                answers.append(None)
                sync = True
                continue
            try:
                answers.append(sftp._read_response(num))
            except (socket.timeout, ConnectionError):
                raise  # the session, not this request: no use waiting for the others
            except (OSError, EOFError) as e:  # this request's status
                answers.append(e)
                if requests[len(answers) - 1][0] == "fsync" and "nsupported" in str(e):
                    self._fsync_ext, sync = False, True  # an old server: fsync by a remote sync
                elif error is None:
                    error = e
        if sync:
            self._request("sync; printf '%s END 0\\n' \"$N\"")
        if error is not None and check:
            raise error
        return answers

    @staticmethod
    def _path(key: str) -> bytes:
        return key.encode(errors="surrogateescape")

    @staticmethod
    def _open_request(key: str, flags: str, mode: int | None = None) -> tuple:
        """An SFTP open: "x" new (O_EXCL: never through a link), "a" append,
        "r" read, "rwc" read and write, created if absent; ``mode``: permissions
        to create it with (the umask may take bits)."""
        from paramiko.sftp import (CMD_OPEN, SFTP_FLAG_APPEND, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL,
                                   SFTP_FLAG_READ, SFTP_FLAG_WRITE)
        from paramiko.sftp_attr import SFTPAttributes
        bits = {"x": SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL,
                "a": SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_APPEND,
                "r": SFTP_FLAG_READ, "rwc": SFTP_FLAG_READ | SFTP_FLAG_WRITE | SFTP_FLAG_CREATE}[flags]
        attrs = SFTPAttributes()
        if mode is not None:
            attrs.st_mode = mode
        return (CMD_OPEN, Files._path(key), bits, attrs)

    @staticmethod
    def _handle(answer) -> bytes:
        from paramiko.sftp import CMD_HANDLE
        t, msg = answer
        if t != CMD_HANDLE:
            raise TargetError("the SFTP server answered an open without a handle")
        return msg.get_binary()

    @staticmethod
    def _attrs(mode: int | None = None, uid: int | None = None, gid: int | None = None, size: int | None = None):
        from paramiko.sftp_attr import SFTPAttributes
        attrs = SFTPAttributes()
        if mode is not None:
            attrs.st_mode = mode
        if uid is not None:
            attrs.st_uid, attrs.st_gid = uid, gid
        if size is not None:
            attrs.st_size = size
        return attrs

    def _writes(self, handle: bytes, data: bytes, offset: int = 0) -> list[tuple]:
        from paramiko.sftp import CMD_WRITE, int64
        step = 32768  # paramiko's (and the protocol's usual) largest write
        return [(CMD_WRITE, handle, int64(offset + at), data[at:at + step]) for at in range(0, len(data), step)]

    def _close_request(self, handle: bytes) -> tuple:
        from paramiko.sftp import CMD_CLOSE
        return (CMD_CLOSE, handle)

    def _dir_handle_requests(self, folder: str) -> list[tuple]:
        """The open of ``folder`` (for the fsync that makes a rename in it durable)
        when no handle is kept for it yet: to go in the pipeline before the rename."""
        return [] if folder in self._dir_handles else [self._open_request(folder, "r")]

    def _keep_dir_handle(self, folder: str, answers: list) -> None:
        if folder not in self._dir_handles and answers:
            self._dir_handles[folder] = self._handle(answers[-1])

    def _fsync_dir(self, folder: str) -> list[tuple]:
        """The request that makes a rename in ``folder`` durable: a folder opened
        read-only is a file handle to sftp-server, so fsync@openssh.com works on
        it (the handle stays open for the next write there)."""
        return [("fsync", self._dir_handles[folder])]

    def _open_new_many(self, files: list[tuple[str, str, int | None]], folders: list[str] = ()) -> list[bytes]:
        """New files (key, folder, mode) opened O_EXCL (never through a link), in
        one round trip; a leftover of a killed run is removed and opened again
        (a second). Each folder (theirs and ``folders``) is opened too and kept,
        for the fsync that makes entries in it durable. Returns the files'
        handles, in order."""
        from paramiko.sftp import CMD_REMOVE
        folders = list(dict.fromkeys([folder for _, folder, _ in files] + list(folders)))
        extra = [f for f in folders if f not in self._dir_handles]
        requests = [self._open_request(key, "x", mode) for key, _, mode in files] \
            + [self._open_request(f, "r") for f in extra]
        answers = self._pipeline(requests, check=False) if requests else []
        for folder, answer in zip(extra, answers[len(files):]):
            if not isinstance(answer, Exception):
                self._dir_handles[folder] = self._handle(answer)
        handles: list = [None if isinstance(a, Exception) else self._handle(a) for a in answers[:len(files)]]
        again = [n for n, h in enumerate(handles) if h is None]
        if again:  # SFTP v3 says only "Failure" for "exists": remove and try once more
            requests = []
            for n in again:
                key, _, mode = files[n]
                requests += [(CMD_REMOVE, self._path(key)), self._open_request(key, "x", mode)]
            retried = self._pipeline(requests, check=False)
            for n, answer in zip(again, retried[1::2]):
                handles[n] = answer if isinstance(answer, Exception) else self._handle(answer)
            failed = [(files[n][0], h) for n, h in enumerate(handles) if isinstance(h, Exception)]
            if failed:
                self._abandon(files, handles)
                raise TargetError(f"{self}: cannot create {failed[0][0]}: {failed[0][1]}") from failed[0][1]
        missing = [f for f in folders if f not in self._dir_handles]
        if missing:
            self._abandon(files, handles)
            raise TargetError(f"{self}: cannot open the folder {missing[0]} (for its fsync)")
        return handles

    def _abandon(self, files: list[tuple], handles: list) -> None:
        """Close and remove the files of a failed _open_new_many that were made."""
        from paramiko.sftp import CMD_REMOVE
        made = [(key, h) for (key, *_), h in zip(files, handles) if isinstance(h, bytes)]
        try:
            self._pipeline([self._close_request(h) for _, h in made]
                           + [(CMD_REMOVE, self._path(key)) for key, _ in made], check=False)
        except (OSError, EOFError):
            pass

    def _close_quietly(self, handle: bytes) -> None:
        try:
            self._pipeline([self._close_request(handle)])
        except (OSError, EOFError):
            pass

    def makedirs(self, path: str) -> list[str]:
        return self.makedirs_many([path])

    def makedirs_many(self, paths: list[str]) -> list[str]:
        """Create ``paths`` and their missing parents; returns the folders it
        created, each after its parent (so an undo can remove them newest first).
        One round trip to look (every part of every path at once), one to create
        the missing folders."""
        from paramiko.sftp import CMD_LSTAT, CMD_MKDIR
        from paramiko.sftp_attr import SFTPAttributes
        missing = self._missing_folders(paths)
        if not missing:
            return []
        keys = [self._resolve(sub, True) for sub in missing]  # from the cache: every part was fetched
        requests = []
        for key in keys:
            self._forget(key)
            requests += [(CMD_MKDIR, self._path(key), self._attrs(0o755)), (CMD_LSTAT, self._path(key))]
        try:
            answers = self._pipeline(requests)
        finally:
            for key in keys:
                self._forget(key)
        for key, (_, msg) in zip(keys, answers[1::2]):
            # a folder just made holds only the folders made in it: its listing
            # answers "absent" for anything else (until a write there forgets it)
            self._lst[key] = _sftp_info(SFTPAttributes._from_msg(msg))
            self._dirs[key] = [k.rpartition("/")[2] for k in keys if k.rpartition("/")[0] == key]
        return missing

    def _temp_beside(self, real: str, regular: bool) -> tuple[str, str]:
        """(folder, temp name) for an atomic replace of ``real``; both forgotten
        by the cache, which is about to be wrong about them."""
        folder, _, name = real.rpartition("/")
        folder = folder or "/"
        tmp = f"{folder.rstrip('/')}/.{name}{TMP_SUFFIX}"
        self._forget(real, regular)
        self._forget(tmp, regular)
        return folder, tmp

    def write_atomic(self, path: str, data: bytes, mode: int, uid: int | None = None,
                     gid: int | None = None, before_rename=None) -> None:
        """Replace ``path`` with ``data``: write_atomic_many for one file;
        ``before_rename(remote path of the temp file)``."""
        self.write_atomic_many([(path, data, mode, uid, gid)],
                               before_rename and (lambda _path, tmp: before_rename(tmp)))

    def _write_places(self, files: list[tuple], links: list[tuple], before_rename, checks) -> list[tuple] | None:
        """(path, real, folder, temp) for each of ``files`` then ``links`` of a
        write_atomic_many, every path resolved before the cache forgets anything.
        None when two of them lead to one file (through a link): then they have
        been written one by one, in order."""
        reals = [self._resolve(path, True) for path, *_ in files] + [self._resolve(path, False) for path, _ in links]
        if len(set(reals)) < len(reals):
            for n, item in enumerate(list(files) + list(links)):
                self.write_atomic_many([item] if n < len(files) else [], before_rename,
                                       [] if n < len(files) else [item], checks)
            return None
        return [(path, real, *self._temp_beside(real, regular=n < len(files)))
                for n, ((path, *_), real) in enumerate(zip(list(files) + list(links), reals))]

    def write_atomic_many(self, files: list[tuple], before_rename=None, links: list[tuple] = (),
                          checks: dict | None = None) -> None:
        """Replace each (path, data, mode, uid, gid) of ``files``: a temp file in its
        folder (mode set before any data is written), fsync, ``before_rename(path,
        remote path of its temp file)`` (validation; raise to abort); and make each
        (path, target) of ``links`` a symlink: a temp link. Then every rename and
        the folders' fsyncs. No temp file outlives a failure. Three round trips for
        them all: the opens; modes, owners, data, fsyncs, closes and temp links;
        the renames and the folders' fsyncs."""
        from paramiko.sftp import CMD_EXTENDED, CMD_FSETSTAT, CMD_REMOVE, CMD_SYMLINK
        if not files and not links:
            return
        places = self._write_places(files, links, before_rename, checks)
        if places is None:
            return
        folders = list(dict.fromkeys(folder for _, _, folder, _ in places))
        handles = self._open_new_many([(tmp, folder, None) for _, _, folder, tmp in places[:len(files)]], folders)
        closed = False
        try:
            requests, owners, may_be_absent = [], [], set()
            for (path, data, mode, uid, gid), handle in zip(files, handles):
                mine = [(CMD_FSETSTAT, handle, self._attrs(mode))]
                if uid is not None and gid is not None and self.user == "root":
                    mine.append((CMD_FSETSTAT, handle, self._attrs(uid=uid, gid=gid)))
                mine += self._writes(handle, data) + [("fsync", handle), self._close_request(handle)]
                requests += mine
                owners += [path] * len(mine)
            for (path, target), (_, _, _, tmp) in zip(links, places[len(files):]):
                may_be_absent.add(len(requests))  # a leftover temp link of a killed run, mostly none
                # OpenSSH takes (target, link): the reverse of the draft, as paramiko sends it
                requests += [(CMD_REMOVE, self._path(tmp)),
                             (CMD_SYMLINK, target.encode(errors="surrogateescape"), self._path(tmp))]
                owners += [path, path]
            closed = True  # the closes are in the pipeline whatever else fails
            self._pipeline_of(requests, owners, may_be_absent)
            if before_rename:
                for path, _, _, tmp in places[:len(files)]:
                    before_rename(path, tmp)
            self._pipeline_of([(CMD_EXTENDED, "posix-rename@openssh.com", self._path(tmp), self._path(real))
                               for _, real, _, tmp in places] + [r for f in folders for r in self._fsync_dir(f)],
                              [path for path, *_ in places] + folders)
        except BaseException:
            if not closed:
                for handle in handles:
                    self._close_quietly(handle)
            try:
                self._pipeline([(CMD_REMOVE, self._path(tmp)) for *_, tmp in places], check=False)
            except (OSError, EOFError, AttributeError):
                pass
            raise

    def _pipeline_of(self, requests: list[tuple], owners: list[str], may_be_absent=()) -> list:
        """_pipeline, its first error naming the path its request was for
        (``may_be_absent``: indices of requests for which "no such file" is fine)."""
        answers = self._pipeline(requests, check=False)
        for n, (answer, owner) in enumerate(zip(answers, owners)):
            if isinstance(answer, Exception) and not (n in may_be_absent and isinstance(answer, FileNotFoundError)):
                raise TargetError(f"{self}: {owner}: {answer}") from answer
        return answers

    def write_new(self, path: str, data: bytes, mode: int) -> None:
        self.write_new_many([(path, data, mode)])

    def write_new_many(self, files: list[tuple[str, bytes, int]]) -> None:
        """Write (path, data, mode) files that must not exist yet, durably (data and
        the folders' entries), without temp files: for files nothing refers to
        until this returns (the journal's copies of originals). Two round trips
        for them all."""
        from paramiko.sftp import CMD_FSETSTAT
        reals = [self._resolve(path, True) for path, _, _ in files]  # all before the cache forgets anything
        places = []
        for (_, _, mode), real in zip(files, reals):
            self._forget(real, regular=True)
            places.append((real, real.rpartition("/")[0] or "/", mode))
        if not places:
            return
        handles = self._open_new_many(places)
        requests, owners = [], []
        for (path, data, mode), handle in zip(files, handles):
            mine = ([(CMD_FSETSTAT, handle, self._attrs(mode))] + self._writes(handle, data)
                    + [("fsync", handle), self._close_request(handle)])
            requests += mine
            owners += [path] * len(mine)
        folders = list(dict.fromkeys(folder for _, folder, _ in places))
        self._pipeline_of(requests + [r for f in folders for r in self._fsync_dir(f)], owners + folders)

    def symlink(self, path: str, target: str) -> None:
        """Make ``path`` a link to ``target`` atomically (a temp link renamed over
        it). Two round trips: a leftover temp link removed, the link made and the
        folder opened; the rename and the folder's fsync."""
        from paramiko.sftp import CMD_EXTENDED, CMD_REMOVE, CMD_SYMLINK
        real = self._resolve(path, False)
        folder, tmp = self._temp_beside(real, regular=False)
        # OpenSSH takes (target, link): the reverse of the draft, as paramiko sends it
        answers = self._pipeline([(CMD_REMOVE, self._path(tmp)),
                                  (CMD_SYMLINK, target.encode(errors="surrogateescape"), self._path(tmp))]
                                 + self._dir_handle_requests(folder), check=False)
        if isinstance(answers[0], Exception) and not isinstance(answers[0], FileNotFoundError):
            raise answers[0]  # a leftover that cannot go: the new link was not made in its place
        for answer in answers[1:]:
            if isinstance(answer, Exception):
                raise answer
        self._keep_dir_handle(folder, answers[2:])
        self._pipeline([(CMD_EXTENDED, "posix-rename@openssh.com", self._path(tmp), self._path(real))]
                       + self._fsync_dir(folder))

    def remove(self, path: str) -> None:
        from paramiko.sftp import CMD_REMOVE
        real = self._resolve(path, False)
        self._forget(real)
        folder = real.rpartition("/")[0] or "/"
        if folder in self._dir_handles:  # one round trip
            try:
                self._pipeline([(CMD_REMOVE, self._path(real))] + self._fsync_dir(folder))
            except FileNotFoundError:
                pass
            return
        answers = self._pipeline([(CMD_REMOVE, self._path(real))] + self._dir_handle_requests(folder), check=False)
        if not isinstance(answers[1], Exception):
            self._keep_dir_handle(folder, answers[1:])
        if isinstance(answers[0], FileNotFoundError):
            return
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        self._pipeline(self._fsync_dir(folder))

    def rmdir(self, path: str) -> bool:
        real = self._resolve(path, False)
        self._forget(real)
        handle = self._dir_handles.pop(real, None)
        if handle is not None:
            self._close_quietly(handle)
        try:
            self.sftp.rmdir(real)
            return True
        except OSError:
            return False

    def make_sparse(self, path: str, size: int, mode: int) -> None:
        """Create (or grow, never shrink) a sparse file: only the size is set, no
        data written. Two round trips: open (creating it), its size and the
        folder; mode (when new), size, fsync, close and the folder's fsync."""
        from paramiko.sftp import CMD_FSETSTAT, CMD_STAT
        from paramiko.sftp_attr import SFTPAttributes
        new = self.stat(path) is None
        real = self._resolve(path, True)
        folder = real.rpartition("/")[0] or "/"
        self._forget(real, regular=True)
        extra = self._dir_handle_requests(folder)
        answers = self._pipeline([self._open_request(real, "rwc", mode), (CMD_STAT, self._path(real))] + extra,
                                 check=False)
        errors = [a for a in answers if isinstance(a, Exception)]
        if errors:
            if not isinstance(answers[0], Exception):
                self._close_quietly(self._handle(answers[0]))
            raise errors[0]
        self._keep_dir_handle(folder, answers[2:])
        handle = self._handle(answers[0])
        requests = [(CMD_FSETSTAT, handle, self._attrs(mode))] if new else []
        if SFTPAttributes._from_msg(answers[1][1]).st_size < size:
            requests.append((CMD_FSETSTAT, handle, self._attrs(size=size)))
        self._pipeline(requests + [("fsync", handle), self._close_request(handle)] + self._fsync_dir(folder))

    def truncate(self, path: str, size: int) -> None:
        """Set a file's size (undoing a grown disk image)."""
        real = self._resolve(path, True)
        self._forget(real, regular=True)
        try:
            self.sftp.truncate(real, size)
        except FileNotFoundError:
            pass

    def append_line(self, path: str, line: str) -> None:
        """Append one line (or several, newline-separated) and fsync them: the
        journal's durability rests on this. The file stays open for the next
        line: one round trip per call (two for the first, which creates it
        private: mode 0600 before the first line)."""
        from paramiko.sftp import CMD_FSETSTAT
        real = self._append_real.get(path) or self._resolve(path, True)
        self._forget(real, regular=True)
        state = self._appends.get(real)
        first = []
        if state is None:
            self._append_real[path] = real
            try:
                handle = self._handle(self._pipeline([self._open_request(real, "x", 0o600)])[0])
                first = [(CMD_FSETSTAT, handle, self._attrs(0o600))]
            except OSError:  # exists (SFTP v3 says only "Failure"); a real error shows below
                handle = self._handle(self._pipeline([self._open_request(real, "a")])[0])
            state = self._appends[real] = [handle, 0 if first else None]
        handle, offset = state
        if offset is None:  # appending: where the file ends now (writes go at an offset in SFTP v3)
            from paramiko.sftp import CMD_FSTAT
            from paramiko.sftp_attr import SFTPAttributes
            _, msg = self._pipeline([(CMD_FSTAT, handle)])[0]
            offset = SFTPAttributes._from_msg(msg).st_size
        data = (line.rstrip("\n") + "\n").encode()
        self._pipeline(first + self._writes(handle, data, offset) + [("fsync", handle)])
        state[1] = offset + len(data)
