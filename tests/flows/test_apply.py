"""Apply as a user runs it (the xenrun command, as a process) on the example hosts:
idempotency, exact --dry, crash consistency under SIGKILL at every point, rollback
on failure, one run per target at a time, and `xenrun rollback`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from support.helpers import HOSTS, STATE, add_busybox, file_map, lab_host, run_xenrun, tree_hash


@pytest.fixture(autouse=True)
def _sample_plugin_on_path(sample_plugin, monkeypatch):
    """The xenrun processes see the pip-installed sample plugin's entry point."""
    monkeypatch.setenv("PYTHONPATH", str(sample_plugin))


def setup_json(site, host, *extra, env=None):
    """`xenrun setup --format json` on an example host; --files-only, since the
    example roots hold no programs for the commands (tests that want commands to
    run give the root busybox)."""
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", host, "--format", "json", "--files-only",
                   *extra, env=env)
    return r, (json.loads(r.stdout) if r.stdout.strip() else None)


@pytest.mark.parametrize("host", HOSTS)
def test_apply_then_plan_again_changes_nothing(site, host):
    r, first = setup_json(site, host, "--yes")
    assert r.returncode == 0, r.stderr
    assert first["report"]["status"] == "applied" and first["summary"]["changed"] > 0
    r, again = setup_json(site, host, "--dry")
    assert r.returncode == 0, r.stderr
    assert again["summary"]["changed"] == 0, [p for p in again["plan"] if p["action"] != "unchanged"]
    r, third = setup_json(site, host, "--yes")
    assert third["report"]["status"] == "nothing to do" and third["summary"]["changed"] == 0


@pytest.mark.parametrize("host", HOSTS)
def test_dry_writes_nothing_and_predicts_exactly_what_apply_changes(site, host):
    root = site / "hosts" / host
    before_hash, before = tree_hash(site), file_map(root)
    r, plan = setup_json(site, host, "--dry")
    assert r.returncode == 0, r.stderr
    assert tree_hash(site) == before_hash, "--dry wrote something"
    predicted = {p["path"].lstrip("/") for p in plan["plan"] if p["action"] == "change" and p.get("path")}
    assert all(p["diff"] for p in plan["plan"] if p["action"] == "change")
    r, _ = setup_json(site, host, "--yes")
    assert r.returncode == 0, r.stderr
    after = file_map(root)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed == predicted


def test_text_plan_shows_diffs_and_summary(site):
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry", "--files-only")
    assert r.returncode == 0, r.stderr
    assert "+none /proc/xen xenfs defaults,nofail 0 0" in r.stdout
    assert "! $ grub-mkconfig -o /boot/grub/grub.cfg" in r.stdout
    assert re.search(r"^Plan: 10 to change, 1 unchanged, 4 left for the host\.$", r.stdout, re.M)


def test_no_terminal_and_no_yes_only_plans(site):
    before = tree_hash(site)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--files-only")
    assert r.returncode == 0 and "Not applied" in r.stdout + r.stderr
    assert tree_hash(site) == before


def test_failing_command_leaves_the_tree_byte_identical(site):
    root = lab_host(site, 'files = 3\ncommand = ["false"]')
    before = tree_hash(root, skip_state=True)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 1, r.stderr
    assert "command false failed" in r.stderr and "put back" in r.stderr
    assert tree_hash(root, skip_state=True) == before


def test_failing_validator_leaves_the_tree_byte_identical(site):
    root = lab_host(site, 'validate = ["grep", "-q", "not-there", "{}"]')
    before = tree_hash(root, skip_state=True)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 1
    assert "rejected the new /etc/motd" in r.stderr
    assert tree_hash(root, skip_state=True) == before


def test_validator_that_passes_lets_the_file_go_live(site):
    root = lab_host(site, 'motd = "ok-host"\nvalidate = ["grep", "-q", "ok", "{}"]')
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 0, r.stderr
    assert (root / "etc/motd").read_text() == "ok-host\n"


def test_command_runs_inside_the_root_with_chroot(site):
    root = lab_host(site, 'command = ["touch", "/ran-inside"]', applets=("touch",))
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 0, r.stderr
    assert (root / "ran-inside").exists()
    r, again = setup_json(site, "lab", "--dry")
    assert again["summary"]["changed"] == 0


def test_command_that_cannot_run_stops_before_anything_changes(site):
    root = lab_host(site, 'command = ["grub-mkconfig", "-o", "/boot/grub/grub.cfg"]', applets=())
    (root / "usr/bin/grub-mkconfig").unlink()
    before = tree_hash(site)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 2
    assert "cannot run" in r.stderr and "--files-only" in r.stderr and "nothing was changed" in r.stderr
    assert tree_hash(site) == before
    r, report = setup_json(site, "lab", "--yes", "--files-only")
    assert r.returncode == 0, r.stderr
    assert report["summary"]["pending"] == 1
    pending = [p for p in report["plan"] if p["action"] == "pending"]
    assert pending[0]["argv"] == ["grub-mkconfig", "-o", "/boot/grub/grub.cfg"]


def _managed_states(site, host, settings):
    """The file map of ``host`` before and after a clean apply (on a copy)."""
    import shutil
    copy = site.parent / "reference"
    shutil.copytree(site, copy, symlinks=True)
    before = file_map(copy / "hosts" / host)
    r = run_xenrun("setup", "--config", copy / "plugins.toml", "--host", host, "--yes")
    assert r.returncode == 0, r.stderr
    return before, file_map(copy / "hosts" / host)


def _killed_at_each_point(site, tmp_path, *args):
    """For point 1, 2, ...: a fresh copy of the site, the xenrun command ``args``
    killed with SIGKILL at that crash point; yields (point, site copy, lab's root)
    while the run is killed, and stops at the first point the run gets past."""
    import shutil
    point = 0
    while True:
        point += 1
        work = tmp_path / f"crash-{point}"
        shutil.copytree(site, work, symlinks=True)
        r = run_xenrun(*args, "--config", work / "plugins.toml", env={"XENRUN_CRASH_AT": str(point)})
        if r.returncode == 0:
            return
        assert r.returncode == -signal.SIGKILL, r.stderr
        yield point, work, work / "hosts" / "lab"
        shutil.rmtree(work)


def test_sigkill_at_every_point_leaves_old_or_new_and_the_next_run_converges(site, tmp_path):
    settings = 'files = 3\ncommand = ["true"]'
    lab_host(site, settings)
    old, new = _managed_states(site, "lab", settings)
    managed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    assert len(managed) >= 8  # 4 from the xen plugin, motd and 3 sample files
    point = 0
    for point, work, root in _killed_at_each_point(site, tmp_path, "setup", "--host", "lab", "--yes"):
        now = file_map(root)
        for path in managed:
            assert now.get(path) in (old.get(path), new.get(path)), f"{path} partial after kill at point {point}"
        leftovers = [p for p in now if p.endswith(".xenrun-tmp")]
        assert point or leftovers == []
        r = run_xenrun("setup", "--config", work / "plugins.toml", "--host", "lab", "--yes")
        assert r.returncode == 0, f"point {point}: {r.stderr}"
        assert file_map(root) == new, f"did not converge after a kill at point {point}"
        assert not [p for p in file_map(root) if p.endswith(".xenrun-tmp")]
        r, again = setup_json(work, "lab", "--dry")
        assert again["summary"]["changed"] == 0
    crash_points = point
    print(f"crash points exercised: {crash_points} for {len(managed)} managed files")
    assert crash_points >= len(managed) * 2


def _pending_commands(root) -> list:
    pending = root / STATE / "pending"
    return json.loads(pending.read_text())["commands"] if pending.exists() else []


def test_sigkill_at_every_point_of_a_files_only_run_keeps_the_commands_left_for_the_host(site, tmp_path):
    """The commands a --files-only run leaves for the host (the way back to Linux
    among them on a real host) are written before the run's commit record, as a
    change of the run: a kill at any point, the commit included, leaves them as
    they were before or as the run left them, and the next run converges on both."""
    import shutil
    lab_host(site, 'files = 2\ncommand = ["true"]')
    reference = site.parent / "reference"
    shutil.copytree(site, reference, symlinks=True)
    args = ("setup", "--host", "lab", "--yes", "--files-only")
    assert run_xenrun(*args, "--config", reference / "plugins.toml").returncode == 0
    new, pending = file_map(reference / "hosts/lab"), _pending_commands(reference / "hosts/lab")
    assert pending == [["true"]], pending
    point = 0
    for point, work, root in _killed_at_each_point(site, tmp_path, *args):
        assert _pending_commands(root) in ([], pending), f"pending partial after a kill at point {point}"
        r = run_xenrun(*args, "--config", work / "plugins.toml")
        assert r.returncode == 0, f"point {point}: {r.stderr}"
        assert file_map(root) == new, f"did not converge after a kill at point {point}"
        assert _pending_commands(root) == pending, f"commands left for the host lost after a kill at point {point}"
    assert point >= 10


def test_two_concurrent_applies_exactly_one_proceeds(site):
    root = lab_host(site, 'command = ["sleep", "3"]')
    cmd = [sys.executable, "-m", "xenrun", "setup", "--config", str(site / "plugins.toml"),
           "--host", "lab", "--yes"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = root / "var/lib/xenrun/lock"
    deadline = time.time() + 30
    while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "holds the lock" in second.stderr


def test_rollback_restores_the_last_runs_originals(site):
    root = site / "hosts" / "arch-grub"
    original = tree_hash(root, skip_state=True)
    assert setup_json(site, "arch-grub", "--yes")[0].returncode == 0
    applied = tree_hash(root, skip_state=True)
    r = run_xenrun("rollback", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 0 and "-none /proc/xen xenfs defaults,nofail 0 0" in r.stdout
    assert tree_hash(root, skip_state=True) == applied
    r = run_xenrun("rollback", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes")
    assert r.returncode == 0, r.stderr
    assert tree_hash(root, skip_state=True) == original
    r = run_xenrun("rollback", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes")
    assert "no run to roll back" in r.stdout


def test_rollback_refuses_to_overwrite_a_later_edit(site):
    root = site / "hosts" / "arch-grub"
    assert setup_json(site, "arch-grub", "--yes")[0].returncode == 0
    with open(root / "etc/fstab", "a") as f:
        f.write("# edited by hand after xenrun\n")
    before = tree_hash(root)
    r = run_xenrun("rollback", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes")
    assert r.returncode == 1 and "/etc/fstab was changed after run" in r.stderr
    assert tree_hash(root) == before


def test_a_command_left_for_the_host_stays_listed_until_it_runs(site):
    """--files-only leaves a command (guarded only by the file it follows) for the
    host; later runs list it again although that file no longer changes, and once
    it can run it runs, once."""
    root = lab_host(site, 'command = ["touch", "/etc/ran"]', applets=("true",))  # no touch: cannot run yet
    config = site / "plugins.toml"

    def setup(*extra):
        r = run_xenrun("setup", "--config", config, "--host", "lab", "--yes", "--format", "json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first = setup("--files-only")
    assert first["report"]["status"] == "applied" and first["summary"]["pending"] == 1
    pending = json.loads((root / "var/lib/xenrun/pending").read_text())
    assert pending == {"commands": [["touch", "/etc/ran"]], "runs": [first["report"]["run"]]}
    again = setup("--files-only")
    assert again["report"]["status"] == "nothing to do"
    assert (again["summary"]["changed"], again["summary"]["pending"]) == (0, 1)
    (item,) = [i for i in again["plan"] if i.get("argv") == ["touch", "/etc/ran"]]
    assert "earlier --files-only run" in item["reason"]
    add_busybox(root, "touch")  # the host has it now
    ran = setup()
    assert [i["result"] for i in ran["plan"] if i.get("argv")] == ["changed"] and (root / "etc/ran").exists()
    assert not (root / "var/lib/xenrun/pending").exists()
    last = setup()
    assert last["report"]["status"] == "nothing to do" and last["summary"]["pending"] == 0


def test_a_rollback_takes_back_the_commands_its_run_left_for_the_host(site):
    """The commands a --files-only run left follow the files it changed: once the
    rollback has put those files back, they are no longer pending; the next run
    leaves them again if it changes the files again."""
    root = lab_host(site, 'command = ["touch", "/etc/ran"]', applets=("true",))
    config = site / "plugins.toml"

    def xenrun(task, *extra):
        r = run_xenrun(task, "--config", config, "--host", "lab", "--yes", "--format", "json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first = xenrun("setup", "--files-only")
    assert first["summary"]["pending"] == 1 and (root / "var/lib/xenrun/pending").exists()
    back = xenrun("rollback")
    assert back["report"]["status"] == "applied"
    assert f"no longer left for the host (run {first['report']['run']} is rolled back): touch /etc/ran" \
        in back["report"]["notes"]
    assert not (root / "var/lib/xenrun/pending").exists()
    again = xenrun("setup", "--files-only", "--dry")
    (item,) = [i for i in again["plan"] if i.get("argv") == ["touch", "/etc/ran"]]
    assert item["action"] == "pending" and "earlier --files-only run" not in item["reason"]
