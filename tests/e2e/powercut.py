"""Pull the plug (issue 17.6): the emulated machine's power cut during ``xenrun
setup``, at a few of the applier's crash points, with nothing to hide behind.

QEMU runs the disks with cache=writeback here (it honours the guest's flushes, as
a real disk does), so killing it loses exactly what the guest had not made
durable: its page cache, the writes in flight. xenrun is stopped at the point
(XENRUN_PAUSE_AT=LABEL:K, a test hook of the applier), the power is cut, then
xenrun is killed. The machine must then boot (plain Linux, GRUB's default), and
after the next ``xenrun setup`` has recovered and converged every managed file
must have been, at each cut, either its old or its new self (``check_old_or_new``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# (crash point, why there): the first stretch half written (a temp file beside
# its file); the first command run (grub-mkconfig's grub.cfg not yet on record as
# done); the second stretch's originals on record and nothing of it changed yet
POINTS = ("temp written:2", "command ran:1", "originals on record:2")
NOT_COMPARED = ("/boot/grub/grubenv",)  # GRUB itself rewrites it at boot (next_entry cleared)


def cut_during_setup(scenario, point: str) -> str:
    """Start ``xenrun setup --yes``, cut the power when it reaches ``point``;
    returns the line xenrun printed there."""
    scenario.commands += 1
    name = f"{scenario.commands:02d}-xenrun-setup-cut"
    exe = Path(sys.executable).parent / "xenrun"
    argv = ([str(exe)] if exe.exists() else [sys.executable, "-m", "xenrun"]) + \
        ["setup", "--yes", "--config", str(scenario.site), "--host", "e2e"]
    scenario.say(f"  $ XENRUN_PAUSE_AT='{point}' xenrun setup --yes   (output: {scenario.workdir / name}.out/.err)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XENRUN_PAUSE_AT": point,
           "XENRUN_KNOWN_HOSTS": str(scenario.workdir / "known_hosts")}
    err_lines: list[str] = []
    with open(scenario.workdir / f"{name}.out", "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                env=env, cwd=scenario.workdir)
        deadline = time.monotonic() + 900
        paused = ""
        try:
            for line in proc.stderr:
                err_lines.append(line)
                if "paused at crash point" in line:
                    paused = line.strip()
                    break
                if time.monotonic() > deadline:
                    break
            if paused:
                scenario.vm.power_cut()
                scenario.say(f"    {paused}: power cut (QEMU killed)")
        finally:
            proc.kill()  # a stopped process dies of SIGKILL too
            proc.wait(timeout=60)
            (scenario.workdir / f"{name}.err").write_text("".join(err_lines))
    if not paused:
        raise AssertionError(f"xenrun setup never reached crash point {point} (exit {proc.returncode}):\n"
                             + "".join(err_lines[-30:]))
    return paused


def power_cuts(scenario) -> list[tuple[str, str]]:
    """Each point in turn: cut, power on, the machine boots plain Linux, the cut
    run left no end record. Returns (point, managed state before any repair)."""
    states = []
    for point in POINTS:
        cut_during_setup(scenario, point)
        scenario.timed("boot", f"power on after the cut at {point}", scenario.vm.power_on)
        scenario.check_linux(f"after the power cut at {point} (GRUB's default still boots)")
        last = scenario.sh("ls /var/lib/xenrun/runs | sort | tail -1")
        ends = scenario.sh(f"grep -c -E '\"op\": \"(commit|undone|failed)\"' /var/lib/xenrun/runs/{last}/journal"
                           " || true")
        scenario.check(ends.strip() == "0", f"the cut run {last} has no end record (cut mid-run)", ends)
        states.append((point, scenario.managed_state()))
    return states


def check_old_or_new(scenario, before: str, states: list[tuple[str, str]], after: str) -> None:
    """Every managed file and link, at every cut, was either as before the first
    cut or as the converged setup left it: never torn, never a third thing. A
    temp file beside one is allowed (the next run removes it; ``after`` has none)."""
    known = set(before.splitlines()) | set(after.splitlines())
    scenario.check(".xenrun-tmp" not in after, "no temp file is left once setup converged")
    for point, state in states:
        odd = [line for line in state.splitlines()
               if line not in known and ".xenrun-tmp" not in line
               and not any(line.endswith(" " + p) or line.startswith(p + " ") for p in NOT_COMPARED)]
        scenario.check(not odd, f"after the cut at {point}, every managed file was old or new"
                       f" ({len(state.splitlines())} files and links hashed)", "\n".join(odd))
