"""Rendering plans and reports: text for people (stdout), one JSON object for
machines. Logs go to stderr, so stdout holds only these."""

from __future__ import annotations

import json

from xenrun.changes import RunCommand
from xenrun.plan import CHANGE, PENDING

_MARK = {CHANGE: "~", "changed": "~", "unchanged": "=", PENDING: "!", "failed": "x"}


def _label(change) -> str:
    if isinstance(change, RunCommand):
        return "$ " + " ".join(change.argv)
    return f"{change.kind} {getattr(change, 'path', '')}"


def text(result, show_unchanged: bool = True) -> str:
    out = [f"host {result.host} ({result.target})"]
    for note in result.notes:
        out.append(f"  note: {note}")
    actions = result.results or [o.action for o in result.outcomes]
    for outcome, action in zip(result.outcomes, actions):
        c = outcome.change
        if action == "unchanged" and not show_unchanged:
            continue
        tag = " ".join(x for x in (c.step, c.plugin) if x)
        out.append(f"{_MARK.get(action, '?')} {_label(c)}  [{tag}] {c.why}".rstrip())
        out.append(f"    {action}: {outcome.reason}")
        if action in (CHANGE, "changed") and outcome.diff and not isinstance(c, RunCommand):
            out += ["    " + line for line in outcome.diff.rstrip("\n").split("\n")]
    s = result.summary()
    verb = {"planned": "Plan", "applied": "Applied", "nothing to do": "Nothing to do",
            "not applied": "Not applied"}.get(result.status, result.status)
    out.append(f"{verb}: {s['changed']} to change, {s['unchanged']} unchanged, {s['pending']} left for the host."
               if result.status in ("planned", "not applied") else
               f"{verb}: {s['changed']} changed, {s['unchanged']} unchanged, {s['pending']} left for the host."
               + (f" (run {result.run})" if result.run else ""))
    return "\n".join(out) + "\n"


def as_json(result) -> str:
    actions = result.results or [o.action for o in result.outcomes]
    plan = []
    for outcome, action in zip(result.outcomes, actions):
        c = outcome.change
        item = {"kind": c.kind, "plugin": c.plugin, "step": c.step, "why": c.why,
                "action": outcome.action, "result": action, "reason": outcome.reason}
        if isinstance(c, RunCommand):
            item["argv"] = list(c.argv)
        else:
            item["path"] = outcome.path
            item["diff"] = outcome.diff
        plan.append(item)
    return json.dumps({"host": result.host, "target": result.target, "plan": plan,
                       "report": {"status": result.status, "run": result.run, "notes": result.notes},
                       "summary": result.summary()}, indent=2) + "\n"
