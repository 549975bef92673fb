"""Many hosts at once: ``xenrun setup --all`` (or ``--host a,b,@group``).

Every host is prepared first, in order, without touching any of them: a bad
plugins.toml or a bad selection stops the run with exit 2 before anything runs.
Then each host runs the flow (run.setup_prepared, ...) on a thread of its own, at most
``parallel`` at a time. Threads because the work is blocking I/O (paramiko) and
each host has its own SSHTarget, plugin manager and structlog context (contextvars
are per thread), so nothing is shared between hosts but the log's output.

A host's failure stays that host's: it is caught on its thread and becomes its
status, the others go on.

- ``failed``: a step of the apply failed; every file it changed was put back
- ``unreachable``: no SSH session could be opened, or the host stopped answering mid-run
- ``invalid``: its facts, plan or target refused the run (nothing was touched)
- ``plugin fault``: a plugin's hook raised, or returned the wrong thing (nothing
  was touched; the block naming plugin, hook and file:line follows the table)
- ``error``: anything else (a bug: its traceback is logged)

Every flow runs this way: setup, rollback, promote and facts (``FLOWS``).

Asking before applying (a terminal, no --yes): every host is planned first, all
the plans are shown and the question asked once; then each host is planned again
under its lock and applied only if that plan is the one that was shown.

Processes: the client's Python runs on one core (the GIL), and with many hosts it
is what the fleet waits for. So with at least HOSTS_PER_PROCESS hosts per CPU the
hosts are shared among forked worker processes (one per CPU, each with its own
threads), forked after every host is prepared and before any thread or
connection exists. A worker sends each finished host back through a pipe (pickled
HostResult); the parent prints the progress and the table. XENRUN_FLEET_PROCESSES=N
sets the number (1: threads only).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import structlog

from xenrun import run
from xenrun.config import load_site
from xenrun.errors import ApplyError, ConfigError, HostLost, PluginFault, TargetError, UsageError
from xenrun.facts import Facts
from xenrun.plan import CHANGE
from xenrun.settings import name as check_name

log = structlog.get_logger()

DEFAULT_PARALLEL = 10
HOSTS_PER_PROCESS = 8  # fewer hosts than this per CPU: threads in one process do
OK = ("applied", "nothing to do", "planned", "not applied", "read")
# flow name -> what runs on one prepared host: (prepared, options, confirm) -> Result or Facts
FLOWS = {"setup": run.setup_prepared, "rollback": run.rollback_prepared, "promote": run.promote_prepared,
         "facts": lambda p, _options, _confirm: run.facts_prepared(p)}


@dataclass
class HostResult:
    """One host's part of a fleet run."""

    host: str
    status: str  # one of OK, or failed, unreachable, invalid, error
    seconds: float = 0.0
    result: run.Result | None = None
    error: str = ""
    target: str = ""
    round_trips: dict = field(default_factory=dict)
    facts: dict | None = None  # the facts flow: what was read

    @property
    def ok(self) -> bool:
        return self.status in OK

    def summary(self) -> dict:
        return self.result.summary() if self.result else {"changed": 0, "unchanged": 0, "pending": 0}


@dataclass
class Fleet:
    hosts: list[HostResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.hosts)

    @property
    def exit_code(self) -> int:
        """0 when every host ended well; 3 when only plugins' faults stopped hosts
        (errors.PluginFault); else 1."""
        bad = {r.status for r in self.hosts if not r.ok}
        return 0 if not bad else 3 if bad == {"plugin fault"} else 1


def is_fleet(host: str | None, all_hosts: bool) -> bool:
    """Whether the selection names more than one host (or a group)."""
    return all_hosts or bool(host) and ("," in host or host.startswith("@"))


def select(site, host: str | None, all_hosts: bool) -> list[str]:
    """Host names from --all or --host "a,b,@group", in the order given (plugins.toml
    order for --all and groups), each once."""
    if all_hosts and host:
        raise UsageError("give --all or --host, not both")
    if all_hosts:
        if not site.host_names:
            raise UsageError(f"--all: no [hosts.NAME] in {site.file or 'plugins.toml (none found)'}")
        return site.host_names
    names: list[str] = []
    for word in (w.strip() for w in (host or "").split(",")):
        if not word:
            raise UsageError(f"--host: an empty name in {host!r}")
        if word.startswith("@"):
            group = word[1:]
            if group not in site.groups:
                raise UsageError(f"--host: no group {group!r} in [groups] of {site.file}"
                                 f" (groups: {', '.join(site.groups) or 'none'})")
            names += site.groups[group]
            continue
        try:
            check_name(word)
        except ValueError as e:
            raise UsageError(f"--host: {e}") from None
        if word not in site.host_names:
            raise UsageError(f"--host: no host {word!r} in {site.file} (hosts: {', '.join(site.host_names)})")
        names.append(word)
    return list(dict.fromkeys(names))


def prepare_all(options: run.Options, names: list[str]) -> list[run.Prepared]:
    """run.prepare for every host: all checks, no host touched (SSH connects on first
    use). The first error ends the whole run, named after its host."""
    prepared = []
    site = load_site(options.config)
    for name in names:
        spec = site.host(name)
        if not spec.address and spec.root is None:
            # a host without either is "this machine": never one of many
            raise UsageError(f"host {name!r}: a fleet host needs address or root in plugins.toml")
        try:
            prepared.append(run.prepare_in(site, dataclasses.replace(options, host=name)))
        except ConfigError:
            raise  # names file, line and key already
        except UsageError as e:
            raise UsageError(f"host {name!r}: {e}") from None
    return prepared


def _one(p: run.Prepared, options: run.Options, confirm, flow: str) -> HostResult:
    """``flow`` on one host, on its thread; every failure becomes its status."""
    started = time.perf_counter()
    target = p.target
    out = HostResult(p.host.name, "error", target=str(target))
    with structlog.contextvars.bound_contextvars(host=p.host.name):
        try:
            done = FLOWS[flow](p, options, confirm)
            if isinstance(done, Facts):
                out.facts, out.status = done.to_json(), "read"
            else:
                out.result, out.status = done, done.status
        except PluginFault as e:
            out.status, out.error = "plugin fault", str(e)
        except ApplyError as e:
            out.status, out.error = "failed", str(e)
        except TargetError as e:
            never_connected = target.remote and not target.stats.get("connect")
            unreachable = never_connected or isinstance(e, HostLost)  # HostLost: stopped answering mid-run
            out.status, out.error = ("unreachable" if unreachable else "invalid"), str(e)
        except UsageError as e:
            out.status, out.error = "invalid", str(e)
        except Exception as e:  # noqa: BLE001 - a bug on one host must not stop the others
            log.exception("unexpected error")
            out.status, out.error = "error", f"{type(e).__name__}: {e}"
        finally:
            try:
                target.close()  # ends the SSH session (and so releases a lock still held)
            except Exception:  # noqa: BLE001 - closing a broken session
                pass
    out.seconds = time.perf_counter() - started
    out.round_trips = dict(target.stats)
    return out


def _run_all(prepared: list[run.Prepared], options: run.Options, confirm_for, parallel: int,
             progress, flow: str = "setup") -> list[HostResult]:
    """Each host on a pool thread (of this process or of a worker process), at most
    ``parallel`` at once; ``progress(done, total, host_run)`` as each finishes.
    Returns runs in the order of ``prepared``."""
    if any(p.target.remote for p in prepared):
        import fabric  # noqa: F401 - imported once here rather than by many threads at once
    runs: dict[str, HostResult] = {}
    lock = threading.Lock()

    def finished(r: HostResult) -> None:
        with lock:
            runs[r.host] = r
            if progress:
                progress(len(runs), len(prepared), r)

    workers = _processes(len(prepared), parallel)
    log.info("fleet", hosts=len(prepared), parallel=parallel, processes=workers)
    shares = [prepared[i::workers] for i in range(workers)]
    children = [_fork_worker(share, options, confirm_for, parallel // workers, flow) for share in shares[1:]]
    readers = [threading.Thread(target=_receive, args=(fd, finished), daemon=True) for _, fd, _ in children]
    for reader in readers:
        reader.start()
    try:
        _run_threads(shares[0], options, confirm_for, parallel // workers, finished, flow)
    finally:
        for (pid, _, share), reader in zip(children, readers):
            _, status = os.waitpid(pid, 0)
            reader.join()
            for p in share:  # a worker that died (killed, a bug) leaves its hosts unreported
                if p.host.name not in runs:
                    finished(HostResult(p.host.name, "error", target=str(p.target),
                                     error=f"its worker process ended first ({_ended(status)})"))
    return [runs[p.host.name] for p in prepared]


def _run_threads(prepared: list[run.Prepared], options: run.Options, confirm_for, parallel: int,
                 finished, flow: str) -> None:
    """Each host on a pool thread of this process, ``finished(host_run)`` as each ends."""
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(prepared))),
                            thread_name_prefix="xenrun-host") as pool:
        futures = [pool.submit(_one, p, options, confirm_for(p.host.name), flow) for p in prepared]
        try:
            for future in as_completed(futures):
                finished(future.result())
        except BaseException:
            # Ctrl-C: hosts not started yet are not started; running ones finish
            # (or roll back) on their own rather than being cut off mid-apply
            for future in futures:
                future.cancel()
            raise


def _processes(hosts: int, parallel: int) -> int:
    """How many processes share the hosts (see the module's docstring)."""
    forced = os.environ.get("XENRUN_FLEET_PROCESSES", "")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise UsageError(f"XENRUN_FLEET_PROCESSES: {forced!r} is not a number of processes (1 or more)")
        wanted = int(forced)
    else:
        wanted = (os.cpu_count() or 1) if hosts >= 2 * HOSTS_PER_PROCESS else 1
        wanted = min(wanted, hosts // HOSTS_PER_PROCESS) or 1
    # fork copies only the calling thread: a process with others (a test runner,
    # a library's thread) could fork holding their locks, so it uses threads only
    if not hasattr(os, "fork") or threading.active_count() > 1:
        return 1
    return max(1, min(wanted, parallel, hosts))


def _fork_worker(share: list[run.Prepared], options: run.Options, confirm_for, parallel: int, flow: str):
    """A worker process running ``share``; returns (pid, read end of its pipe, share)."""
    sys.stdout.flush()
    sys.stderr.flush()  # nothing buffered here is written twice
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return pid, read, share
    os.close(read)
    code = 1
    try:
        with os.fdopen(write, "wb") as out:
            def send(r: HostResult) -> None:
                out.write(_portable(r))
                out.flush()
            _run_threads(share, options, confirm_for, parallel, send, flow)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent reports the hosts left unsent
        pass
    finally:
        os._exit(code)  # no atexit handlers, no flushing of buffers the parent owns


def _portable(r: HostResult) -> bytes:
    """The pickled HostResult (without its plan if a plugin's Change cannot be pickled)."""
    try:
        return pickle.dumps(r)
    except Exception as e:  # noqa: BLE001 - a third-party Change holding something odd
        kept = dataclasses.replace(r, result=None, error=r.error or f"its plan could not be passed back: {e}")
        return pickle.dumps(kept)


def _receive(fd: int, finished) -> None:
    with os.fdopen(fd, "rb") as f:
        while True:
            try:
                r = pickle.load(f)
            except (EOFError, pickle.UnpicklingError):
                return
            finished(r)


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def _signature(result: run.Result) -> list:
    """What an apply would do, to compare the plan under the lock with the one shown."""
    return [(o.change, o.diff) for o in result.outcomes if o.action == CHANGE]


def setup(options: run.Options, names: list[str], **kwargs) -> Fleet:
    """``run_hosts`` of the setup flow."""
    return run_hosts(options, names, flow="setup", **kwargs)


def run_hosts(options: run.Options, names: list[str], parallel: int = DEFAULT_PARALLEL, ask=None,
              progress=None, flow: str = "setup") -> Fleet:
    """Plan (and unless --dry, apply) ``flow`` (setup, rollback, promote; facts only
    reads) on every host in ``names``.

    ``ask(fleet)`` (a terminal, no --yes) is called once with every host's plan and
    returns True to apply them; without it and without --yes nothing is applied.
    Raises UsageError (exit 2) before any host is touched when the configuration
    is wrong."""
    if parallel < 1:
        raise UsageError(f"--parallel: {parallel} is not a number of hosts (1 or more)")
    started = time.perf_counter()
    prepared = prepare_all(options, names)
    if options.dry or options.yes or flow == "facts":
        runs = _run_all(prepared, options, lambda _name: None, parallel, progress, flow)
        return Fleet(runs, time.perf_counter() - started)
    planned = _run_all(prepared, dataclasses.replace(options, dry=True), lambda _name: None, parallel, progress,
                       flow)
    fleet = Fleet(planned, time.perf_counter() - started)
    if ask is None or not any(r.ok and r.summary()["changed"] for r in planned) or not ask(fleet):
        for r in planned:
            if r.status == "planned":
                r.status = "not applied"
        return fleet
    shown = {r.host: _signature(r.result) for r in planned if r.ok}

    def confirm_for(name):
        def confirm(result: run.Result) -> bool:
            # a plan made again after an install: the plan shown said it would be
            if result.replanned or _signature(result) == shown[name]:
                return True
            result.notes.append("the plan changed after it was shown: not applied; run again to see it")
            return False
        return confirm

    again = prepare_all(options, list(shown))  # fresh targets: nothing cached from the first look
    applied = {r.host: r for r in _run_all(again, options, confirm_for, parallel, progress, flow)}
    runs = [applied.get(r.host, r) for r in planned]
    return Fleet(runs, time.perf_counter() - started)
