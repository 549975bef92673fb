"""Helpers for plugin authors' tests (and xenrun's own): plan and apply a host of a
site in-process, without the command line.

    from xenrun.testing import plan_host, apply_host
    facts, outcomes = plan_host("site/plugins.toml", "arch-grub")
    assert [o.action for o in outcomes] == [...]
"""

from __future__ import annotations

from xenrun import run
from xenrun.changes import Change
from xenrun.facts import Facts
from xenrun.plan import Outcome, assess


def prepared(config, host: str, root=None, files_only: bool = True) -> run.Prepared:
    return run.prepare(run.Options(config=str(config), host=host, root=str(root) if root else None,
                                   files_only=files_only))


def changes_for(config, host: str, **kw) -> tuple[Facts, list[Change]]:
    """The host's facts and the Changes its plugins return (not yet diffed)."""
    p = prepared(config, host, **kw)
    facts = run.gather_facts(p)
    return facts, run.make_plan(p, facts)


def plan_host(config, host: str, **kw) -> tuple[Facts, list[Outcome]]:
    """The host's facts and its plan diffed against its target."""
    p = prepared(config, host, **kw)
    facts = run.gather_facts(p)
    return facts, assess(run.make_plan(p, facts), p.target)


def apply_host(config, host: str, **kw) -> dict:
    """Plan and apply as `xenrun setup --yes` does (the same plan-lock-apply, so an
    interrupted run is undone first); returns {"run": run id or None, "results":
    one action per planned change}."""
    p = prepared(config, host, **kw)
    result = run.execute(p, lambda: run.Plan(run.make_plan(p, run.gather_facts(p))),
                         run.Options(yes=True, files_only=p.target.files_only), lambda _result: True)
    return {"run": result.run, "results": result.results or [o.action for o in result.outcomes],
            "status": result.status, "notes": result.notes}
