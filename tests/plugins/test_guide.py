"""The author's guide (docs/plugins.md) is itself a test: its example plugin is taken
from the page, installed with pip as a package with an entry point, selected from
plugins.toml and run through setup, a re-run (nothing to do) and rollback; its facts
list is the one the code gives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpers import REPO, tree_hash

GUIDE = REPO / "docs" / "plugins.md"
XENRUN = Path(sys.executable).parent / "xenrun"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), re.S)


def test_readme_links_the_guide():
    assert "docs/plugins.md" in (REPO / "README.md").read_text()


def test_facts_list_matches_the_code():
    text = GUIDE.read_text()
    listed = text.split("<!-- facts:begin -->\n", 1)[1].split("<!-- facts:end -->", 1)[0]
    r = subprocess.run([sys.executable, str(REPO / "docs" / "facts_list.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert listed.strip() == r.stdout.strip(), "docs/plugins.md: regenerate with python docs/facts_list.py"


def test_guide_covers_what_it_promises():
    text = GUIDE.read_text()
    for needle in ("probe.text", "probe.command", "note(", "warn(", "PlanError", "xenrun.testing",
                   "[project.entry-points.xenrun]", "xenrun.api", "--debug"):
        assert needle in text, needle
    import xenrun.api
    for name in ("hookimpl", "WriteFile", "EnsureLine", "RunCommand", "Setting", "checks", "PlanError", "note", "warn"):
        assert name in xenrun.api.__all__, name


@pytest.fixture(scope="module")
def motd_plugin(tmp_path_factory) -> Path:
    """The guide's plugin, as the page gives it, installed with pip into a folder."""
    code = next(b for b in _blocks("python") if b.startswith("# xenrun_motd/__init__.py"))
    project = next(b for b in _blocks("toml") if "[project.entry-points.xenrun]" in b)
    pkg = tmp_path_factory.mktemp("motd-src")
    (pkg / "xenrun_motd").mkdir()
    (pkg / "xenrun_motd" / "__init__.py").write_text(code)
    # xenrun itself is installed already: the dependency is not fetched
    (pkg / "pyproject.toml").write_text(project)
    target = tmp_path_factory.mktemp("motd-installed")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(pkg)], check=True, capture_output=True)
    assert list(target.glob("xenrun_motd*.dist-info/entry_points.txt"))
    return target


def _xenrun(*args, plugin: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([str(XENRUN), *map(str, args)], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)


def test_the_guides_plugin_sets_up_reruns_and_rolls_back(site, motd_plugin):
    config = site / "plugins.toml"
    text = config.read_text().replace("[defaults]\n", '[defaults]\nplugins = ["motd"]\n', 1)
    config.write_text(text + '\n[plugin.motd]\ngreeting = "hello"\n')
    root = site / "hosts" / "arch-grub"
    (root / "etc" / "issue").unlink(missing_ok=True)  # so that the plugin's note is given
    before = tree_hash(root, skip_state=True)

    listed = _xenrun("plugins", "--config", config, "--host", "arch-grub", plugin=motd_plugin)
    assert "* motd" in listed.stdout and "[plugin.motd] greeting" in listed.stdout, listed.stderr

    planned = _xenrun("setup", "--config", config, "--host", "arch-grub", "--dry", "--format", "json",
                      plugin=motd_plugin)
    assert planned.returncode == 0, planned.stderr
    assert "motd: /etc/issue did not exist; it is created" in json.loads(planned.stdout)["notes"]
    assert tree_hash(root, skip_state=True) == before

    first = _xenrun("setup", "--config", config, "--host", "arch-grub", "--yes", "--files-only", plugin=motd_plugin)
    assert first.returncode == 0, first.stderr
    assert "/etc/motd" in first.stdout and "greet the administrator" in first.stdout
    assert (root / "etc" / "motd").read_text() == "hello to arch-grub, a Xen dom0\n"
    assert "Xen dom0 arch-grub" in (root / "etc" / "issue").read_text().splitlines()

    again = _xenrun("setup", "--config", config, "--host", "arch-grub", "--yes", "--files-only", plugin=motd_plugin)
    assert again.returncode == 0, again.stderr
    assert "Nothing to do" in again.stdout

    back = _xenrun("rollback", "--config", config, "--host", "arch-grub", "--yes", plugin=motd_plugin)
    assert back.returncode == 0, back.stderr
    assert tree_hash(root, skip_state=True) == before
