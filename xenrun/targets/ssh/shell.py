"""The persistent shell of an SSHTarget: requests, their framed answers, sign-of-life
probes, commands and the lock."""

from __future__ import annotations

import base64
import functools
import shlex
import socket
import threading
import time
from importlib import resources

from xenrun.errors import LockHeld, TargetError
from xenrun.targets.base import SEARCH_PATH, Result
from xenrun.targets.ssh.cache import _Miss
from xenrun.targets.ssh.framing import find_line, split_output, take_answer

STAT_FORMAT = "%f %u %g %s %b"  # raw mode (hex), uid, gid, size, 512-byte blocks
SMALL = 65536  # a file read after a stat miss comes along if at most this big


@functools.cache
def prologue() -> str:
    """The shell's functions (prologue.sh, package data beside this module) with
    their values filled in, its leading comment left out (bytes on the wire)."""
    text = resources.files(__package__).joinpath("prologue.sh").read_text()
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return ("\n" + "".join(lines)).replace("@PATH@", ":".join(SEARCH_PATH)).replace(
        "@STAT_FORMAT@", STAT_FORMAT).replace("@SMALL@", str(SMALL))


class Shell:
    """The shell part of SSHTarget (a mixin: the state is SSHTarget's)."""

    # -- the persistent shell ----------------------------------------------------
    def _request(self, script: str, timeout: float | None = None, count: bool = True) -> tuple[bytes, int]:
        """Send one request to the shell; returns (answer bytes, status)."""
        self._connect()
        if count:
            self.stats["command"] += 1
        owners = None
        if self._queue:  # the writes waiting (shellfiles.py) go first, in the same request
            script, owners = self._with_queue(script)
        self._send_script(script)
        self._read_owed()
        answer, rc = self._read_answer(timeout)
        if owners is not None:
            self._queue_failed(answer, owners)
        return answer, rc

    def _read_owed(self) -> None:
        """The answers of requests sent without waiting: they come first."""
        while self._owed:
            self._read_answer()
            self._owed -= 1

    def _send_script(self, script: str) -> None:
        try:
            self._chan.settimeout(self.timeout)
            self._chan.sendall(script.encode() + b"\n")
        except (OSError, EOFError) as e:
            raise self._lose(f"could not send a request within {self.timeout:.0f} s ({_why(e)})") from None

    def _read_answer(self, timeout: float | None = None) -> tuple[bytes, int]:
        """Read up to the next marker line: "N END status" after a request,
        "N READY" after the prologue (what came before it was rc-file noise).
        A running command's heartbeats ("N ALIVE" lines) are dropped. Gives up
        (HostLost) when the shell stays silent self.timeout s, sooner when an SSH
        keepalive sent after half that gets no reply, and after ``timeout`` s in
        all (a command's own limit, with the host's timeout on top)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chan = self._chan
        alive = f"{self._nonce} ALIVE\n".encode()
        while True:
            taken = take_answer(self._buf, self._nonce)
            if taken is not None:
                if taken[1] is None:  # READY: the prologue's line before it says whether writes can go through it
                    can = find_line(self._buf[:len(self._buf) - len(taken[2])], f"{self._nonce} CAN ".encode())
                    flags = can.split()[2] if can is not None and len(can.split()) > 2 else ""
                    self._shell_writes, self._shell_sparse = flags[:1] == "1", flags[1:2] == "1"
                answer, status, self._buf = taken
                return answer.replace(alive, b""), 0 if status is None else status
            while chan.recv_stderr_ready():
                chan.recv_stderr(65536)  # the shell's own stderr: drained, not kept
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise self._lose(f"no answer within {timeout:.0f} s")
            why = self._silent_too_long(now)
            if why:
                raise self._lose(why)
            chan.settimeout(0.5)
            try:
                data = chan.recv(1 << 16)
            except socket.timeout:
                continue
            except (OSError, EOFError) as e:
                raise self._lose(f"the connection dropped ({_why(e)})") from None
            if not data:
                no_tmp = find_line(self._buf, f"{self._nonce} NOTMP ".encode())
                if no_tmp:  # the prologue could not make its private folder
                    self.close()
                    raise TargetError(f"{self}: cannot make xenrun's temp folder on the host:"
                                      f" {no_tmp.split(' ', 2)[2]} (make TMPDIR, or /tmp, writable there)")
                raise self._lose("the remote shell ended")
            self._buf += data
            self._heard, self._probe = time.monotonic(), None

    def _silent_too_long(self, now: float) -> str | None:
        """Why the host counts as gone, or None: the shell silent self.timeout s,
        or an SSH keepalive (sent once the shell has been silent half that) not
        answered within the other half. paramiko's own keepalive wants no reply,
        so a dead peer would be waited on until TCP gives up (many minutes); a
        keepalive that is answered while the shell stays silent tells a stuck
        shell from a dead host."""
        half = self.timeout / 2
        silence = now - self._heard
        probe = self._probe
        if probe is not None:
            sent, answered = probe
            if not answered.is_set() and now - sent > half:
                return f"the host stopped answering (no reply to an SSH keepalive within {half:.0f} s)"
        if silence > self.timeout:
            if probe is not None and probe[1].is_set():
                return (f"the remote shell stopped answering (nothing for {self.timeout:.0f} s, though the host"
                        " answers SSH keepalives)")
            return f"the host stopped answering (nothing for {self.timeout:.0f} s)"
        if probe is None and silence > half and self._conn is not None:
            answered = threading.Event()
            transport = self._conn.client.get_transport()

            def ask():
                try:  # OpenSSH answers an unknown global request with a failure: any answer will do
                    transport.global_request("keepalive@openssh.com", wait=True)
                except Exception:  # noqa: BLE001 - a dead transport: the reply never comes
                    return
                if transport.is_active():  # global_request also returns when the transport dies
                    answered.set()
            threading.Thread(target=ask, daemon=True, name=f"keepalive {self.hostname}").start()
            self._probe = (now, answered)
        return None

    # -- commands ----------------------------------------------------------------
    def cannot_execute(self, argv: tuple[str, ...], written: bool = False) -> str | None:
        """Why ``argv`` cannot run on this target, or None when it can. With
        --files-only nothing runs, on any target: not a command, not a guard.
        ``written``: the plan writes the program before it runs (not looked for)."""
        if self.files_only:
            return "--files-only: commands are left for the host"
        if self.live:
            return None
        if self.user not in (None, "root"):
            return f"running commands inside {self.root} needs chroot, which needs root on the host"
        if not written and self.find_program(argv[0]) is None:
            return f"{argv[0]} is not installed in {self.root} (commands run there with chroot)"
        return None

    def find_program(self, program: str) -> str | None:
        """The program's path inside the target, if it is there and can run (an
        ELF binary or a script with #!), as LocalTarget.find_program. Every
        candidate and the first bytes of the runnable ones come in one fetch (a
        round more per level of links). A program found stays found for the
        session: the commands that forget the cache (package installs) add
        programs, they do not take away the one a plan's next command runs."""
        if program in self._programs:
            return self._programs[program]
        candidates = _candidates(program)

        def runnable(c: str) -> bool:
            info = self.stat(c)
            return info is not None and info.kind == "file" and bool(info.mode & 0o111)
        if not self._offline:
            if not self._warmed:
                self._warm_up()
            self._rounds(lambda: [self._magic_of(c) for c in candidates])
        for c in candidates:
            if runnable(c):
                if self._offline:
                    return c  # speculating: no round trip for the magic bytes
                magic = self._magic_of(c)
                if magic == b"\x7fELF" or magic[:2] == b"#!":
                    self._programs[program] = c
                    return c
        return None

    def find_programs(self, programs: list[str]) -> None:
        """Look up the programs commands will need, all in one fetch (a round
        more per level of links), when this target runs commands in a root."""
        if self.live or self.files_only or self.user not in (None, "root") or self._cache_only:
            return
        look = lambda: [self._magic_of(c) for p in programs if p not in self._programs  # noqa: E731
                        for c in _candidates(p)]
        if self._spec is not None:  # inside a read-ahead: its rounds fetch these too
            look()
        else:
            self._rounds(look)

    def _magic_of(self, path: str) -> bytes:
        """The first four bytes of the file ``path`` leads to."""
        def fn():
            key, info = self._node(path, True)
            if info is None or info.kind != "file":
                return b""
            if key not in self._magic:
                if key in self._data:
                    self._magic[key] = self._data[key][:4]
                elif self._offline:
                    raise _Miss(key)
                else:
                    self._magic[key] = self._head(key, 4)
            return self._magic[key]
        return self._speculative(path, "m", b"", fn)

    def _head(self, key: str, size: int) -> bytes:
        try:
            with self.sftp.open(key, "rb") as f:
                return f.read(size)
        except OSError:
            return b""

    def _command(self, argv, timeout: float | None, input: str | None, chroot: bool) -> tuple[int, bytes, bytes]:
        """Run argv through the shell: one quoted command line, stdin from the
        input (or /dev/null), stdout and stderr framed in base64, fd 9 (the lock)
        closed. Returns (status, stdout, stderr)."""
        self._connect()
        script = self._command_script(argv, timeout, input, chroot)
        answer, rc = self._request(script, None if timeout is None else timeout + self.timeout)
        return (rc, *split_output(answer, self._nonce))

    def _command_script(self, argv, timeout: float | None, input: str | None, chroot: bool) -> str:
        words = ["x_t", str(int(timeout + 0.999)) if timeout else "''"]
        if chroot and self.root:
            words += ["env", "-i", f"PATH={':'.join(SEARCH_PATH)}", "LC_ALL=C", "chroot", shlex.quote(self.root)]
        else:
            words += ["env", "LC_ALL=C"]
        words += [shlex.quote(a) for a in argv]
        script, stdin = "", "/dev/null"
        if input is not None:
            encoded = base64.encodebytes(input.encode()).decode()
            script = f"base64 -d > \"$X/i\" <<'{self._nonce}-IN'\n{encoded}{self._nonce}-IN\n"
            stdin = '"$X/i"'
        return script + f"x_beat; (cd / && {' '.join(words)}) <{stdin} >\"$X/o\" 2>\"$X/e\" 9>&-; x_end $?"

    def execute(self, argv: tuple[str, ...] | list[str], timeout: float | None = None,
            input: str | None = None) -> Result:
        argv = tuple(argv)
        if self._spec is not None:
            return Result(argv, 1, "", "not run while reading speculatively")
        reason = self.cannot_execute(argv)
        if reason:
            raise TargetError(f"{self}: cannot run {argv[0]}: {reason}")
        self._invalidate()  # a command may change any file
        rc, out, err = self._command(argv, timeout, input, chroot=True)
        if rc == 124 and timeout:
            return Result(argv, 124, out.decode(errors="replace"), f"{argv[0]}: timed out after {timeout} s")
        return Result(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    def free_space(self, paths: list[str]) -> dict[str, tuple[object, int, int]]:
        """``stat -f`` of each path's nearest existing folder on the host, in one
        request (no command of the target's: a read like a fetch). {} when the
        host cannot tell (then the check is not made)."""
        room = self._room
        if room is not None and all(p in room for p in paths):  # measured with the lock
            self._room = None
            return {p: room[p] for p in paths}
        rc, out, _ = self._command(self._free_space_argv(paths), 60, None, chroot=False)
        return self._free_space_found(paths, rc, out)

    def free_space_ahead(self, paths: list[str]) -> None:
        self._room_paths = list(paths)

    def _free_space_argv(self, paths: list[str]) -> tuple[str, ...]:
        keys = [self._resolve(p, follow=False) for p in paths]
        finder = ('for p; do d=${p%/*}; while [ -n "$d" ] && ! [ -d "$d" ]; do d=${d%/*}; done;'
                  ' stat -f -c "%i %a %S" -- "${d:-/}" || echo "? ? ?"; done')
        return ("sh", "-c", finder, "sh", *keys)

    def _free_space_found(self, paths: list[str], rc: int, out: bytes) -> dict:
        found = {}
        for path, line in zip(paths, out.decode(errors="replace").splitlines()):
            fields = line.split()
            if rc != 0 or len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
                return {}
            found[path] = (fields[0], int(fields[1]) * int(fields[2]), int(fields[2]) or 4096)
        return found if len(found) == len(paths) else {}

    def execute_on_file(self, argv: tuple[str, ...], file_path: str) -> Result:
        """Run a check command of the host (outside any root) on a file of the
        target, "{}" standing for its path on the host (the temp file before a rename)."""
        full = tuple(str(file_path) if a == "{}" else a for a in argv)
        if (full, file_path) in self._checked:  # run ahead by check_files
            return self._checked.pop((full, file_path))
        rc, out, err = self._command(full, None, None, chroot=False)
        return self._check_result(full, rc, out, err)

    def check_files(self, checks: list[tuple[tuple[str, ...], str]]) -> None:
        """Run each (check command, file) of ``checks`` as execute_on_file does, all
        in one round trip (requests sent back to back, answers read in order; the
        writes waiting go first); execute_on_file then answers each once. The checks
        only read their files: one rejecting does not change what the others see."""
        self._connect()
        fulls = [tuple(str(path) if a == "{}" else a for a in argv) for argv, path in checks]
        answers = self._requests([self._command_script(full, None, None, False) for full in fulls])
        for full, (_, path), (answer, rc) in zip(fulls, checks, answers):
            self._checked[(full, path)] = self._check_result(full, rc, *split_output(answer, self._nonce))

    def _requests(self, scripts: list[str]) -> list[tuple[bytes, int]]:
        """Several requests in one round trip: sent together, their answers read in order."""
        if len(scripts) == 1:
            return [self._request(scripts[0])]
        self.stats["command"] += 1
        owners = None
        if self._queue:
            first, owners = self._with_queue(scripts[0])
            scripts = [first] + scripts[1:]
        self._send_script("\n".join(scripts))
        self._read_owed()
        answers = [self._read_answer() for _ in scripts]
        if owners is not None:
            self._queue_failed(answers[0][0], owners)
        return answers

    def _check_result(self, full: tuple[str, ...], rc: int, out: bytes, err: bytes) -> Result:
        if rc == 127:
            return Result(full, 127, "", f"{full[0]}: command not found on {self} (install it to validate this file)")
        return Result(full, rc, out.decode(errors="replace"), err.decode(errors="replace"))

    # -- lock --------------------------------------------------------------------
    def lock(self, path: str, holder: str) -> None:
        """Take the target's lock at ``path`` or fail at once naming its holder. The
        lock is held by the session's shell, so it ends with the session."""
        with self._held():  # the folder made by the lock's own request
            self.makedirs(path.rpartition("/")[0])
        real = self._resolve(path, True)
        folder, _, name = real.rpartition("/")
        listing = self._dirs.get(folder)
        self._forget(real)
        if listing is not None:  # the lock file is there now, nothing else changed in its folder
            self._dirs[folder] = sorted(set(listing) | {name})
        script = f"x_lock {shlex.quote(real)} {shlex.quote(holder)}"
        ahead, self._room_paths = self._room_paths, None
        argv = None
        if ahead:
            self._cache_only = True  # the paths were read by the plan: resolved from the cache, or not measured
            try:
                argv = self._free_space_argv(ahead)
            except _Miss:
                argv = None
            finally:
                self._cache_only = False
        if argv is None:
            answer, rc = self._request(script)
        else:  # the free space of the run's paths measured just after the lock, in the same round trip
            (answer, rc), (out, frc) = self._requests([script, self._command_script(argv, 60, None, False)])
            if rc == 0:
                found = self._free_space_found(ahead, frc, split_output(out, self._nonce)[0])
                self._room = found or None
        if rc == 0:
            self._locked, self._lock_path = True, real
            return
        if rc == 1:
            who = base64.b64decode(answer.replace(b"\n", b"")).decode(errors="replace").strip() or "another process"
            raise LockHeld(f"{self}: another xenrun run holds the lock {path}: {who}")
        if rc == 127:
            raise TargetError(f"{self}: flock (util-linux) is needed on the host to lock {path}")
        raise TargetError(f"{self}: cannot open the lock {path} (status {rc})")

    def unlock(self) -> None:
        """Release the lock without waiting for the answer (read before the next
        request's, or never: closing the session ends the shell, which releases it
        too). Steps still queued go with it in one request, which is waited for."""
        def release():
            if self._locked and self._chan is not None:
                self._locked = False
                script = f"x_unlock {shlex.quote(self._lock_path)}"
                if self._queue:
                    self._request(script)
                else:
                    self._send_script(script)
                    self._owed += 1
        self._close_appends(meanwhile=release)



def _candidates(program: str) -> list[str]:
    """Where a program may be, as the commands' PATH searches."""
    return [program] if program.startswith("/") else [f"{d}/{program}" for d in SEARCH_PATH]


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__
