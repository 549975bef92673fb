"""The core's lockout-safe network switch (S11), shared by every network plugin.

A plugin returns one ``SwitchNetwork`` (xenrun.changes): the files of the new
configuration and the commands that stop the old one, start the new one, and take
either back. On a live host the core installs the switch script (netswitch.sh,
package data beside this module) and the applier, right before running it, writes
a plan folder in the run's journal folder: the new files, the originals it has just
saved, and the commands as NUL-separated words. The script switches, checks, and
reverts on its own if the check fails or xenrun does not confirm over its
connection in time. Off the live host only the files are written.
"""

from __future__ import annotations

import dataclasses
from importlib import resources

from xenrun.changes import NET_SWITCH, Change, SwitchNetwork, WriteFile

SCRIPT = resources.files(__package__).joinpath("netswitch.sh").read_text()
KINDS = ("stop", "start", "undo", "restart")


def script_change() -> WriteFile:
    return WriteFile(NET_SWITCH, SCRIPT, mode=0o755, validate=("sh", "-n", "{}"), step="S11", plugin="core",
                     why="the switch that makes a new network live and puts the old one back if it fails")


def expand(changes: list[Change], live: bool) -> list[Change]:
    """Each SwitchNetwork as it is carried out here: on a live host the switch
    script (once) then the switch; elsewhere only its files, which the network's
    own boot-time start picks up."""
    out: list[Change] = []
    script = False
    for change in changes:
        if not isinstance(change, SwitchNetwork):
            out.append(change)
        elif live:
            if not script:
                out.append(script_change())
                script = True
            out.append(change)
        else:
            out += [_owned(f, change) for f in change.files]
    return out


def _owned(file: Change, switch: SwitchNetwork) -> Change:
    """A switch's file as a change of its own, named after the switch's plugin."""
    return dataclasses.replace(file, plugin=file.plugin or switch.plugin, step=file.step or switch.step,
                               why=file.why or switch.why)


def plan_folder(change: SwitchNetwork, folder: str, saved: dict[str, dict]) -> list[tuple[str, bytes, int]]:
    """The files (path, data, mode) the applier writes in ``folder`` for the script's
    ``run``. ``saved``: the journal's record of each file's original ({"kind":
    "absent"} or {"kind": "file", "copy", "mode", "uid", "gid"})."""
    out, lines = [], []
    for number, file in enumerate(change.files, 1):
        if isinstance(file, WriteFile):
            new, mode = f"{folder}/new.{number}", f"{file.mode:o}"
            out.append((new, file.content, 0o600))
        else:
            new, mode = "-", "-"
        state = saved.get(file.path, {"kind": "absent"})
        if state["kind"] == "file":
            old = [state["copy"], f"{state['mode']:o}", str(state["uid"]), str(state["gid"])]
        elif state["kind"] == "absent":
            old = ["-", "-", "-", "-"]
        else:  # the plan refuses links at these paths: nothing else can be put back by the script
            raise ValueError(f"{file.path}: a {state['kind']} cannot be switched")
        lines.append("\t".join([file.path, new, mode, *old]))
    out.append((f"{folder}/files", ("\n".join(lines) + "\n").encode(), 0o600))
    for kind in KINDS:
        for number, argv in enumerate(getattr(change, kind), 1):
            out.append((f"{folder}/{kind}.{number}", b"\0".join(word.encode() for word in argv), 0o600))
    return out


def run_argv(change: SwitchNetwork, folder: str) -> tuple[str, ...]:
    """The script's ``run`` with the plan folder (known only at apply time)."""
    return change.argv[:2] + (folder,) + change.argv[2:]


def confirm_argv(folder: str) -> tuple[str, ...]:
    return (NET_SWITCH, "confirm", folder)
