"""A third-party plugin as a user would write one: it imports only ``hookimpl`` and
the public Change and Setting types. xenrun's tests select it from plugins.toml to
write a file, run a command and validate a file."""

from xenrun import hookimpl
from xenrun import settings as check
from xenrun.changes import RunCommand, WriteFile
from xenrun.settings import Setting


@hookimpl
def declare_settings():
    return {"sample": {
        "motd": Setting(check.word, "xen-host", "a word written to /etc/motd"),
        "files": Setting(check.positive_int, 1, "how many /etc/xenrun-sample/N files to write"),
        "command": Setting(check.words, [], "an argv run after /etc/motd changes"),
        "validate": Setting(check.words, [], "an argv that checks /etc/motd before it goes live"),
    }}


@hookimpl
def detect_hardware(probe):
    return {"sample_seen_hostname": probe.text("/etc/hostname") is not None}


@hookimpl
def configure_host(facts, host):
    s = host.settings["sample"]
    changes = [WriteFile("/etc/motd", f"{s['motd']}\n", validate=tuple(s["validate"]), why="say hello")]
    changes += [WriteFile(f"/etc/xenrun-sample/{n}", f"file {n} of {host.name}\n") for n in range(1, s["files"] + 1)]
    if s["command"]:
        changes.append(RunCommand(tuple(s["command"]), onchange=("/etc/motd",), why="run the sample command"))
    return changes
