"""Targets: a --root folder is a closed world (paths resolve as chroot would), the
running machine is read without being changed, and the tasks run through invoke in
a site folder and through the installed xenrun command alike."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpers import REPO, run_xenrun, tree_hash
from xenrun.targets.local import LocalTarget


def test_dotdot_and_symlinks_never_leave_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/abs").symlink_to("/etc/passwd")
    (root / "etc/rel").symlink_to("../../../../../../etc/passwd")
    (root / "etc/dirlink").symlink_to("/")
    t = LocalTarget(root)
    for path in ("/../../../etc/passwd", "/etc/abs", "/etc/rel", "/etc/dirlink/etc/passwd", "/etc/../../etc/passwd"):
        assert t.real(path) == root.resolve() / "etc/passwd", path
    assert t.read("/etc/abs") is None  # root/etc/passwd does not exist; the host's is not read


def test_a_managed_file_that_is_an_absolute_symlink_is_refused(site):
    root = site / "hosts/arch-grub"
    host_fstab = Path("/etc/fstab").read_bytes()
    content = (root / "etc/fstab").read_bytes()
    (root / "etc/fstab").unlink()
    (root / "etc/real-fstab").write_bytes(content)
    (root / "etc/fstab").symlink_to("/etc/real-fstab")
    before = tree_hash(root)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes", "--files-only")
    # a managed file that is a link is never written through (issue 17): one line, nothing touched
    assert r.returncode == 2, r.stderr
    assert "/etc/fstab is a symbolic link (to /etc/real-fstab)" in r.stderr and "does not write through" in r.stderr
    assert tree_hash(root) == before and Path("/etc/fstab").read_bytes() == host_fstab


def test_write_atomic_keeps_mode_and_leaves_no_temp(tmp_path):
    t = LocalTarget(tmp_path)
    (tmp_path / "f").write_text("old")
    os.chmod(tmp_path / "f", 0o640)
    t.write_atomic("/f", b"new", 0o640)
    assert (tmp_path / "f").read_bytes() == b"new" and (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    with pytest.raises(RuntimeError):
        def refuse(tmp):
            raise RuntimeError("no")
        t.write_atomic("/f", b"newer", 0o640, before_rename=refuse)
    assert (tmp_path / "f").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_sparse_file_allocates_nothing(tmp_path):
    t = LocalTarget(tmp_path)
    t.make_sparse("/disk.img", 10 << 30, 0o600)
    st = (tmp_path / "disk.img").stat()
    assert st.st_size == 10 << 30 and st.st_blocks * 512 < 1 << 20


def test_facts_of_this_machine_read_only():
    before = hashlib.sha256(Path("/etc/fstab").read_bytes()).hexdigest()
    r = run_xenrun("facts", "--format", "json", "--host", "thismachine", "--config", REPO / "tests/samples/empty.toml")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)["facts"]
    assert facts["cpus"] == os.cpu_count()
    assert facts["live"] is True
    with open("/proc/net/route") as f:
        routes = [line.split() for line in f.read().splitlines()[1:]]
    default = [r[0] for r in routes if len(r) > 7 and r[1] == "00000000"]
    assert facts["uplink"] == (default[0] if default else None)
    assert {i["name"] for i in facts["interfaces"]} == set(os.listdir("/sys/class/net")) - {"lo"}
    assert facts["distro"]["id"] == "debian"
    assert hashlib.sha256(Path("/etc/fstab").read_bytes()).hexdigest() == before


def test_invoke_setup_in_a_site_folder(site):
    shutil.copy(REPO / "tasks.py", site / "tasks.py")
    invoke = Path(sys.executable).parent / "invoke"
    r = subprocess.run([str(invoke), "setup", "--host", "arch-syslinux", "--yes", "--files-only"], cwd=site,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^Applied: [1-9]\d* changed", r.stdout, re.M)
    r = subprocess.run([str(invoke), "setup", "--host", "arch-syslinux", "--dry", "--files-only", "--format", "json"],
                       cwd=site, capture_output=True, text=True)
    assert json.loads(r.stdout)["summary"]["changed"] == 0
    r = subprocess.run([str(invoke), "--list"], cwd=site, capture_output=True, text=True)
    assert all(t in r.stdout for t in ("setup", "facts", "plugins", "rollback"))


def test_installed_command_has_the_same_tasks():
    xenrun = Path(sys.executable).parent / "xenrun"
    r = subprocess.run([str(xenrun), "--help"], capture_output=True, text=True)  # lists the subcommands
    assert r.returncode == 0 and all(t in r.stdout for t in ("setup", "facts", "plugins", "rollback"))
    r = subprocess.run([str(xenrun), "setup", "--help"], capture_output=True, text=True)
    for flag in ("--root", "--host", "--config", "--dry", "--yes", "--files-only", "--format"):
        assert flag in r.stdout


def test_root_flag_without_a_site(tmp_path, site, monkeypatch):
    root = site / "hosts/arch-uefi"
    monkeypatch.chdir(tmp_path)  # no plugins.toml here: built-in defaults
    before = tree_hash(root)
    r = run_xenrun("setup", "--root", root, "--dry", "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["host"] == "arch-uefi" and out["summary"]["changed"] == 4  # no plugins.toml: xen plugin only
    assert tree_hash(root) == before


def _imports_of(path: Path) -> list[str]:
    """The xenrun modules a source file imports (at any depth: lazy imports too)."""
    import ast
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in names if n == "xenrun" or n.startswith("xenrun.")]


def test_the_targets_import_nothing_above_them():
    """The transport stands below the application: xenrun/targets/ may use the
    errors and itself, never the flows, the registry, plugins, apply or facts."""
    files = sorted((REPO / "xenrun" / "targets").rglob("*.py"))
    assert len(files) >= 7
    for path in files:
        for name in _imports_of(path):
            assert name.startswith(("xenrun.targets", "xenrun.errors")), f"{path.relative_to(REPO)} imports {name}"


def test_every_target_implements_the_contract():
    from xenrun.targets import Target
    from xenrun.targets.ssh import SSHTarget
    for cls in (LocalTarget, SSHTarget):
        assert issubclass(cls, Target) and not cls.__abstractmethods__, cls
