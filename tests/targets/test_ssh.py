"""SSH targets against a real sshd on 127.0.0.1 (tests/support/sshd.py), logging in as root
to this very machine: the example hosts' machine roots are reached through an
SSHTarget with a root prefix, so every result can be compared with a local run.

plugins.toml has no key for a root prefix on an SSH host, so the xenrun processes
here run through WRAPPER, which gives every SSHTarget the root and the test's key
(and prints its round-trip counts when it exits)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.helpers import HOSTS, file_map, lab_host, run_xenrun, tree_hash
from support.sshd import available, free_port

pytestmark = pytest.mark.skipif(available() is not None, reason=available() or "")

WRAPPER = """
import atexit, json, os, sys
import xenrun.targets.ssh as ssh
made = []
class TestTarget(ssh.SSHTarget):  # counts round trips; address, root, key come from plugins.toml
    def __init__(self, address, **kw):
        super().__init__(address, **kw)
        made.append(self)
ssh.SSHTarget = TestTarget
atexit.register(lambda: [print("ssh-stats " + json.dumps(dict(t.stats)), file=sys.stderr) for t in made])
sys.argv = ["xenrun", *sys.argv[1:]]
from xenrun.cli import main
main()
"""


@pytest.fixture(autouse=True)
def _sample_plugin_on_path(sample_plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(sample_plugin))


def over_ssh(site: Path, host: str, sshd, address: str | None = None, timeout: float | None = None) -> Path:
    """Point ``host`` of the site at the sshd, as a user would in plugins.toml:
    address, identity, and root = the machine root's folder on that host (the
    host being this machine), and its ``timeout`` if given; returns that root."""
    text = (site / "plugins.toml").read_text()
    pattern = rf'^(\[hosts\.{re.escape(host)}\][^\n]*\n)root = "hosts/{re.escape(host)}"\n'
    replacement = (rf'\1address = "{address or sshd.address}"\nroot = "{site / "hosts" / host}"\n'
                   rf'identity = "{sshd.key}"\n' + (f"timeout = {timeout}\n" if timeout else ""))
    text, n = re.subn(pattern, replacement, text, flags=re.M)
    assert n == 1, f"no [hosts.{host}] with root in plugins.toml"
    (site / "plugins.toml").write_text(text)
    return site / "hosts" / host


def xenrun_ssh(root: Path, sshd, *args, env=None, timeout=120, popen=False):
    """The xenrun command as a process, printing its SSH round trips on stderr
    (``root`` and ``sshd`` name what plugins.toml points at)."""
    full_env = {**os.environ, **(env or {})}
    if "XENRUN_CRASH_AT" not in (env or {}):
        full_env.pop("XENRUN_CRASH_AT", None)
    cmd = [sys.executable, "-c", WRAPPER, *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def stats(r) -> dict:
    lines = [line for line in r.stderr.splitlines() if line.startswith("ssh-stats ")]
    return json.loads(lines[-1].split(" ", 1)[1]) if lines else {}


def setup_ssh(site, host, root, sshd, *extra, env=None):
    r = xenrun_ssh(root, sshd, "setup", "--config", site / "plugins.toml", "--host", host, "--format", "json",
                   *extra, env=env)
    return r, (json.loads(r.stdout) if r.stdout.strip() else None)


def local_reference(site: Path, host: str, *extra) -> dict:
    """The file map of ``host`` after a local apply, on a copy of the site."""
    copy = site.parent / f"reference-{host}"
    shutil.copytree(site, copy, symlinks=True)
    r = run_xenrun("setup", "--config", copy / "plugins.toml", "--host", host, "--yes", *extra)
    assert r.returncode == 0, r.stderr
    return file_map(copy / "hosts" / host)


def ssh_target(sshd, root=None, **kw):
    from xenrun.targets.ssh import SSHTarget
    return SSHTarget(sshd.address, root=str(root) if root else None,
                     connect_kwargs={"key_filename": str(sshd.key), "look_for_keys": False, "allow_agent": False},
                     **kw)


# -- facts ------------------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
def test_facts_over_ssh_equal_local_facts(site, sshd, host, monkeypatch):
    from xenrun import run
    from xenrun.targets import ssh
    local = run.gather_facts(run.prepare(run.Options(config=str(site / "plugins.toml"), host=host)))
    root = over_ssh(site, host, sshd)
    made = []

    class Counted(ssh.SSHTarget):
        def __init__(self, address, **kw):
            super().__init__(address, **kw)
            made.append(self)
    monkeypatch.setattr(ssh, "SSHTarget", Counted)
    p = run.prepare(run.Options(config=str(site / "plugins.toml"), host=host))
    assert isinstance(p.target, Counted) and str(p.target) == f"ssh {sshd.address} root {root}"
    remote = run.gather_facts(p)
    print(f"{host}: facts over SSH in {dict(made[0].stats)}")
    assert remote.to_json() == local.to_json()
    assert made[0].stats["command"] <= 3  # the warm-up's rounds; everything else came from the cache


def test_facts_of_this_machine_over_ssh_equal_local_facts(sshd):
    from xenrun.facts import Probe
    from xenrun.plugins import facts as core
    from xenrun.targets.local import LocalTarget
    target = ssh_target(sshd)
    remote = core.detect_hardware(Probe(target))
    local = core.detect_hardware(Probe(LocalTarget("/")))
    assert remote["live"] is True and target.live
    assert remote == local
    print(f"this machine: facts over SSH in {dict(target.stats)}")


def test_unreachable_host_exits_2_at_once_with_one_line(site, sshd):
    root = over_ssh(site, "arch-grub", sshd, address=f"root@127.0.0.1:{free_port()}")
    before = tree_hash(site)
    started = time.monotonic()
    r = xenrun_ssh(root, sshd, "setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 2, r.stderr
    assert time.monotonic() - started < 10
    message = [line for line in r.stderr.splitlines() if not line.startswith("ssh-stats")]
    assert len(message) == 1 and "cannot reach ssh root@127.0.0.1:" in message[0], r.stderr
    assert tree_hash(site) == before


# -- setup ------------------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
def test_setup_over_ssh_equals_local_apply_and_a_rerun_changes_nothing(site, sshd, host):
    reference = local_reference(site, host, "--files-only")
    root = over_ssh(site, host, sshd)
    r, first = setup_ssh(site, host, root, sshd, "--yes", "--files-only")
    assert r.returncode == 0, r.stderr
    assert first["report"]["status"] == "applied" and first["summary"]["changed"] > 0
    assert first["target"].startswith("ssh root@127.0.0.1")
    assert file_map(root) == reference
    assert not [p for p in file_map(root, skip_state=False) if p.endswith(".xenrun-tmp")]
    r2, again = setup_ssh(site, host, root, sshd, "--yes", "--files-only")
    assert r2.returncode == 0, r2.stderr
    assert again["report"]["status"] == "nothing to do" and again["summary"]["changed"] == 0
    assert file_map(root) == reference
    print(f"{host}: first run {stats(r)}, re-run {stats(r2)}")
    # facts, plan and assessment read ahead together: a round per level of reads
    # that depend on others (facts, then what they name; links), nothing per path
    assert stats(r2)["command"] <= 3 and stats(r2).get("sftp", 0) == 0
    # the read-ahead's speculative passes say nothing; the real one says it once (the
    # stock Debian has its dhclient, so it has nothing to say)
    warnings = 0 if host == "debian-grub" else 1
    for run in (r, r2):
        assert sum("neither dhclient nor dhcpcd" in line for line in run.stderr.splitlines()) == warnings, run.stderr



def test_the_sftp_writes_a_host_without_base64_gets_give_the_same_files(site, sshd):
    """The fallback of shellfiles.py (a host without base64 -d, mv -T or sync
    FILE; writes above 8 MiB): forced here, the same files as a local apply, and
    a rollback puts every original back."""
    host = "arch-grub"
    before = file_map(site / "hosts" / host)
    reference = local_reference(site, host, "--files-only")
    root = over_ssh(site, host, sshd)
    env = {"XENRUN_SFTP_WRITES": "1"}
    r, first = setup_ssh(site, host, root, sshd, "--yes", "--files-only", env=env)
    assert r.returncode == 0, r.stderr
    assert first["summary"]["changed"] > 0 and stats(r).get("sftp", 0) > 0, stats(r)  # SFTP did write them
    assert file_map(root) == reference
    assert not [p for p in file_map(root, skip_state=False) if p.endswith(".xenrun-tmp")]
    r2, again = setup_ssh(site, host, root, sshd, "--yes", "--files-only", env=env)
    assert again["summary"]["changed"] == 0, r2.stderr
    back = xenrun_ssh(root, sshd, "rollback", "--config", site / "plugins.toml", "--host", host, "--yes", env=env)
    assert back.returncode == 0, back.stderr
    assert file_map(root) == before

def test_commands_run_inside_the_root_with_chroot_over_ssh(site, sshd):
    root = lab_host(site, 'command = ["touch", "/ran-inside"]', applets=("touch",))
    over_ssh(site, "lab", sshd)
    r, report = setup_ssh(site, "lab", root, sshd, "--yes")
    assert r.returncode == 0, r.stderr
    assert (root / "ran-inside").exists()
    r2, again = setup_ssh(site, "lab", root, sshd, "--yes")
    assert again["report"]["status"] == "nothing to do"
    print(f"lab with a command: first run {stats(r)}, re-run {stats(r2)}")


def test_failing_command_over_ssh_leaves_the_tree_byte_identical(site, sshd):
    root = lab_host(site, 'files = 3\ncommand = ["false"]')
    over_ssh(site, "lab", sshd)
    before = tree_hash(root, skip_state=True)
    r = xenrun_ssh(root, sshd, "setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 1, r.stderr
    assert "command false failed" in r.stderr and "put back" in r.stderr
    assert tree_hash(root, skip_state=True) == before


def test_validator_runs_on_the_host_over_ssh(site, sshd):
    root = lab_host(site, 'validate = ["grep", "-q", "not-there", "{}"]')
    over_ssh(site, "lab", sshd)
    before = tree_hash(root, skip_state=True)
    r = xenrun_ssh(root, sshd, "setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 1 and "rejected the new /etc/motd" in r.stderr, r.stderr
    assert tree_hash(root, skip_state=True) == before
    text = (site / "plugins.toml").read_text().replace('"not-there"', '"xen-host"')
    (site / "plugins.toml").write_text(text)
    r = xenrun_ssh(root, sshd, "setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    assert r.returncode == 0, r.stderr
    assert (root / "etc/motd").read_text() == "xen-host\n"


def test_an_apply_over_ssh_costs_as_many_round_trips_for_12_files_as_for_2(site, sshd, tmp_path):
    """The files of a stretch go together: their folders, the copies of their
    originals, the journal records and the writes are a fixed number of round
    trips whatever their number (the journal still says old or new for each)."""
    trips, changed, saved, copies = {}, {}, {}, {}
    for n in (2, 12):
        work = tmp_path / f"files-{n}"
        shutil.copytree(site, work, symlinks=True)
        root = lab_host(work, f'files = {n}\ncommand = ["true"]')
        (root / "etc/xenrun-sample").mkdir()
        for k in range(1, n + 1, 2):  # half of them exist: their originals are copied
            (root / f"etc/xenrun-sample/{k}").write_text(f"old {k}\n")
        over_ssh(work, "lab", sshd)
        r, report = setup_ssh(work, "lab", root, sshd, "--yes")
        assert r.returncode == 0, r.stderr
        assert all((root / f"etc/xenrun-sample/{k}").read_text() == f"file {k} of lab\n" for k in range(1, n + 1))
        run = next((root / "var/lib/xenrun/runs").iterdir())
        records = [json.loads(line) for line in (run / "journal").read_text().splitlines()]
        first_done = next(i for i, r in enumerate(records) if r["op"] in ("done", "ran"))
        assert all(r["op"] != "saved" for r in records[first_done:])  # every original on record before a change
        changed[n] = report["summary"]["changed"]
        saved[n] = sum(r["op"] == "saved" for r in records)
        copies[n] = len(list((run / "orig").iterdir()))
        trips[n] = stats(r)["command"] + stats(r)["sftp_waits"]
    print(f"round trips of a first apply: {trips}")
    assert changed[12] - changed[2] == saved[12] - saved[2] == 10 and copies[12] - copies[2] == 5
    assert trips[12] == trips[2]


def test_a_batch_of_writes_that_fails_leaves_every_file_as_it_was(sshd, tmp_path):
    from xenrun.errors import TargetError
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc/a").write_text("old a\n")
    (root / "etc/b").write_text("old b\n")
    (root / "etc/plain").write_text("a file, not a folder\n")
    target = ssh_target(sshd, root)
    new = [("/etc/a", b"new a\n", 0o644, None, None), ("/etc/b", b"new b\n", 0o600, None, None)]

    def reject_b(path, tmp):
        assert Path(tmp).read_bytes() == dict((p, d) for p, d, *_ in new)[path]  # validated before the rename
        if path == "/etc/b":
            raise RuntimeError("b rejected")
    with pytest.raises(RuntimeError, match="b rejected"):
        target.write_atomic_many(new, reject_b)
    with pytest.raises(TargetError, match="/etc/plain"):
        target.write_atomic_many(new + [("/etc/plain/c", b"c\n", 0o644, None, None)])
    assert file_map(root) == {"etc/a": file_map(root)["etc/a"], "etc/b": file_map(root)["etc/b"],
                              "etc/plain": file_map(root)["etc/plain"]}
    assert (root / "etc/a").read_text() == "old a\n" and (root / "etc/b").read_text() == "old b\n"
    target.write_atomic_many(new)
    assert (root / "etc/a").read_text() == "new a\n" and (root / "etc/b").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["a", "b", "plain"]  # no temp file left


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_a_file_below_a_link_made_by_the_same_run_is_written_through_that_link(sshd, tmp_path, kind):
    """Changes go in stretches whose folders and originals are prepared at once:
    a path below a link the stretch makes starts a new one (else its folder
    would be made before the link, where the link must go)."""
    import structlog

    from xenrun.apply import Applier
    from xenrun.changes import Symlink, WriteFile
    from xenrun.plan import assess
    from xenrun.targets.local import LocalTarget
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "opt/foo").mkdir(parents=True)
    target = LocalTarget(root) if kind == "local" else ssh_target(sshd, root)
    changes = [WriteFile("/etc/first", "1\n"), Symlink("/etc/foo", "/opt/foo"),
               WriteFile("/etc/foo/bar", "through the link\n"), WriteFile("/etc/last", "2\n")]
    applier = Applier(target, "t", structlog.get_logger())
    applier.lock()
    try:
        done = applier.apply(assess(changes, target))
    finally:
        applier.unlock()
    assert done["results"] == ["changed"] * 4
    assert os.readlink(root / "etc/foo") == "/opt/foo"
    assert (root / "opt/foo/bar").read_text() == "through the link\n"
    assert (root / "etc/first").read_text() == "1\n" and (root / "etc/last").read_text() == "2\n"


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_two_paths_of_one_batch_that_lead_to_one_file_are_refused(sshd, tmp_path, kind):
    from xenrun.changes import WriteFile
    from xenrun.errors import PlanError
    from xenrun.plan import assess
    from xenrun.targets.local import LocalTarget
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc/b").write_text("old b\n")
    (root / "etc/a").symlink_to("b")
    target = LocalTarget(root) if kind == "local" else ssh_target(sshd, root)
    # a link there is never written through (issue 17): refused when planned, on either target
    with pytest.raises(PlanError, match=r"/etc/a is a symbolic link \(to b\).*does not write through links"):
        assess([WriteFile("/etc/a", "through a\n"), WriteFile("/etc/b", "b\n")], target)
    assert os.readlink(root / "etc/a") == "b" and (root / "etc/b").read_text() == "old b\n"
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["a", "b"]


def test_sigkill_mid_apply_releases_the_remote_lock_and_the_next_run_converges(site, sshd, tmp_path):
    lab_host(site, 'files = 3\ncommand = ["true"]')
    new = local_reference(site, "lab")
    over_ssh(site, "lab", sshd)
    point, killed = 0, 0
    while True:
        point += 1
        work = tmp_path / f"crash-{point}"
        shutil.copytree(site, work, symlinks=True)
        config = work / "plugins.toml"  # its root must name the copy's folder
        config.write_text(config.read_text().replace(f'"{site}/hosts/lab"', f'"{work}/hosts/lab"'))
        root = work / "hosts" / "lab"
        old = file_map(root)
        r = xenrun_ssh(root, sshd, "setup", "--config", work / "plugins.toml", "--host", "lab", "--yes",
                       env={"XENRUN_CRASH_AT": str(point)})
        if r.returncode == 0:
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
        killed += 1
        now = file_map(root)
        for path in set(old) | set(new):
            assert now.get(path) in (old.get(path), new.get(path)), f"{path} partial after kill at point {point}"
        # the next run takes the lock at once (the dead run's shell is gone) and converges
        r = xenrun_ssh(root, sshd, "setup", "--config", work / "plugins.toml", "--host", "lab", "--yes")
        assert r.returncode == 0, f"point {point}: {r.stderr}"
        assert file_map(root) == new, f"did not converge after a kill at point {point}"
        assert not [p for p in file_map(root, skip_state=False) if p.endswith(".xenrun-tmp")]
        shutil.rmtree(work)
    print(f"SIGKILL over SSH at {killed} crash points")
    assert killed >= 10


def test_two_concurrent_runs_over_ssh_exactly_one_proceeds(site, sshd):
    root = lab_host(site, 'command = ["sleep", "3"]')
    over_ssh(site, "lab", sshd)
    args = ("setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
    first = xenrun_ssh(root, sshd, *args, popen=True)
    lock = root / "var/lib/xenrun/lock"
    deadline = time.time() + 30
    while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
        time.sleep(0.05)
    second = xenrun_ssh(root, sshd, *args)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and "holds the lock" in second.stderr
    assert lock.read_text() == ""  # released by the first run


# -- the target itself ----------------------------------------------------------------

def test_paths_cannot_escape_the_root(site, sshd):
    root = site / "hosts" / "arch-grub"
    (root / "etc/abs").symlink_to("/../../../../etc/hostname")
    (root / "etc/rel").symlink_to("../../../../../../../../etc/hostname")
    (root / "etc/dir").symlink_to("/etc")
    target = ssh_target(sshd, root)
    mine = (root / "etc/hostname").read_bytes()
    assert target.read("/etc/abs") == mine and target.read("/etc/rel") == mine
    assert target.read("/etc/dir/hostname") == mine
    assert target.read("/../../../etc/hostname") == mine
    assert target.lstat("/etc/abs").link == "/../../../../etc/hostname"
    target.write_atomic("/etc/dir/motd", b"inside\n", 0o644)
    assert (root / "etc/motd").read_bytes() == b"inside\n"
    target.symlink("/etc/dir/link", "/x")
    assert os.readlink(root / "etc/link") == "/x"


def test_cache_answers_until_the_first_write(site, sshd):
    root = site / "hosts" / "arch-grub"
    target = ssh_target(sshd, root)
    target.prefetch(["/etc/fstab", "/etc/hostname", "/etc/missing"], ["/boot", "/etc"])
    before = dict(target.stats)
    assert target.read("/etc/hostname") == (root / "etc/hostname").read_bytes()
    assert target.read("/etc/missing") is None and not target.exists("/etc/missing")
    assert target.listdir("/boot") == sorted(os.listdir(root / "boot"))
    assert target.stat("/etc/fstab").mode == (root / "etc/fstab").stat().st_mode & 0o7777
    assert dict(target.stats) == before, "answered from the cache without a round trip"
    seen = []
    target.write_atomic("/etc/missing", b"new\n", 0o600, before_rename=lambda tmp: seen.append(
        (tmp, (root / "etc/.missing.xenrun-tmp").read_bytes())))
    assert seen == [(f"{root}/etc/.missing.xenrun-tmp", b"new\n")]
    assert target.read("/etc/missing") == b"new\n" and target.stat("/etc/missing").mode == 0o600
    assert "missing" in target.listdir("/etc")


def _lock_once_free(target, path: str, holder: str) -> None:
    """Take the lock as soon as the session that held it has ended (within 5 s)."""
    from xenrun.errors import LockHeld
    deadline = time.time() + 5
    while True:
        try:
            return target.lock(path, holder)
        except LockHeld:
            assert time.time() < deadline, "the lock outlived its session"
            time.sleep(0.05)


def test_lock_is_released_when_the_session_ends(site, sshd):
    from xenrun.errors import LockHeld
    root = site / "hosts" / "arch-grub"
    one, two = ssh_target(sshd, root), ssh_target(sshd, root)
    one.lock("/var/lib/xenrun/lock", "pid 1 on test")
    with pytest.raises(LockHeld, match="pid 1 on test"):
        two.lock("/var/lib/xenrun/lock", "pid 2 on test")
    one.close()  # the connection drops: its shell, and the flock, end with it
    _lock_once_free(two, "/var/lib/xenrun/lock", "pid 2 on test")
    two.unlock()
    two.rmdir("/var/lib/xenrun/none")  # a request: it reads the unlock's answer first
    assert (root / "var/lib/xenrun/lock").read_text() == ""


def test_unlock_costs_no_round_trip_and_the_next_request_reads_its_answer(sshd, tmp_path):
    from xenrun.errors import LockHeld
    target, other = ssh_target(sshd, tmp_path), ssh_target(sshd, tmp_path)
    target.lock("/state/lock", "pid 1 on test")
    waits = target.stats["command"]
    target.unlock()
    assert target.stats["command"] == waits and target._owed == 1  # sent, not waited for
    assert target.rmdir("/state/none") is False  # the unlock's answer, then its own
    assert target._owed == 0 and (tmp_path / "state/lock").read_text() == ""
    other.lock("/state/lock", "pid 2 on test")  # released for the others
    with pytest.raises(LockHeld, match="pid 2 on test"):
        target.lock("/state/lock", "pid 1 again")
    other.unlock()
    other.close()  # its unlock's answer never read: the session's end releases the lock all the same
    _lock_once_free(target, "/state/lock", "pid 1 again")
    target.unlock()
    target.close()


def test_run_frames_output_and_quotes_arguments(sshd, tmp_path):
    target = ssh_target(sshd)
    odd = "it's $HOME `id` \"q\" \\ ; rm -rf /nothing\nline2"
    r = target.execute(["printf", "%s", odd])
    assert (r.rc, r.stdout) == (0, odd)
    r = target.execute(["sh", "-c", "cat; echo err >&2; exit 7"], input="in\x01put")
    assert (r.rc, r.stdout, r.stderr) == (7, "in\x01put", "err\n")
    assert target.execute(["no-such-program-xenrun"]).rc == 127
    big = tmp_path / "big"
    big.write_bytes(os.urandom(300_000))
    assert target.read(str(big)) == big.read_bytes()
    target.make_sparse(str(tmp_path / "disk.img"), 1 << 30, 0o600)
    st = (tmp_path / "disk.img").stat()
    assert st.st_size == 1 << 30 and st.st_blocks * 512 < 1 << 20
    target.truncate(str(tmp_path / "disk.img"), 4096)
    assert (tmp_path / "disk.img").stat().st_size == 4096
    target.append_line(str(tmp_path / "journal"), "one")
    target.append_line(str(tmp_path / "journal"), "two\n")
    assert (tmp_path / "journal").read_text() == "one\ntwo\n"
    assert (tmp_path / "journal").stat().st_mode & 0o777 == 0o600


def _session_processes(daemon_pid: int) -> list[int]:
    """The sshd processes serving sessions: descendants of the listening daemon
    whose name is sshd (not the shells and commands they run)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(daemon_pid, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith("sshd"):
                found.append(pid)
        except OSError:
            pass
    return found


def test_a_host_that_stops_answering_mid_command_is_given_up_within_its_timeout(sshd):
    """A host gone mid-command (here: its sshd frozen, so TCP stays open and
    nothing answers) ends the command with a clear error within the host's
    timeout, instead of waiting until TCP gives up; a long silent command on a
    live host is not given up (its heartbeats are the shell's sign of life)."""
    from xenrun.errors import HostLost
    target = ssh_target(sshd, timeout=3)
    assert target.execute(["true"]).rc == 0
    started = time.monotonic()
    assert target.execute(["sleep", "7"]).rc == 0
    assert time.monotonic() - started >= 7
    frozen = _session_processes(sshd.process.pid)
    assert frozen, "no sshd session process found"
    timer = __import__("threading").Timer(1.0, lambda: [os.kill(p, signal.SIGSTOP) for p in frozen])
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(HostLost, match="stopped answering"):
            target.execute(["sleep", "120"])
        print(f"given up after {time.monotonic() - started:.1f} s (timeout 3 s, frozen after 1 s)")
        assert time.monotonic() - started < 3 + 1 + 5
        with pytest.raises(HostLost, match="stopped answering"):  # and no new session to a host given up on
            target.read("/etc/hostname")
    finally:
        timer.cancel()
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


# -- hosts that misbehave (issue 17) -------------------------------------------------

def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[tuple[int, str, list[str]]]:
    """(pid, comm, argv) of every process below ``pid``."""
    children, out, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
                argv = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            except OSError:
                continue
            out.append((child, comm, argv))
    return out


def _remote_shells(server) -> list[int]:
    """The persistent shells: sh processes whose parent is an sshd session."""
    sshds = {pid for pid, comm, _ in _descendants(server.process.pid) if comm.startswith("sshd")}
    children = _children()
    return [pid for parent in sshds for pid in children.get(parent, [])
            if Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "sh"]


def _wait_until(condition, what: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _lock_is_free(path: Path) -> bool:
    """Whether no process holds the flock on ``path`` (the host is this machine)."""
    import fcntl
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def _one_line(r) -> str:
    # (the JSON lines are the run's log: its progress, a new host key saved)
    lines = [line for line in r.stderr.splitlines()
             if line.strip() and not line.startswith(("ssh-stats", "{", "20")) and "new host: its key" not in line]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("frozen, when", [("session", "command"), ("shell", "command"),
                                          ("session", "lock"), ("shell", "lock")])
def test_a_host_frozen_mid_run_is_given_up_within_its_timeout_and_the_next_run_recovers(site, tmp_path,
                                                                                       frozen, when):
    """SIGSTOP of the session's sshd (the host is gone, TCP stays open) or of the
    remote shell alone (the host answers SSH keepalives, the shell does not),
    right after the lock is taken or while the plan's command runs: the run
    exits 2 within the host's timeout (3 s) with one line naming the host, and
    once the host is back the next run recovers and converges."""
    from support.sshd import start_sshd
    server = start_sshd(tmp_path / "sshd")
    try:
        root = lab_host(site, 'files = 3\ncommand = ["sleep", "4"]')
        new = local_reference(site, "lab")
        over_ssh(site, "lab", server, timeout=3)
        run = xenrun_ssh(root, server, "setup", "--config", site / "plugins.toml", "--host", "lab", "--yes",
                         popen=True)
        lock = root / "var/lib/xenrun/lock"
        if when == "lock":
            _wait_until(lambda: lock.exists() and lock.read_text().startswith("pid"), "the lock taken")
        else:
            _wait_until(lambda: any(argv == ["sleep", "4"] for _, _, argv in _descendants(server.process.pid)),
                        "the command running")
        pids = _remote_shells(server) if frozen == "shell" else \
            [pid for pid, comm, _ in _descendants(server.process.pid) if comm.startswith("sshd")]
        assert pids, f"no {frozen} process"
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            out, err = run.communicate(timeout=60)
            took = time.monotonic() - started
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        print(f"{frozen} frozen at the {when}: exit {run.returncode} after {took:.1f} s: {err.strip()}")
        r = subprocess.CompletedProcess(run.args, run.returncode, out, err)
        line = _one_line(r)
        assert run.returncode == 2 and line.startswith("xenrun: cannot reach ssh root@127.0.0.1"), err
        assert "stopped answering" in line and "next run recovers" in line
        assert took < 3 + 6
        # the host is back: the dead run's session ends, its shell once the command it
        # waits for is done (and the lock with it); then the next run converges
        _wait_until(lambda: _lock_is_free(lock), "the old session's lock released")
        again = xenrun_ssh(root, server, "setup", "--config", site / "plugins.toml", "--host", "lab", "--yes")
        assert again.returncode == 0, again.stderr
        assert file_map(root) == new
        assert not [p for p in file_map(root, skip_state=False) if p.endswith(".xenrun-tmp")]
    finally:
        server.stop()


@pytest.mark.parametrize("listener", ["silent", "closes"])
def test_a_port_that_is_not_an_ssh_server_gives_one_line_within_the_timeout(site, sshd, listener):
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if listener == "closes":
                conn.close()
            else:
                accepted.append(conn)  # kept open, never a byte
    threading.Thread(target=serve, daemon=True).start()
    try:
        root = over_ssh(site, "arch-grub", sshd, address=f"root@127.0.0.1:{server.getsockname()[1]}", timeout=3)
        before = tree_hash(site)
        started = time.monotonic()
        r = xenrun_ssh(root, sshd, "setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry",
                       timeout=60)
        took = time.monotonic() - started
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    line = _one_line(r)
    print(f"{listener}: exit {r.returncode} after {took:.1f} s: {line}")
    assert r.returncode == 2 and line.startswith("xenrun: cannot reach ssh root@127.0.0.1:")
    assert ("no SSH greeting within 3 s" if listener == "silent" else "closed before the SSH handshake") in line
    assert took < 3 + 6 and tree_hash(site) == before


RC_FILES = {
    "banner": 'echo "Welcome to $(hostname)! Authorized use only."\n',
    "200 KB": "head -c 200000 /dev/zero | tr '\\0' '#'; echo; head -c 1000 /dev/zero | tr '\\0' e >&2\n",
    "reads stdin": "read -r answer\necho \"you said: $answer\"\n",
}


@pytest.mark.parametrize("rc", list(RC_FILES))
def test_a_root_shell_rc_file_that_prints_or_reads_stdin_does_not_disturb_a_setup(site, tmp_path, rc):
    """Root's ~/.bashrc (bound over it in sshd's own mount namespace) prints a
    banner, 200 KB, or reads a line from stdin: the shell and the SFTP server
    both start through it, and a setup still equals a local apply."""
    from support.sshd import start_sshd
    server = start_sshd(tmp_path / "sshd", bashrc=RC_FILES[rc])
    try:
        banner = subprocess.run(["ssh", "-p", str(server.port), "-i", str(server.key), "-o", "BatchMode=yes",
                                 "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path}/kh",
                                 "root@127.0.0.1", "true"], capture_output=True, text=True, timeout=30, input="\n")
        assert banner.returncode == 0 and banner.stdout, "the rc file did not print: not the host it should be"
        root = lab_host(site, 'files = 3\ncommand = ["true"]')
        reference = local_reference(site, "lab")
        over_ssh(site, "lab", server, timeout=10)
        r, report = setup_ssh(site, "lab", root, server, "--yes")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert report["report"]["status"] == "applied" and file_map(root) == reference
        r2, again = setup_ssh(site, "lab", root, server, "--yes")
        assert r2.returncode == 0 and again["report"]["status"] == "nothing to do", r2.stderr
    finally:
        server.stop()


def test_an_rc_file_that_waits_for_all_of_stdin_gives_one_line_within_the_timeout(site, tmp_path):
    from support.sshd import start_sshd
    server = start_sshd(tmp_path / "sshd", bashrc="cat >/dev/null\n")
    try:
        root = over_ssh(site, "arch-grub", server, timeout=3)
        started = time.monotonic()
        r = xenrun_ssh(root, server, "facts", "--config", site / "plugins.toml", "--host", "arch-grub", timeout=60)
        took = time.monotonic() - started
    finally:
        server.stop()
    line = _one_line(r)
    print(f"exit {r.returncode} after {took:.1f} s: {line}")
    assert r.returncode == 2 and "did not start the shell within 3 s" in line and "waiting for input" in line
    assert took < 3 + 6


def test_a_read_only_temp_folder_is_named(site, tmp_path):
    from support.sshd import start_sshd
    ro = tmp_path / "ro-tmp"
    server = start_sshd(tmp_path / "sshd", read_only_tmp=ro)
    try:
        root = over_ssh(site, "arch-grub", server, timeout=10)
        before = tree_hash(site)
        r = xenrun_ssh(root, server, "setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    finally:
        server.stop()
    line = _one_line(r)
    assert r.returncode == 2 and f"temp folder on the host: {ro}: " in line and "Read-only" in line, line
    assert "remote shell ended" not in line and tree_hash(site) == before


def test_a_file_whose_size_does_not_match_its_content_is_read_whole(sshd, tmp_path):
    """Files fetched together are cut by their stat sizes (framing.cut); when the
    sizes do not add up (here a /proc file: size 0, text inside; elsewhere a file
    that changed in between), each is read again on its own."""
    target = ssh_target(sshd)
    (tmp_path / "f").write_text("first\n")
    target.prefetch([str(tmp_path / "f"), "/proc/version"])
    assert target.stat("/proc/version").size == 0
    assert target.read(str(tmp_path / "f")) == b"first\n"
    assert target.read("/proc/version") == Path("/proc/version").read_bytes()


def test_a_new_host_key_is_saved_and_a_changed_one_refused(site, sshd, monkeypatch, tmp_path):
    """As OpenSSH's accept-new: the first connection trusts the host's key and saves
    it; later ones must see that key. A host showing another key is refused
    (exit 2, nothing touched) with the ssh-keygen -R line to run if it was
    reinstalled."""
    known = tmp_path / "known_hosts"
    monkeypatch.setenv("XENRUN_KNOWN_HOSTS", str(known))
    root = over_ssh(site, "arch-grub", sshd)
    r = xenrun_ssh(root, sshd, "facts", "--config", site / "plugins.toml", "--host", "arch-grub")
    assert r.returncode == 0, r.stderr
    name = f"[127.0.0.1]:{sshd.port}"
    (line,) = known.read_text().splitlines()
    assert line.startswith(f"{name} ssh-") and "new host" in r.stderr
    r = xenrun_ssh(root, sshd, "facts", "--config", site / "plugins.toml", "--host", "arch-grub")
    assert r.returncode == 0 and "new host" not in r.stderr and len(known.read_text().splitlines()) == 1

    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, key = other.with_suffix(".pub").read_text().split()[:2]
    known.write_text(f"{name} {key_type} {key}\n")  # as if the host had been reinstalled
    before = tree_hash(root)
    r = xenrun_ssh(root, sshd, "setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes")
    assert r.returncode == 2, r.stderr
    assert "host key is not the one" in r.stderr and f"ssh-keygen -R '{name}'" in r.stderr
    assert tree_hash(root) == before


def test_host_keys_are_found_among_many_hosts_and_under_hashed_names(sshd, monkeypatch, tmp_path):
    """A known_hosts file of a big site: many other hosts, comments, a broken line,
    names hashed by ssh-keygen -H (HashKnownHosts). The host's own line is found
    and checked; the others are not even parsed."""
    from xenrun.errors import TargetError
    known = tmp_path / "known_hosts"
    monkeypatch.setenv("XENRUN_KNOWN_HOSTS", str(known))
    target = ssh_target(sshd)
    target._connect()  # a new host: its key is saved
    target.close()
    (ours,) = known.read_text().splitlines()
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, key = other.with_suffix(".pub").read_text().split()[:2]
    name = f"[127.0.0.1]:{sshd.port}"
    crowd = [f"[10.{n // 250}.{n % 250}.1]:22 {key_type} {key}" for n in range(2000)]
    for own, works in ((ours, True), (f"{name} {key_type} {key}", False)):
        known.write_text("\n".join(crowd[:1000] + [own] + crowd[1000:]) + "\n")
        subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
        lines = known.read_text().splitlines()
        assert name not in known.read_text() and len(lines) == 2001  # every name hashed
        known.write_text("\n".join(["# a site's hosts"] + lines[:500] + ["not a key line"] + lines[500:]) + "\n")
        before = known.read_text()
        target = ssh_target(sshd)
        if works:
            target._connect()
            target.close()
        else:
            with pytest.raises(TargetError, match="host key is not the one"):
                target._connect()
        assert known.read_text() == before  # nothing appended: the host was found


@pytest.mark.parametrize("value", ["0", '"10"', "true", "99999"])
def test_a_bad_timeout_is_refused_with_its_line(site, value):
    text = (site / "plugins.toml").read_text()
    text, n = re.subn(r"^(\[hosts\.arch-grub\][^\n]*\n)", rf"\1timeout = {value}\n", text, count=1, flags=re.M)
    assert n == 1
    (site / "plugins.toml").write_text(text)
    line = next(n for n, t in enumerate((site / "plugins.toml").read_text().splitlines(), 1) if t.startswith("timeout"))
    before = tree_hash(site)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 2 and f"plugins.toml:{line}: hosts.arch-grub.timeout: must be a number of seconds" in r.stderr
    assert tree_hash(site) == before


def test_a_fleet_reports_a_host_that_stops_answering_and_goes_on(site, sshd, tmp_path):
    """Two hosts at once; one (its own sshd) freezes mid-command: that host is
    reported unreachable within its timeout, the other is applied, and the frozen
    one converges on the next run once it is back."""
    from support.sshd import start_sshd
    frozen_server = start_sshd(tmp_path / "sshd-frozen")
    try:
        lab = lab_host(site, 'files = 2\ncommand = ["true"]')
        lab2 = site / "hosts" / "lab2"
        shutil.copytree(lab, lab2, symlinks=True)
        (lab2 / "etc/hostname").write_text("lab2\n")
        text = (site / "plugins.toml").read_text()
        text += ('\n[hosts.lab2]\nroot = "hosts/lab2"\nboot = "none"\nnetwork = "none"\nplugins = ["sample"]\n'
                 '\n[hosts.lab2.plugin.sample]\nfiles = 2\ncommand = ["sleep", "4"]\n')
        (site / "plugins.toml").write_text(text)
        over_ssh(site, "lab", sshd)
        over_ssh(site, "lab2", frozen_server, timeout=3)
        run = xenrun_ssh(lab, sshd, "setup", "--config", site / "plugins.toml", "--host", "lab,lab2", "--yes",
                         "--format", "json", env={"XENRUN_FLEET_PROCESSES": "1"}, popen=True)
        _wait_until(lambda: any(argv == ["sleep", "4"] for _, _, argv in _descendants(frozen_server.process.pid)),
                    "lab2's command running")
        pids = [pid for pid, comm, _ in _descendants(frozen_server.process.pid) if comm.startswith("sshd")]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            out, err = run.communicate(timeout=60)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert run.returncode == 1 and "Traceback" not in err, err
        hosts = {h["host"]: h for h in json.loads(out)["hosts"]}
        assert hosts["lab"]["report"]["status"] == "applied"
        assert hosts["lab2"]["report"]["status"] == "unreachable"
        assert "stopped answering" in hosts["lab2"]["report"]["error"]
        assert (lab / "etc/xenrun-sample/2").read_text() == "file 2 of lab\n"
        _wait_until(lambda: _lock_is_free(lab2 / "var/lib/xenrun/lock"), "lab2's old session's lock released")
        again = xenrun_ssh(lab2, frozen_server, "setup", "--config", site / "plugins.toml", "--host", "lab2", "--yes")
        assert again.returncode == 0, again.stderr
        assert (lab2 / "etc/xenrun-sample/2").read_text() == "file 2 of lab2\n"
    finally:
        frozen_server.stop()
