"""A disk backend the core does not know, from a package (tests/plugin_toydisk): it
declares its own disk keys, and domain.create, delete --purge and the errors of
domains.toml follow what it declares, with no line of the core naming it."""

import json
import shutil
import subprocess

import pytest

from support.helpers import REPO, run_xenrun, tree_hash

QC = '''
[domain.qc]
host = "arch-grub"
type = "pv"
memory = "256M"
bootloader = "pygrub"

[[domain.qc.disks]]
backend = "qcow2"
size = "2G"
cluster = "128K"
'''


@pytest.fixture
def qc_site(site, toy_disk_plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(toy_disk_plugin))
    (site / "domains.toml").write_text((site / "domains.toml").read_text() + QC)
    return site


def _xenrun(site, *args):
    return run_xenrun(*args, "--config", site / "plugins.toml", "--host", "arch-grub", "--files-only")


def test_the_core_never_names_the_toy_backend():
    core = [p for p in (REPO / "xenrun").rglob("*.py") if "qcow2" in p.read_text()]
    assert core == []


def test_a_toy_disk_backend_plans_its_disk_and_the_xl_entry(qc_site, tmp_path):
    r = _xenrun(qc_site, "domain.create", "qc", "--yes", "--format", "json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)["plan"]
    disk = next(c for c in plan if c["plugin"] == "qcow2")
    assert disk["argv"][:5] == ["qemu-img", "create", "-q", "-f", "qcow2"]
    assert "cluster_size=131072" in disk["argv"] and disk["argv"][-1] == str(2 << 30)
    config = (qc_site / "hosts/arch-grub/etc/xen/qc.cfg").read_text()
    assert 'disk = [ "format=qcow2,vdev=xvda,access=rw,target=/var/lib/xen/images/qc-xvda.qcow2" ]' in config

    # the planned command is a real one: qemu-img makes the image it describes
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img (qemu-utils) is missing: .ci/run installs it")
    image = tmp_path / "qc.qcow2"
    argv = [str(image) if a == "/var/lib/xen/images/qc-xvda.qcow2" else a for a in disk["argv"]]
    subprocess.run(argv, check=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True,
                                     capture_output=True, text=True).stdout)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", 2 << 30, 131072)

    r = _xenrun(qc_site, "domain.create", "qc", "--yes")
    assert r.returncode == 0 and "Nothing to do" in r.stdout, r.stdout + r.stderr


def test_delete_purge_removes_the_disk_the_plugins_way(qc_site):
    assert _xenrun(qc_site, "domain.create", "qc", "--yes").returncode == 0
    r = _xenrun(qc_site, "domain.delete", "qc", "--purge", "--dry", "--format", "json")
    assert r.returncode == 0, r.stderr
    argvs = [c["argv"] for c in json.loads(r.stdout)["plan"] if c["kind"] == "RunCommand"]
    assert ["rm", "-f", "--", "/var/lib/xen/images/qc-xvda.qcow2"] in argvs


@pytest.mark.parametrize("edit,key,line,words", [
    (('cluster = "128K"', 'cluster = "100K"'), "cluster", 11, "a qcow2 cluster is a power of two"),
    (('cluster = "128K"', 'cluster = "128K"\nvg = "vg0"'), "vg", 12,
     "not a key of a 'qcow2' disk (its keys: backend, vdev, access, size, path, cluster)"),
    (('size = "2G"\n', ""), "", 8, "size is missing: a qcow2 disk needs size"),
])
def test_the_toy_backends_keys_are_checked_with_file_line_key(qc_site, edit, key, line, words):
    domains = qc_site / "domains.toml"
    text = domains.read_text()
    domains.write_text(text.replace(*edit))
    before = tree_hash(qc_site)
    r = _xenrun(qc_site, "domain.create", "qc", "--yes")
    assert r.returncode == 2, r.stdout + r.stderr
    where = f"domain.qc.disks[0].{key}" if key else "domain.qc.disks[0]"
    first = text.count("\n", 0, text.index("[domain.qc]"))  # lines before [domain.qc], line 2 of QC
    assert r.stderr.startswith(f"xenrun: {domains}:{first + line - 1}: {where}: "), r.stderr
    assert words in r.stderr, r.stderr
    assert tree_hash(qc_site) == before


def test_the_plugin_listing_shows_the_toys_disk_keys(qc_site):
    r = run_xenrun("plugins", "--config", qc_site / "plugins.toml")
    assert r.returncode == 0, r.stderr
    assert '[[domain.NAME.disks]] backend = "qcow2": size (required): the virtual size' in r.stdout
