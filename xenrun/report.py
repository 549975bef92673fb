"""Rendering plans and reports: text for people (stdout), one JSON object for
machines. Logs go to stderr, so stdout holds only these."""

from __future__ import annotations

import json

from xenrun.changes import RunCommand, SwitchNetwork
from xenrun.plan import CHANGE, PENDING

_MARK = {CHANGE: "~", "changed": "~", "unchanged": "=", PENDING: "!", "failed": "x"}


def _label(change) -> str:
    if isinstance(change, RunCommand):
        return "$ " + " ".join(change.argv)
    return f"{change.kind} {getattr(change, 'path', '')}"


def text(result, show_unchanged: bool = True) -> str:
    out = [f"host {result.host} ({result.target})"]
    for note in result.notes:  # plugins' warnings read "warning: PLUGIN: ..."
        out.append(f"  {note}" if note.startswith("warning: ") else f"  note: {note}")
    actions = result.results or [o.action for o in result.outcomes]
    for outcome, action in zip(result.outcomes, actions):
        c = outcome.change
        if action == "unchanged" and not show_unchanged:
            continue
        tag = " ".join(x for x in (c.step, c.plugin) if x)
        out.append(f"{_MARK.get(action, '?')} {_label(c)}  [{tag}] {c.why}".rstrip())
        out.append(f"    {action}: {outcome.reason}")
        if action in (CHANGE, "changed") and outcome.diff and (isinstance(c, SwitchNetwork)
                                                               or not isinstance(c, RunCommand)):
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
    return json.dumps(as_dict(result), indent=2) + "\n"


def as_dict(result) -> dict:
    """The object as_json prints (a fleet's report holds one per host)."""
    actions = result.results or [o.action for o in result.outcomes]
    plan = []
    for outcome, action in zip(result.outcomes, actions):
        c = outcome.change
        item = {"kind": c.kind, "plugin": c.plugin, "step": c.step, "why": c.why,
                "action": outcome.action, "result": action, "reason": outcome.reason}
        if isinstance(c, SwitchNetwork):  # a command with the files it puts in place
            item.update(argv=list(c.argv), paths=list(c.paths), diff=outcome.diff)
        elif isinstance(c, RunCommand):
            item["argv"] = list(c.argv)
        else:
            item["path"] = outcome.path
            item["diff"] = outcome.diff
        plan.append(item)
    return {"host": result.host, "target": result.target, "plan": plan, "notes": result.notes,
            "report": {"status": result.status, "run": result.run, "notes": result.notes},
            "summary": result.summary()}


# -- fleets (xenrun.fleet) ------------------------------------------------------------

def progress_line(done: int, total: int, host_run) -> str:
    """One line on stderr as a host finishes: "[12/30] xen07 applied: 5 changed in 0.42 s"."""
    s = host_run.summary()
    what = f"{s['changed']} changed" if host_run.status == "applied" else \
        f"{s['changed']} to change" if host_run.status in ("planned", "not applied") else \
        host_run.error.splitlines()[0][:160] if host_run.error else ""
    return f"[{done}/{total}] {host_run.host} {host_run.status}{': ' + what if what else ''} in {host_run.seconds:.2f} s"


def fleet_summary(fleet) -> dict:
    by_status: dict[str, int] = {}
    for r in fleet.hosts:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    totals = {k: sum(r.summary()[k] for r in fleet.hosts) for k in ("changed", "unchanged", "pending")}
    return {"hosts": len(fleet.hosts), "ok": sum(r.ok for r in fleet.hosts),
            "not_ok": sum(not r.ok for r in fleet.hosts), "statuses": by_status, **totals,
            "seconds": round(fleet.seconds, 3)}


def fleet_table(fleet) -> str:
    """The table at the end of a fleet run, then one line per host that failed."""
    width = max([4] + [len(r.host) for r in fleet.hosts])
    out = [f"{'host':<{width}}  {'changed':>7}  {'unchanged':>9}  {'pending':>7}  {'status':<13}  {'seconds':>7}"]
    for r in fleet.hosts:
        s = r.summary()
        out.append(f"{r.host:<{width}}  {s['changed']:>7}  {s['unchanged']:>9}  {s['pending']:>7}"
                   f"  {r.status:<13}  {r.seconds:>7.2f}")
    total = fleet_summary(fleet)
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(total["statuses"].items()))
    planned = all(r.status in ("planned", "not applied", "read") or not r.ok for r in fleet.hosts)
    verb = "to change" if planned else "changed"  # a --dry fleet changed nothing
    out.append(f"{total['hosts']} host(s): {statuses}; {total['changed']} {verb} in {fleet.seconds:.2f} s")
    out += [f"{r.host}: {r.status}: {r.error}" for r in fleet.hosts if r.error]
    return "\n".join(out) + "\n"


def fleet_text(fleet, plans: bool) -> str:
    """``plans``: every host's plan first (--dry, or before asking), then the table."""
    out = []
    if plans:
        out += [text(r.result, show_unchanged=False) for r in fleet.hosts if r.result]
    return "\n".join(out + [fleet_table(fleet)])


def fleet_json(fleet) -> str:
    hosts = []
    for r in fleet.hosts:
        item = as_dict(r.result) if r.result else {
            "host": r.host, "target": r.target, "plan": [],
            "report": {"status": r.status, "run": None, "notes": []}, "summary": r.summary()}
        item["report"]["status"] = r.status
        item["report"]["error"] = r.error or None
        if r.facts is not None:
            item["facts"] = r.facts
        item["seconds"] = round(r.seconds, 3)
        item["round_trips"] = r.round_trips
        hosts.append(item)
    return json.dumps({"hosts": hosts, "summary": fleet_summary(fleet)}, indent=2) + "\n"
