"""XENRUN_FAULT="HOOK:raise" makes HOOK raise; "HOOK:wrong" makes it return a value
of the wrong type; "HOOK:print" makes it print to stdout and answer normally; "HOOK:badchange" makes
it build a RunCommand from a shell string (which xenrun refuses when it is made)."""

import os


def maybe(hook: str, normal):
    hook_wanted, _, mode = os.environ.get("XENRUN_FAULT", "").partition(":")
    if hook_wanted != hook:
        return normal
    if mode == "raise":
        raise RuntimeError(f"boom in {hook}")
    if mode == "wrong":
        return 42
    if mode == "badchange":
        from xenrun.api import RunCommand
        return [RunCommand("networkctl reload", creates="/etc/faulty")]
    if mode == "print":
        print(f"{hook} says hello on stdout")
    return normal
