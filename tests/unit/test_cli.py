"""The xenrun command line owns its options (issue 12.1): the installed console
script is run as a real process. Options before the subcommand mean what they mean
after it or are refused (one line, exit 2, nothing touched); help works after any
subcommand; a closed pipe ends quietly; `invoke setup` in a site folder still works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpers import REPO, tree_hash

XENRUN = Path(sys.executable).parent / "xenrun"
INVOKE = Path(sys.executable).parent / "invoke"
INVOKE_ONLY = ("--echo", "--pty", "--warn-only", "--hide", "--prompt-for-sudo-password", "--write-pyc",
               "--command-timeout", "--list-depth", "--list-format", "--print-completion-script", "--complete",
               "--collection", "--search-root", "--no-dedupe", "-f", "-R")


def xenrun(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(XENRUN), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def _untimed(text: str) -> str:
    # a fleet prints hosts as they end: compare the lines, not their order
    return sorted(re.sub(r"\d+\.\d+( s\b)?", "N", text).splitlines())


def test_console_script_is_installed():
    assert XENRUN.exists(), XENRUN


def test_dry_before_subcommand_changes_nothing(site):
    before = tree_hash(site)
    r = xenrun("--dry", "setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes")
    assert r.returncode == 0, r.stderr
    assert "Plan:" in r.stdout and "Traceback" not in r.stderr
    assert tree_hash(site) == before


# Every option a subcommand takes, placed before it: the same output as after it
# (and the tree as it was), or one line and exit 2.
@pytest.mark.parametrize("option", [
    ["--dry"], ["--yes", "--dry"], ["--files-only", "--dry"], ["--format", "json", "--dry"], ["--format=json", "--dry"],
    ["--config", "CONFIG"], ["--config=CONFIG"], ["--host", "arch-grub"], ["--root", "ROOT"],
    ["--parallel", "3", "--dry"], ["--all", "--dry"],
])
def test_each_option_before_setup_means_the_same(site, option):
    option = [str(site / "plugins.toml") if o == "CONFIG" else o for o in option]
    option = [str(site / "hosts" / "arch-grub") if o == "ROOT" else o for o in option]
    option = [o.replace("CONFIG", str(site / "plugins.toml")) for o in option]
    base = ["--config", str(site / "plugins.toml"), "--host", "arch-grub", "--dry"]
    if "--root" in option:
        base = ["--config", str(site / "plugins.toml"), "--dry"]
    if "--all" in option:
        base = ["--config", str(site / "plugins.toml")]
    base = [b for i, b in enumerate(base) if b not in option and (i == 0 or base[i - 1] not in option)]
    before = tree_hash(site)
    after_form = xenrun("setup", *option, *base)
    assert tree_hash(site) == before
    before_form = xenrun(*option, "setup", *base)
    assert tree_hash(site) == before
    assert (before_form.returncode, _untimed(before_form.stdout)) == \
        (after_form.returncode, _untimed(after_form.stdout)), before_form.stderr
    assert "Traceback" not in before_form.stderr


@pytest.mark.parametrize("args, says", [
    (["--yes", "facts"], "--yes is not an option of facts"),
    (["--dry", "plugins"], "--dry is not an option of plugins"),
    (["--bogus", "setup"], "--bogus: no such option"),
    (["--echo", "setup"], "--echo: no such option"),
    (["--pty", "setup"], "--pty: no such option"),
    (["-R", "setup"], "-R: no such option"),
    (["--host", "a", "setup", "--host", "b"], "--host given twice"),
    (["--dry"], "--dry needs a subcommand"),
    (["nosuchcommand"], "no subcommand 'nosuchcommand'"),
    (["setup", "--bogus"], "No idea what '--bogus' is"),
    (["domain.create"], "did not receive required positional arguments"),
])
def test_refused_with_one_line_and_exit_2(site, args, says):
    before = tree_hash(site)
    r = xenrun(*args, cwd=site)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert says in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert tree_hash(site) == before


def test_config_before_subcommand_is_xenruns(site):
    r = xenrun("--config", site / "plugins.toml", "facts", "--host", "arch-grub", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert '"host": "arch-grub"' in r.stdout


def test_help_shows_only_xenruns_options():
    r = xenrun("--help")
    assert r.returncode == 0
    words = set(r.stdout.replace(",", " ").split())
    for option in INVOKE_ONLY:
        assert option not in words, option
    for option in ("--debug", "--help", "--version", "setup", "domain.create"):
        assert option in r.stdout


@pytest.mark.parametrize("args", [["domain.create", "--help"], ["domain.create", "-h"], ["setup", "--help"],
                                  ["--help", "domain.create"], ["domain.lint", "--help"],
                                  ["setup", "--host", "x", "--help"], ["boot-check", "--help"]])
def test_help_after_any_subcommand(args):
    r = xenrun(*args)
    task = next(a for a in args if not a.startswith("-") and a != "x")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: xenrun {task} ")
    assert "Options:" in r.stdout and "--host" in r.stdout or task == "domain.lint"


def test_every_subcommand_has_help():
    from xenrun.tasks import ns
    for ctx in ns.to_contexts():
        r = xenrun(ctx.name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"Usage: xenrun {ctx.name} "), (ctx.name, r.stderr)


def test_closed_pipe_ends_quietly():
    r = subprocess.run(f"'{XENRUN}' plugins | head -1; echo \"status ${{PIPESTATUS[0]}}\"", shell=True,
                       executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.stderr == ""
    assert r.stdout.splitlines()[-1] in ("status 0", "status 141")


def test_debug_sets_xenrun_debug(tmp_path):
    # --debug reaches the flows as XENRUN_DEBUG=1 (read by the plugin-fault report)
    probe = tmp_path / "probe.py"
    probe.write_text("import os, sys\nfrom xenrun import cli\n"
                     "try:\n    cli.program.run(sys.argv, exit=False)\nfinally:\n"
                     "    print('DEBUG=' + os.environ.get('XENRUN_DEBUG', ''))\n")
    env = {k: v for k, v in os.environ.items() if k != "XENRUN_DEBUG"}
    for args, want in ((["--debug", "plugins"], "1"), (["plugins", "--debug"], "1"), (["plugins"], "")):
        r = subprocess.run([sys.executable, str(probe), *args], capture_output=True, text=True, env=env,
                           timeout=120, cwd=tmp_path)
        assert r.stdout.strip().splitlines()[-1] == f"DEBUG={want}", (args, r.stderr)


def test_version():
    r = xenrun("--version")
    assert r.returncode == 0 and r.stdout.startswith("xenrun ")


def test_invoke_setup_in_a_site_folder_still_works(site):
    shutil.copy(REPO / "tasks.py", site / "tasks.py")
    (site / "tasks.py").write_text("from xenrun.tasks import ns\n")
    before = tree_hash(site)
    r = subprocess.run([str(INVOKE), "setup", "--host", "arch-grub", "--dry"], cwd=site, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Plan:" in r.stdout
    assert tree_hash(site) == before
    r = subprocess.run([str(INVOKE), "setup", "--host", "arch-grub", "--yes", "--files-only"], cwd=site,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert tree_hash(site) != before


def test_plugins_lists_each_plugins_settings(site, sample_plugin):
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(sample_plugin), os.environ.get("PYTHONPATH")]))}
    r = xenrun("plugins", "--config", site / "plugins.toml", "--host", "arch-grub", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert '    [plugin.netctl] address: the bridge\'s address with prefix (ip = "static")' in lines
    assert '        e.g. address = "192.168.1.10/24"' in lines
    assert any(line.startswith('    [plugin.netctl] bridge (default "xenbr0"): ') for line in lines)
    assert '    [plugin.sample] motd (default "xen-host"): a word written to /etc/motd' in lines
    r = xenrun("plugins", "--config", site / "plugins.toml", "--host", "arch-grub", "--format", "json", env=env)
    rows = {row["name"]: row for row in __import__("json").loads(r.stdout)}
    from xenrun.plugins import netctl
    declared = netctl.declare_settings()["netctl"]
    assert set(rows["netctl"]["settings"]["netctl"]) == set(declared)
    assert rows["netctl"]["settings"]["netctl"]["address"]["examples"] == list(declared["address"].examples)
    assert rows["sample"]["settings"]["sample"]["files"] == {"default": 1, "examples": [], "required": False,
                                                            "help": "how many /etc/xenrun-sample/N files to write"}
    assert rows["image"]["disk_keys"]["image"]["size"]["required"] is True
    assert rows["facts"]["settings"] == {}


def test_invokes_own_dry_in_a_site_folder_changes_nothing(site):
    (site / "tasks.py").write_text("from xenrun.tasks import ns\n")
    before = tree_hash(site)
    r = subprocess.run([str(INVOKE), "--dry", "setup", "--host", "arch-grub", "--yes", "--files-only"], cwd=site,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Plan:" in r.stdout
    assert tree_hash(site) == before


def test_invokes_own_dry_before_a_domain_task_changes_nothing(site):
    (site / "tasks.py").write_text("from xenrun.tasks import ns\n")
    before = tree_hash(site)
    r = subprocess.run([str(INVOKE), "--dry", "domain.create", "arch-pv", "--host", "arch-grub", "--yes",
                        "--files-only"], cwd=site, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Plan:" in r.stdout and tree_hash(site) == before
