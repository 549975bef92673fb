"""The plugin contract, from the author's side (issue 12, items 2 to 6): a hook that
raises or returns the wrong thing is reported as that plugin's fault (one block,
exit 3, nothing touched), Changes check themselves when they are made, roles are
checked against what a plugin implements, notes reach the plan and the JSON, and
what a plugin prints never reaches stdout."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpers import REPO, run_xenrun, tree_hash
from xenrun.changes import EnsureLine, RunCommand, SparseFile, Symlink, WriteFile

GENERIC_HOOKS = ("declare_settings", "detect_hardware", "xen_options", "configure_host")


@pytest.fixture(scope="session")
def faulty_plugin(tmp_path_factory) -> Path:
    """tests/plugin_faulty installed with pip into a folder of its own (on
    PYTHONPATH of the xenrun processes): entry points faulty, faultyboot, faultynet."""
    target = tmp_path_factory.mktemp("faulty-plugin")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO / "tests" / "plugin_faulty")], check=True,
                   capture_output=True)
    shutil.rmtree(REPO / "tests" / "plugin_faulty" / "build", ignore_errors=True)
    return target


def _host(site: Path, name: str = "lab", boot: str = "none", network: str = "none",
          plugins=("faulty",)) -> Path:
    root = site / "hosts" / name
    shutil.copytree(site / "hosts" / "arch-grub", root, symlinks=True)
    (root / "etc/hostname").write_text(f"{name}\n")
    listed = ", ".join(f'"{p}"' for p in plugins)
    with (site / "plugins.toml").open("a") as f:
        f.write(f'\n[hosts.{name}]\nroot = "hosts/{name}"\nboot = "{boot}"\nnetwork = "{network}"\n'
                f"plugins = [{listed}]\n")
    return root


def _xenrun(site, faulty_plugin, *args, fault="", debug=False):
    env = {"PYTHONPATH": str(faulty_plugin), "XENRUN_FAULT": fault}
    if debug:
        env["XENRUN_DEBUG"] = "1"
    return run_xenrun(*args, "--config", site / "plugins.toml", env=env)


@pytest.mark.parametrize("mode", ["raise", "wrong"])
@pytest.mark.parametrize("hook", GENERIC_HOOKS + ("configure_boot", "configure_network"))
def test_a_hook_that_fails_is_the_plugins_fault(site, faulty_plugin, hook, mode):
    boot = "faultyboot" if hook == "configure_boot" else "none"
    network = "faultynet" if hook == "configure_network" else "none"
    plugin = {"configure_boot": "faultyboot", "configure_network": "faultynet"}.get(hook, "faulty")
    _host(site, boot=boot, network=network)
    before = tree_hash(site)
    r = _xenrun(site, faulty_plugin, "setup", "--host", "lab", "--yes", "--files-only", fault=f"{hook}:{mode}")
    assert r.returncode == 3, r.stderr
    block = [line for line in r.stderr.splitlines() if not line.startswith("{")]  # log lines are JSON
    first = block[0]
    assert first.startswith(f"xenrun: plugin {plugin!r} failed in hook {hook} (host lab): ")
    assert ("RuntimeError: boom in " + hook if mode == "raise" else "returned int 42, expected") in first
    # where it raised (the package's fault.py), or the hook that returned the wrong thing
    module = "fault.py" if mode == "raise" else {"faultyboot": "boot.py", "faultynet": "net.py"}.get(plugin, "__init__.py")
    assert re.search(rf"^  at .*xenrun_faulty/{re.escape(module)}:\d+$", r.stderr, re.M), r.stderr
    assert "Traceback" not in r.stderr and len(block) == 3
    assert r.stdout == "" and tree_hash(site) == before


def test_debug_adds_the_traceback(site, faulty_plugin):
    _host(site)
    r = _xenrun(site, faulty_plugin, "setup", "--host", "lab", "--dry", fault="configure_host:raise", debug=True)
    assert r.returncode == 3 and "Traceback (most recent call last)" in r.stderr
    assert "RuntimeError: boom in configure_host" in r.stderr


@pytest.mark.parametrize("hook, task", [("promote_xen", ("promote", "--dry")),
                                        ("boot_entry", ("boot-check",))])
def test_boot_hooks_of_other_tasks_are_reported_too(site, faulty_plugin, hook, task):
    _host(site, boot="faultyboot")
    before = tree_hash(site)
    r = _xenrun(site, faulty_plugin, *task, "--host", "lab", fault=f"{hook}:raise")
    assert r.returncode == 3, r.stderr
    assert f"plugin 'faultyboot' failed in hook {hook} (host lab)" in r.stderr and "xenrun_faulty/fault.py:" in r.stderr
    assert tree_hash(site) == before


def test_a_bad_change_is_refused_when_the_plugin_makes_it(site, faulty_plugin):
    _host(site)
    before = tree_hash(site)
    r = _xenrun(site, faulty_plugin, "setup", "--host", "lab", "--dry", fault="configure_host:badchange")
    assert r.returncode == 3, r.stderr
    assert "plugin 'faulty' failed in hook configure_host (host lab): TypeError: RunCommand: argv must be a list" \
        in r.stderr
    assert re.search(r"xenrun_faulty/fault\.py:\d+", r.stderr) and tree_hash(site) == before


def test_in_a_fleet_the_faulty_host_is_reported_and_the_others_go_on(site, faulty_plugin):
    _host(site, "lab")
    _host(site, "lab2", plugins=())
    r = _xenrun(site, faulty_plugin, "setup", "--host", "lab,lab2", "--yes", "--files-only",
                fault="configure_host:raise")
    assert r.returncode == 3, r.stderr
    assert re.search(r"^lab\s+0\s+0\s+0\s+plugin fault", r.stdout, re.M), r.stdout
    assert re.search(r"^lab2\s+\d+\s+\d+\s+\d+\s+applied", r.stdout, re.M), r.stdout
    assert "lab: plugin fault: plugin 'faulty' failed in hook configure_host (host lab)" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert not (site / "hosts/lab/var/lib/xenrun/runs").exists()


def test_notes_and_warnings_reach_the_plan_and_the_json(site, faulty_plugin):
    _host(site)
    r = _xenrun(site, faulty_plugin, "setup", "--host", "lab", "--dry")
    assert r.returncode == 0, r.stderr
    assert "  note: faulty: faulty was here" in r.stdout and "  warning: faulty: faulty warns you" in r.stdout
    r = _xenrun(site, faulty_plugin, "setup", "--host", "lab", "--dry", "--format", "json")
    notes = json.loads(r.stdout)["notes"]
    assert "faulty: faulty was here" in notes and "warning: faulty: faulty warns you" in notes
    assert notes.count("faulty: faulty was here") == 1


def test_what_a_plugin_prints_leaves_the_json_valid(site, faulty_plugin):
    _host(site)
    for hook in GENERIC_HOOKS:
        r = _xenrun(site, faulty_plugin, "setup", "--host", "lab", "--dry", "--format", "json",
                    fault=f"{hook}:print")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["host"] == "lab"
        assert f"{hook} says hello on stdout" in r.stderr


def test_a_host_missing_from_plugins_toml_is_told_it_got_the_defaults(site):
    (site / "hosts/arch-grub/etc/hostname").write_text("elsewhere\n")
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--root", site / "hosts/arch-grub", "--dry",
                   "--format", "json")
    assert r.returncode == 0, r.stderr
    assert any("host 'elsewhere' has no [hosts.elsewhere]" in n and "[defaults] were used" in n
               for n in json.loads(r.stdout)["notes"])


# -- roles --------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("boot", "netctl", "plugin 'netctl' cannot be the boot plugin: it does not implement configure_boot"),
    ("network", "grub", "plugin 'grub' cannot be the network plugin: it does not implement configure_network"),
    ("disks", '["netctl"]', "plugin 'netctl' cannot be the disk plugin: it does not implement create_domain"),
])
def test_a_plugin_chosen_for_a_role_it_cannot_play_is_refused(site, key, value, message):
    text = (site / "plugins.toml").read_text()
    value = value if value.startswith("[") else f'"{value}"'
    text = text.replace('[hosts.arch-grub]    # BIOS, GRUB, Intel VT-x and VT-d\n',
                        f'[hosts.arch-grub]    # BIOS, GRUB, Intel VT-x and VT-d\n{key} = {value}\n')
    text = text.replace('root = "hosts/arch-grub"\nboot = "grub"\n', 'root = "hosts/arch-grub"\n') \
        if key == "boot" else text
    (site / "plugins.toml").write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(f"{key} = {value}"))
    before = tree_hash(site)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 2
    assert r.stderr.strip() == f"xenrun: {site / 'plugins.toml'}:{line}: hosts.arch-grub.{key}: {message}"
    assert tree_hash(site) == before


def test_a_second_network_plugin_is_refused_by_name(site, faulty_plugin):
    _host(site, network="faultynet", plugins=("netctl",))
    r = _xenrun(site, faulty_plugin, "setup", "--host", "lab", "--dry")
    assert r.returncode == 2
    assert re.search(r"plugins\.toml:\d+: hosts\.lab\.plugins: plugin 'netctl' implements configure_network,"
                     r" which only the network plugin \(network = 'faultynet'\) may", r.stderr), r.stderr


# -- Changes check themselves ---------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: RunCommand("networkctl reload", creates="/x"), "argv must be a list of words"),
    (lambda: RunCommand(("true",), unless="test -e /x"), "unless must be a list of words"),
    (lambda: RunCommand(("true",), onchange="/etc/x"), "onchange must be a list of absolute paths"),
    (lambda: RunCommand(("true",), onchange=("etc/x",)), "absolute"),
    (lambda: RunCommand(("true",), writes="/boot/grub/grub.cfg", creates="/x"), "writes must be a list"),
    (lambda: RunCommand(("true", 3), creates="/x"), "every word must be a string"),
    (lambda: RunCommand(("true",), creates="/x", timeout="10"), "timeout must be a positive number"),
    (lambda: WriteFile("/etc/x", None), "content must be str or bytes"),
    (lambda: WriteFile("/etc/x", "a", validate="bash -n {}"), "validate must be a list of words"),
    (lambda: WriteFile("/etc/x", "a", validate=("bash", "-n")), 'has no "{}" word'),
    (lambda: WriteFile("/etc/x", "a", mode="644"), "mode must be a file mode"),
    (lambda: WriteFile(Path("/etc/x"), "a"), "path must be an absolute path (a string)"),
    (lambda: WriteFile("etc/x", "a"), "absolute"),
    (lambda: EnsureLine("/etc/x", "a", replace="("), "replace is not a regular expression"),
    (lambda: EnsureLine("/etc/x", None), "line must be a string"),
    (lambda: Symlink("/etc/x", ""), "target must be a non-empty path"),
    (lambda: SparseFile("/var/x.img", "10G"), "size must be a number of bytes"),
    (lambda: WriteFile("/etc/x", "a", why=None), "why must be a string"),
])
def test_a_malformed_change_is_refused_when_made(make, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        make()


def test_bridge_port_is_the_physical_port_behind_the_bridge_on_a_second_run(site):
    """After the bridge is up the default route goes through it (facts.uplink is
    the bridge): bridge_port names the port behind it, guests' vifs left out, so a
    network plugin converges on its second run."""
    from xenrun import run
    root = site / "hosts/arch-grub"
    net = root / "sys/class/net"
    (net / "xenbr0/bridge").mkdir(parents=True)
    (net / "xenbr0/address").write_text((net / "enp3s0/address").read_text())
    for port in ("enp3s0", "vif1.0"):
        (net / port).mkdir(exist_ok=True)
        (net / port / "master").symlink_to("../xenbr0")
    route = root / "proc/net/route"
    route.write_text(route.read_text().replace("enp3s0\t", "xenbr0\t"))
    found = run.facts(run.Options(config=str(site / "plugins.toml"), host="arch-grub"))[1]
    assert (found.uplink, found.bridge_port) == ("xenbr0", "enp3s0")
    (net / "enp3s0/master").unlink()
    found = run.facts(run.Options(config=str(site / "plugins.toml"), host="arch-grub"))[1]
    assert found.bridge_port is None  # only a guest's vif behind it: cannot be told


@pytest.mark.parametrize("mode", ["raise", "wrong"])
def test_a_failing_disk_plugin_is_the_plugins_fault(site, faulty_plugin, monkeypatch, mode):
    """create_domain through the same facade: the faulty disk plugin stands in for
    the image backend, in-process."""
    from xenrun import guests, registry, run
    from xenrun.errors import PluginFault
    monkeypatch.syspath_prepend(str(faulty_plugin))
    monkeypatch.setitem(registry.BUILTIN, "image", "xenrun_faulty.disk")
    monkeypatch.setenv("XENRUN_FAULT", f"create_domain:{mode}")
    before = tree_hash(site)
    opts = guests.DomainOptions(run.Options(config=str(site / "plugins.toml"), host="arch-grub", dry=True,
                                            files_only=True))
    with pytest.raises(PluginFault) as e:
        guests.create(opts, "arch-pv", lambda result: False)
    assert (e.value.plugin, e.value.hook, e.value.host) == ("image", "create_domain", "arch-grub")
    assert e.value.exit_code == 3 and "xenrun_faulty/" in e.value.where
    assert tree_hash(site) == before
