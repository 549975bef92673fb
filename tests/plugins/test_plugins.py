"""Hooks and plugins: the spec is documented in one template, a host's manager holds
only what it selects, unknown names and misspelt hooks fail before anything runs,
and a third-party package installed with pip is selected from plugins.toml."""

from __future__ import annotations

import inspect
import json
import re
import sys
import textwrap

import pytest

from support.helpers import run_xenrun, tree_hash
from xenrun import hookspecs
from xenrun import registry
from xenrun.errors import UsageError


def test_every_hook_is_documented_in_the_template():
    names = registry.hook_names()
    assert {"detect_hardware", "configure_boot", "configure_network", "create_domain"} <= set(names)
    for name in names:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn)
        assert doc, name
        for part in ("When:", "Parameters:", "Returns:"):
            assert part in doc, f"{name} lacks {part!r}"
        firstresult = fn.xenrun_spec["firstresult"]
        assert ("First result wins" in doc) == firstresult, name
        assert ("Every selected plugin is called" in doc) == (not firstresult), name
        params = list(inspect.signature(fn).parameters)
        for p in params:
            assert f"``{p}``" in doc, f"{name}: parameter {p} not documented"


def test_every_hook_is_implemented_by_a_builtin():
    implemented = set()
    for name in registry.BUILTIN:
        module = registry.load(name)
        implemented |= {h for h in registry.hook_names() if hasattr(module, h)}
    assert implemented == set(registry.hook_names())
    assert {"configure_boot", "boot_entry", "promote_xen"} <= set(dir(registry.load("grub")))
    assert "configure_network" in dir(registry.load("netctl"))
    assert {"create_domain"} <= set(dir(registry.load("image"))) & set(dir(registry.load("lvm")))


def test_manager_holds_only_the_selected_plugins():
    pm = registry.plugin_manager(["facts", "xen"])
    assert sorted(name for name, _ in pm.list_name_plugin()) == ["facts", "xen"]
    pm = registry.plugin_manager(["facts"])
    assert [name for name, _ in pm.list_name_plugin()] == ["facts"]


def test_unknown_plugin_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown plugin 'grubb' \(known: .*facts.*xen"):
        registry.plugin_manager(["facts", "grubb"])


def test_misspelt_hook_implementation_fails_loudly(tmp_path, monkeypatch):
    (tmp_path / "typo_plugin.py").write_text(textwrap.dedent('''
        from xenrun import hookimpl

        @hookimpl
        def configure_bot(facts, host):
            return []
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTIN, "typo", "typo_plugin")
    with pytest.raises(UsageError, match=r"plugin 'typo' implements a hook that does not exist.*configure_bot"):
        registry.plugin_manager(["facts", "typo"])


def test_wrong_hook_arguments_fail_loudly(tmp_path, monkeypatch):
    (tmp_path / "badargs_plugin.py").write_text(textwrap.dedent('''
        from xenrun import hookimpl

        @hookimpl
        def configure_host(facts, host, nonsense):
            return []
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTIN, "badargs", "badargs_plugin")
    with pytest.raises(UsageError, match="badargs"):
        registry.plugin_manager(["badargs"])


def test_third_party_plugin_installed_with_pip_is_selected_from_plugins_toml(site, sample_plugin):
    env = {"PYTHONPATH": str(sample_plugin)}
    r = run_xenrun("plugins", "--config", site / "plugins.toml", "--format", "json", env=env)
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["sample"]["source"] == "entry point xenrun_sample"
    assert not rows["sample"]["selected"]
    text = (site / "plugins.toml").read_text().replace('[defaults]\n', '[defaults]\nplugins = ["sample"]\n')
    text += '\n[plugin.sample]\nmotd = "hello-from-sample"\n'
    (site / "plugins.toml").write_text(text)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-uefi", "--yes", "--files-only",
                   "--format", "json", env=env)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    assert {"kind": "WriteFile", "plugin": "sample", "path": "/etc/motd"}.items() <= next(
        p for p in plan if p.get("path") == "/etc/motd").items()
    assert (site / "hosts/arch-uefi/etc/motd").read_text() == "hello-from-sample\n"
    # the sample plugin's own facts were merged
    r = run_xenrun("facts", "--config", site / "plugins.toml", "--host", "arch-uefi", "--format", "json", env=env)
    assert json.loads(r.stdout)["facts"]["sample_seen_hostname"] is True


def test_without_the_package_the_name_is_unknown(site):
    text = (site / "plugins.toml").read_text().replace('[defaults]\n', '[defaults]\nplugins = ["sample"]\n')
    (site / "plugins.toml").write_text(text)
    before = tree_hash(site)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-uefi", "--yes")
    assert r.returncode == 2
    assert re.search(r"plugins.toml:\d+: defaults.plugins: unknown plugin 'sample' \(known: debootstrap, efistub, facts, grub, ifupdown, image, lvm, netctl, networkd, syslinux, xen\)", r.stderr)
    assert tree_hash(site) == before


def test_clashing_facts_are_refused(tmp_path, monkeypatch, site):
    (tmp_path / "clash_plugin.py").write_text(textwrap.dedent('''
        from xenrun import hookimpl

        @hookimpl
        def detect_hardware(probe):
            return {"uplink": "eth9"}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.BUILTIN, "clash", "clash_plugin")
    from xenrun import run
    p = run.prepare(run.Options(config=str(site / "plugins.toml"), host="arch-grub"))
    p.pm.register(sys.modules.get("clash_plugin") or registry.load("clash"), name="clash")
    with pytest.raises(UsageError, match="plugins 'facts' and 'clash' both answer the fact 'uplink'"):
        run.gather_facts(p)


def test_logs_are_bound_to_host_and_plugin(site):
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    from xenrun import run
    with capture_logs(processors=[merge_contextvars]) as logs:
        run.setup(run.Options(config=str(site / "plugins.toml"), host="arch-syslinux", dry=True), lambda r: False)
    assert logs == [] or all(e.get("host") == "arch-syslinux" for e in logs)
    (site / "hosts/arch-syslinux/usr/lib/virtualbox").mkdir(parents=True)
    with capture_logs(processors=[merge_contextvars]) as logs:
        run.setup(run.Options(config=str(site / "plugins.toml"), host="arch-syslinux", dry=True), lambda r: False)
    warning = [e for e in logs if "virtualbox" in e["event"]]
    assert warning and warning[0]["host"] == "arch-syslinux" and warning[0]["plugin"] == "xen"
    assert warning[0]["log_level"] == "warning" and "(S4)" in warning[0]["event"]
