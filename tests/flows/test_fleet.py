"""Fleets: `xenrun setup --all` / `--host a,b,@group` against a real sshd on
127.0.0.1 (tests/support/sshd.py). Every host of plugins.toml logs in to that one server
and has its own machine root there (``root`` = a folder on the SSH host), a copy of
one of the example machines, with its own plugin selection and settings.

Broken on purpose: one host points at a port nobody listens on (unreachable), one
host's sample plugin validates /etc/motd with `false` (its apply fails and is
rolled back), one asks for more dom0 memory than its facts say it has (invalid)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xenrun import fleet

from support.helpers import EXAMPLES, HOSTS, add_busybox, file_map, run_xenrun, tree_hash
from support.sshd import available, free_port

pytestmark = pytest.mark.skipif(available() is not None, reason=available() or "")

N = 32
UNREACHABLE, FAILING, BAD_FACTS = "xen30", "xen31", "xen32"


@pytest.fixture(autouse=True)
def _sample_plugin_on_path(sample_plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(sample_plugin))


def make_fleet(folder: Path, sshd, n: int = N, broken: bool = True) -> Path:
    """A site with ``n`` hosts xen01.. over SSH; returns plugins.toml. Host i is a
    copy of example machine HOSTS[i % 4] (so it selects grub, efistub or syslinux),
    every third host also selects the sample plugin, dom0_mem differs per host."""
    (folder / "hosts").mkdir(parents=True)
    lines = ['[groups]\nfirst = ["xen01", "xen02", "xen03"]\n',
             '[plugin.xen]\ndom0_mem = "512M"\n']
    for i in range(1, n + 1):
        name, kind = f"xen{i:02d}", HOSTS[i % len(HOSTS)]
        root = folder / "hosts" / name
        shutil.copytree(EXAMPLES / "hosts" / kind, root, symlinks=True)
        boot = {"arch-uefi": "efistub", "arch-syslinux": "syslinux"}.get(kind, "grub")
        network = "ifupdown" if kind == "debian-grub" else "netctl"  # each machine's own stack
        address = sshd.address if not (broken and name == UNREACHABLE) else f"root@127.0.0.1:{free_port()}"
        plugins = '["sample"]' if i % 3 == 0 or (broken and name == FAILING) else "[]"
        lines.append(f'[hosts.{name}]\naddress = "{address}"\nroot = "{root}"\nidentity = "{sshd.key}"\n'
                     f'boot = "{boot}"\nnetwork = "{network}"\nplugins = {plugins}\n')
        dom0_mem = "900G" if broken and name == BAD_FACTS else f"{256 + i}M"
        lines.append(f'[hosts.{name}.plugin.xen]\ndom0_mem = "{dom0_mem}"\n')
        if boot == "efistub":
            lines.append(f'[hosts.{name}.plugin.efistub]\ndisk = "/dev/nvme0n1"\npartition = 1\n')
        if plugins != "[]":
            lines.append(f'[hosts.{name}.plugin.sample]\nmotd = "hello-{name}"\n'
                         + ('validate = ["false", "{}"]\n' if broken and name == FAILING else ""))
    config = folder / "plugins.toml"
    config.write_text("\n".join(lines))
    return config


def setup(config: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    return run_xenrun("setup", "--config", config, *args, timeout=timeout)


def hosts_of(r) -> dict:
    return {h["host"]: h for h in json.loads(r.stdout)["hosts"]}


def test_32_hosts_converge_around_broken_ones_and_a_rerun_changes_nothing(tmp_path, sshd):
    config = make_fleet(tmp_path / "site", sshd)
    roots = {f"xen{i:02d}": tmp_path / "site" / "hosts" / f"xen{i:02d}" for i in range(1, N + 1)}
    before = {name: tree_hash(root) for name, root in roots.items()}

    r = setup(config, "--all", "--yes", "--files-only", "--parallel", "8", "--format", "json")
    assert r.returncode == 1, r.stderr  # some hosts failed
    hosts = hosts_of(r)
    assert list(hosts) == list(roots)  # plugins.toml order, every host once
    assert hosts[UNREACHABLE]["report"]["status"] == "unreachable"
    assert "cannot reach" in hosts[UNREACHABLE]["report"]["error"]
    assert hosts[FAILING]["report"]["status"] == "failed"
    assert "put back" in hosts[FAILING]["report"]["error"]
    assert hosts[BAD_FACTS]["report"]["status"] == "invalid"
    assert "dom0_mem" in hosts[BAD_FACTS]["report"]["error"]
    good = [n for n in roots if n not in (UNREACHABLE, FAILING, BAD_FACTS)]
    for name in good:
        assert hosts[name]["report"]["status"] == "applied", (name, hosts[name]["report"])
        assert hosts[name]["summary"]["changed"] > 0
        assert hosts[name]["target"].startswith("ssh root@127.0.0.1")
    summary = json.loads(r.stdout)["summary"]
    assert summary["hosts"] == N and summary["ok"] == N - 3
    assert summary["statuses"] == {"applied": N - 3, "unreachable": 1, "failed": 1, "invalid": 1}
    # progress as hosts finish, on stderr, counted across the worker processes
    # (32 hosts on this 2-CPU machine: two processes, 4 threads each)
    assert sum(line.startswith("[") and f"/{N}] xen" in line for line in r.stderr.splitlines()) == N
    assert [f"[{i}/{N}]" for i in range(1, N + 1)] == [line.split()[0] for line in r.stderr.splitlines()
                                                       if line.startswith("[")]
    workers = min(os.cpu_count() or 1, N // fleet.HOSTS_PER_PROCESS)
    assert re.search(rf'"processes": {workers}\b|processes={workers}\b', r.stderr), r.stderr[:2000]

    # the broken hosts are exactly as they were (the failed one rolled back)
    for name in (UNREACHABLE, FAILING, BAD_FACTS):
        assert tree_hash(roots[name], skip_state=True) == before[name], name
    # each converged host got its own settings and selection
    for name in good:
        files = file_map(roots[name])
        assert b"none /proc/xen xenfs" in files["etc/fstab"]
        i = int(name[3:])
        if HOSTS[i % 4] == "arch-grub":
            assert f"dom0_mem={256 + i}M".encode() in files["etc/xen/grub.conf"], name
        assert (files.get("etc/motd") == f"hello-{name}\n".encode()) == (i % 3 == 0), name
    after_first = {name: file_map(roots[name]) for name in good}

    # one process (threads only) gives the same result: nothing to do
    r2 = run_xenrun("setup", "--config", config, "--all", "--yes", "--files-only", "--parallel", "8",
                    env={"XENRUN_FLEET_PROCESSES": "1"}, timeout=300)
    assert r2.returncode == 1, r2.stderr
    table = {line.split()[0]: line.split() for line in r2.stdout.splitlines() if line.startswith("xen")
             and not line.startswith(tuple(f"{n}:" for n in roots))}
    assert set(table) == set(roots)
    for name in good:  # host changed unchanged pending status... seconds
        assert table[name][1] == "0" and " ".join(table[name][4:-1]) == "nothing to do", table[name]
        assert file_map(roots[name]) == after_first[name]
    assert table[UNREACHABLE][4] == "unreachable" and table[FAILING][4] == "failed"
    assert table[BAD_FACTS][4] == "invalid"
    assert f"{N} host(s): 1 failed, 1 invalid, {N - 3} nothing to do, 1 unreachable; 0 changed" in r2.stdout
    assert f"{FAILING}: failed: " in r2.stdout and f"{UNREACHABLE}: unreachable: cannot reach" in r2.stdout


def test_dry_across_the_fleet_shows_every_plan_and_touches_nothing(tmp_path, sshd):
    config = make_fleet(tmp_path / "site", sshd, n=6, broken=False)
    before = tree_hash(tmp_path / "site")
    r = setup(config, "--all", "--dry", "--files-only", "--format", "json")
    assert r.returncode == 0, r.stderr
    hosts = hosts_of(r)
    assert [h["report"]["status"] for h in hosts.values()] == ["planned"] * 6
    assert all(h["summary"]["changed"] > 0 and h["plan"] for h in hosts.values())
    assert all(h["round_trips"]["connect"] == 1 for h in hosts.values())
    text = setup(config, "--host", "xen01,@first,xen05", "--dry", "--files-only")
    assert text.returncode == 0, text.stderr
    shown = [line.split()[1] for line in text.stdout.splitlines() if line.startswith("host xen")]
    assert shown == ["xen01", "xen02", "xen03", "xen05"]  # each once, in the order given
    assert "~ EnsureLine /etc/fstab" in text.stdout
    assert tree_hash(tmp_path / "site") == before
    # without a terminal and without --yes: the plan only
    r = setup(config, "--host", "@first", "--files-only")
    assert r.returncode == 0 and "no terminal to ask on" in r.stderr
    assert tree_hash(tmp_path / "site") == before


def test_commands_run_per_host_and_a_failing_command_rolls_back_only_that_host(tmp_path, sshd):
    """No --files-only: the sample plugin's command runs inside each root (busybox
    and chroot); on one host the command fails, its files are put back."""
    site = tmp_path / "site"
    (site / "hosts").mkdir(parents=True)
    text = '[defaults]\nboot = "none"\nnetwork = "none"\nplugins = ["sample"]\n'
    for i in range(1, 7):
        name = f"lab{i}"
        root = site / "hosts" / name
        shutil.copytree(EXAMPLES / "hosts" / "arch-grub", root, symlinks=True)
        add_busybox(root, "touch", "false")
        command = '["false"]' if i == 4 else f'["touch", "/ran-{name}"]'
        text += (f'\n[hosts.{name}]\naddress = "{sshd.address}"\nroot = "{root}"\nidentity = "{sshd.key}"\n'
                 f'\n[hosts.{name}.plugin.sample]\ncommand = {command}\nfiles = {i}\n')
    (site / "plugins.toml").write_text(text)
    before = tree_hash(site / "hosts" / "lab4", skip_state=True)
    r = setup(site / "plugins.toml", "--all", "--yes", "--parallel", "3")
    assert r.returncode == 1, r.stderr
    for i in (1, 2, 3, 5, 6):
        root = site / "hosts" / f"lab{i}"
        assert (root / f"ran-lab{i}").exists()
        assert len(list((root / "etc/xenrun-sample").iterdir())) == i  # its own settings
    assert tree_hash(site / "hosts" / "lab4", skip_state=True) == before
    assert "lab4: failed: " in r.stdout
    r2 = setup(site / "plugins.toml", "--host", "lab1,lab2,lab3,lab5,lab6", "--yes")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "5 host(s): 5 nothing to do; 0 changed" in r2.stdout


def test_a_bad_configuration_stops_the_fleet_before_any_host_runs(tmp_path, sshd):
    config = make_fleet(tmp_path / "site", sshd, n=4, broken=False)
    before = tree_hash(tmp_path / "site")
    text = config.read_text()
    config.write_text(text.replace('[hosts.xen03]\n', '[hosts.xen03]\ndisks = ["nosuch"]\n', 1))
    r = setup(config, "--all", "--yes", "--files-only")
    assert r.returncode == 2 and "nosuch" in r.stderr and "[1/" not in r.stderr, r.stderr
    config.write_text(text)
    for args, message in ((["--host", "xen01,nope"], "no host 'nope'"), (["--host", "@nope"], "no group 'nope'"),
                          (["--all", "--host", "xen01"], "not both"), (["--all", "--parallel", "0"], "--parallel"),
                          (["--all", "--root", str(tmp_path)], "--root")):
        r = setup(config, *args, "--yes", "--files-only")
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert tree_hash(tmp_path / "site") == before


@pytest.mark.parametrize("groups, message", [
    ('web = "xen01"', "groups.web: must be a list of host names, got a string"),
    ("web = []", "groups.web: is empty"),
    ('web = ["xen09"]', "groups.web: no host 'xen09' in [hosts]"),
    ('web = ["xen01", "xen01"]', "groups.web: names a host twice"),
    ('web = ["bad name"]', "groups.web:"),
])
def test_groups_are_checked_with_file_line_and_key(tmp_path, groups, message):
    from xenrun.config import load_site
    from xenrun.errors import ConfigError
    (tmp_path / "r").mkdir()
    config = tmp_path / "plugins.toml"
    config.write_text(f'[hosts.xen01]\nroot = "r"\n\n[groups]\n{groups}\n')
    with pytest.raises(ConfigError) as e:
        load_site(config)
    assert str(e.value).startswith(f"{config}:5: ") and message in str(e.value), str(e.value)
    config.write_text('[hosts.xen01]\nroot = "r"\n\n[groups]\nweb = ["xen01"]\n')
    assert load_site(config).groups == {"web": ["xen01"]}


def test_asking_once_applies_exactly_the_plans_that_were_shown(site):
    """A terminal and no --yes: every host is planned, the question asked once,
    and a host whose plan changed after it was shown is not applied."""
    from xenrun import fleet, run
    options = run.Options(config=str(site / "plugins.toml"), files_only=True)
    names = list(HOSTS)
    before = tree_hash(site)
    refused = fleet.setup(options, names, parallel=2, ask=lambda planned: False)
    assert [r.status for r in refused.hosts] == ["not applied"] * 4 and tree_hash(site) == before

    asked = []

    def ask(planned):
        asked.append([r.status for r in planned.hosts])
        fstab = site / "hosts" / "arch-uefi" / "etc" / "fstab"  # edited while the user reads the plans
        fstab.write_text(fstab.read_text() + "# edited\n")
        return True
    done = fleet.setup(options, names, parallel=2, ask=ask)
    assert asked == [["planned"] * 4]
    status = {r.host: r for r in done.hosts}
    assert status["arch-uefi"].status == "not applied"
    assert "the plan changed after it was shown" in " ".join(status["arch-uefi"].result.notes)
    assert all(status[n].status == "applied" for n in names if n != "arch-uefi")
    assert done.ok


def test_rollback_promote_and_facts_take_many_hosts_each_isolated(tmp_path, sshd):
    """rollback, promote and facts accept --host a,b,@group and --all like setup: a
    table at the end, and one failing host leaves the others done."""
    config = make_fleet(tmp_path / "site", sshd, n=4)
    roots = {f"xen{i:02d}": tmp_path / "site" / "hosts" / f"xen{i:02d}" for i in range(1, 5)}
    before = {name: tree_hash(root, skip_state=True) for name, root in roots.items()}
    r = setup(config, "--all", "--yes", "--files-only", "--format", "json")
    assert r.returncode == 0, r.stderr

    r = run_xenrun("facts", "--config", config, "--host", "@first,xen04", "--format", "json", timeout=300)
    assert r.returncode == 0, r.stderr
    hosts = hosts_of(r)
    assert sorted(hosts) == ["xen01", "xen02", "xen03", "xen04"]
    assert all(h["report"]["status"] == "read" and h["facts"]["cpus"] > 0 for h in hosts.values())

    # promote refuses hosts that do not run Xen, each on its own, with the reason
    r = run_xenrun("promote", "--config", config, "--host", "xen01,xen02", "--yes", timeout=300)
    assert r.returncode == 1
    assert re.search(r"^xen01\s.*invalid", r.stdout, re.M) and "not running as Xen's Domain-0" in r.stdout

    # one host's state made unreadable: its rollback fails, the others are rolled back
    (roots["xen02"] / "var/lib/xenrun/runs").rename(roots["xen02"] / "var/lib/xenrun/runs-away")
    r = run_xenrun("rollback", "--config", config, "--all", "--yes", "--format", "json", timeout=300)
    hosts = hosts_of(r)
    assert {n: h["report"]["status"] for n, h in hosts.items()} == {
        "xen01": "applied", "xen02": "nothing to do", "xen03": "applied", "xen04": "applied"}, r.stdout
    assert "no run to roll back" in hosts["xen02"]["notes"]
    for name in ("xen01", "xen03", "xen04"):
        assert tree_hash(roots[name], skip_state=True) == before[name], name
    r = run_xenrun("rollback", "--config", config, "--host", "xen01,xen03", "--dry", timeout=300)
    assert r.returncode == 0 and re.search(r"^xen01\s+0\s", r.stdout, re.M), r.stdout
