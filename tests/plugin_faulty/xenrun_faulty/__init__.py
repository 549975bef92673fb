"""A plugin that implements every hook open to any plugin, each able to fail."""

from xenrun.api import Setting, WriteFile, checks, hookimpl, note, warn

from xenrun_faulty.fault import maybe


@hookimpl
def declare_settings():
    return maybe("declare_settings", {"faulty": {"word": Setting(checks.word, "ok", "a word")}})


@hookimpl
def detect_hardware(probe):
    return maybe("detect_hardware", {"faulty_seen": True})


@hookimpl
def xen_options(facts, host):
    return maybe("xen_options", [])


@hookimpl
def configure_host(facts, host):
    note("faulty was here")
    warn("faulty warns you")
    return maybe("configure_host", [WriteFile("/etc/faulty", "ok\n", why="the faulty plugin's file")])
