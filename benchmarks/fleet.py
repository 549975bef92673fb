"""A small Xen-host job (benchmarks/job.py: four files, a line in fstab, a
symlink, three guarded commands, a 10 GiB sparse image) over SSH to 1, 10 and 30
loopback hosts, first run and idempotent re-run, for xenrun, pyinfra, Ansible and a
plain Fabric script. Every figure is a whole process, start to exit.

The "hosts" are folders under /tmp/xenrun-bench/hosts (copies of the example
machine arch-grub, with busybox for the commands), all served by one OpenSSH
server on 127.0.0.1 (tests/support/sshd.py, key auth, root). xenrun gets each folder as
its host's ``root`` in plugins.toml (commands run there with chroot); the other
tools have no root prefix, so their job's paths start with the folder.

Root's ~/.bashrc on these machines runs `pyenv init` for every command sshd
starts. The main table uses an sshd whose mount namespace has an empty file bound
over /root/.bashrc (what a host without such an rc file costs); then xenrun and
the Fabric script run again at the largest size against a plain sshd, which reads
the real .bashrc.

pyinfra and ansible-core come from PyPI into .cache/bench-venv (created here on
the first run). Ansible runs with forks = hosts and gather_facts off.

    .venv/bin/python benchmarks/fleet.py [--sizes 1,10,30] [--tools xenrun,fabric,pyinfra,ansible] [--repeat 3]

It ends with issue 16's goals, each met or not: the ratios to Fabric and pyinfra,
round trips per host, client CPU per host (user+sys of the tool's process and the
workers it waits for, over the hosts) and seconds per extra host between the
smallest and largest size. The curve to 100 hosts: --sizes 1,10,30,100 (the
benchmark's sshd takes 100 connections starting at once: MaxStartups 200).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(HERE)]

import job  # noqa: E402

from support import sshd as sshd_helper  # noqa: E402
from support.helpers import EXAMPLES, add_busybox  # noqa: E402

WORK = Path("/tmp/xenrun-bench")
VENV = REPO / ".cache" / "bench-venv"
TIMEOUT = 900

XENRUN = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from xenrun import registry as plugins
plugins.BUILTIN["benchjob"] = "benchjob"  # the benchmark's job, not a shipped plugin
sys.argv = ["xenrun", *sys.argv[1:]]
from xenrun.cli import main
main()
"""


# -- hosts and servers ------------------------------------------------------------------

def make_roots(n: int) -> list[Path]:
    shutil.rmtree(WORK / "hosts", ignore_errors=True)
    roots = []
    for i in range(1, n + 1):
        root = WORK / "hosts" / f"h{i:02d}"
        shutil.copytree(EXAMPLES / "hosts" / "arch-grub", root, symlinks=True)
        add_busybox(root, "mkdir", "touch")
        roots.append(root)
    return roots


def start_servers():
    """A plain sshd (root's real .bashrc) and one that sees an empty .bashrc."""
    plain = sshd_helper.start_sshd(WORK / "sshd-rc")
    empty = WORK / "empty-bashrc"
    empty.write_text("")
    wrapper = WORK / "sshd-norc"
    wrapper.write_text("#!/bin/sh\nexec unshare -m --propagation private sh -c "
                       f"'mount --bind {empty} /root/.bashrc && exec {sshd_helper.SSHD} \"$@\"' sshd \"$@\"\n")
    wrapper.chmod(0o755)
    original, sshd_helper.SSHD = sshd_helper.SSHD, str(wrapper)
    try:
        norc = sshd_helper.start_sshd(WORK / "sshd-norc-state")
    finally:
        sshd_helper.SSHD = original
    return plain, norc


def ensure_venv() -> None:
    if (VENV / "bin" / "pyinfra").exists() and (VENV / "bin" / "ansible-playbook").exists():
        return
    print(f"creating {VENV} with pyinfra, ansible-core and fabric from PyPI ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "pyinfra", "ansible-core", "fabric"], check=True)


def versions() -> str:
    if not (VENV / "bin" / "pip").exists():  # --tools xenrun: no other tool installed
        return "other tools not installed"
    out = subprocess.run([str(VENV / "bin" / "pip"), "list", "--format", "json"], capture_output=True, text=True)
    have = {p["name"].lower(): p["version"] for p in json.loads(out.stdout or "[]")}
    return ", ".join(f"{n} {have.get(n, '?')}" for n in ("pyinfra", "ansible-core", "fabric", "paramiko"))


# -- the job for each tool ------------------------------------------------------------------

def xenrun_cmd(server, roots: list[Path]) -> list[str]:
    hosts = "".join(f'\n[hosts.{r.name}]\naddress = "{server.address}"\nroot = "{r}"\nidentity = "{server.key}"\n'
                    for r in roots)
    config = WORK / "site" / "plugins.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text('[defaults]\nboot = "none"\nnetwork = "none"\nplugins = ["benchjob"]\n\n'
                      '[plugin.xen]\nservices = false  # the job links one unit itself\n' + hosts)
    return [sys.executable, "-c", XENRUN, "setup", "--config", str(config), "--all", "--yes",
            "--parallel", str(len(roots)), "--format", "json"]


PYINFRA_DEPLOY = """
import sys
from io import StringIO
sys.path.insert(0, %(here)r)
from job import COMMANDS, FILES, FSTAB_LINE, GONE, IMAGE, IMAGE_SIZE, LINK
from pyinfra import host
from pyinfra.operations import files, server

R = host.data.root
for path, content in FILES.items():
    files.put(name="file " + path, src=StringIO(content), dest=R + path)
files.line(name="fstab", path=R + "/etc/fstab", line=FSTAB_LINE)
files.link(name="link", path=R + LINK[0], target=LINK[1])
for argv, creates in COMMANDS:
    words = " ".join(R + a if a.startswith("/") else a for a in argv)
    server.shell(name="command " + argv[0], commands=["test -e %%s || %%s" %% (R + creates, words)])
image = R + IMAGE
server.shell(name="image", commands=["test -e %%s || { mkdir -p %%s && truncate -s %%d %%s; }"
                                     %% (image, image.rsplit("/", 1)[0], IMAGE_SIZE, image)])
files.file(name="xend.rules", path=R + GONE, present=False)
"""


def pyinfra_cmd(server, roots: list[Path]) -> list[str]:
    inventory = WORK / "pyinfra_inventory.py"
    hosts = [(r.name, {"ssh_hostname": "127.0.0.1", "ssh_port": server.port, "ssh_user": "root",
                       "ssh_key": str(server.key), "ssh_strict_host_key_checking": "off",
                       "ssh_known_hosts_file": "/dev/null", "ssh_look_for_keys": False,
                       "ssh_allow_agent": False, "root": str(r)}) for r in roots]
    inventory.write_text(f"hosts = {hosts!r}\n")
    deploy = WORK / "pyinfra_deploy.py"
    deploy.write_text(PYINFRA_DEPLOY % {"here": str(HERE)})
    return [str(VENV / "bin" / "pyinfra"), str(inventory), str(deploy), "-y", "--parallel", str(len(roots))]


def ansible_cmd(server, roots: list[Path]) -> list[str]:
    lines = ["[bench]"] + [f"{r.name} ansible_host=127.0.0.1 ansible_port={server.port} root={r}" for r in roots]
    lines += ["[bench:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={server.key}",
              "ansible_python_interpreter=/usr/bin/python3",
              "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'"]
    (WORK / "ansible_inventory.ini").write_text("\n".join(lines) + "\n")
    r = "{{ root }}"
    folders = sorted({p.rsplit("/", 1)[0] for p in job.FILES} | {job.IMAGE.rsplit("/", 1)[0]})
    tasks = [{"file": {"path": r + d, "state": "directory"}} for d in folders]
    tasks += [{"copy": {"dest": r + p, "content": c}} for p, c in job.FILES.items()]
    tasks.append({"lineinfile": {"path": r + "/etc/fstab", "line": job.FSTAB_LINE}})
    tasks.append({"file": {"path": r + job.LINK[0], "src": job.LINK[1], "state": "link", "force": True}})
    tasks += [{"command": {"argv": [r + a if a.startswith("/") else a for a in argv], "creates": r + creates}}
              for argv, creates in job.COMMANDS]
    tasks.append({"command": {"argv": ["truncate", "-s", str(job.IMAGE_SIZE), r + job.IMAGE],
                              "creates": r + job.IMAGE}})
    tasks.append({"file": {"path": r + job.GONE, "state": "absent"}})
    play = WORK / "ansible_play.yml"
    play.write_text(json.dumps([{"hosts": "bench", "gather_facts": False, "tasks": tasks}], indent=1))  # JSON is YAML
    return [str(VENV / "bin" / "ansible-playbook"), "-i", str(WORK / "ansible_inventory.ini"), str(play),
            "-f", str(len(roots))]


def fabric_script(root: str) -> str:
    """The whole job as one idempotent shell script (one exec per host)."""
    q = shlex.quote
    out = ["set -e"]
    for path, content in job.FILES.items():
        p = q(root + path)
        out.append(f"mkdir -p {q(root + path.rsplit('/', 1)[0])}; printf %s {q(content)} | cmp -s - {p}"
                   f" || {{ printf %s {q(content)} > {p}.tmp && mv {p}.tmp {p}; }}")
    fstab = q(root + "/etc/fstab")
    out.append(f"grep -qxF {q(job.FSTAB_LINE)} {fstab} || echo {q(job.FSTAB_LINE)} >> {fstab}")
    link = q(root + job.LINK[0])
    out.append(f"[ \"$(readlink {link})\" = {q(job.LINK[1])} ] || ln -sfn {q(job.LINK[1])} {link}")
    for argv, creates in job.COMMANDS:
        words = " ".join(q(root + a if a.startswith("/") else a) for a in argv)
        out.append(f"test -e {q(root + creates)} || {words}")
    image = root + job.IMAGE
    out.append(f"test -e {q(image)} || {{ mkdir -p {q(image.rsplit('/', 1)[0])}; truncate -s {job.IMAGE_SIZE} {q(image)}; }}")
    out.append(f"rm -f {q(root + job.GONE)}")
    return "\n".join(out) + "\n"


FABRIC_RUNNER = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from fabric import Connection
port, key, jobs = int(sys.argv[1]), sys.argv[2], json.loads(open(sys.argv[3]).read())
def one(script):
    with Connection("127.0.0.1", user="root", port=port, connect_kwargs={
            "key_filename": key, "look_for_keys": False, "allow_agent": False}) as c:
        c.run(script, hide=True, in_stream=False)
with ThreadPoolExecutor(len(jobs)) as pool:
    list(pool.map(one, jobs))
"""


def fabric_cmd(server, roots: list[Path]) -> list[str]:
    jobs = WORK / "fabric_jobs.json"
    jobs.write_text(json.dumps([fabric_script(str(r)) for r in roots]))
    return [str(VENV / "bin" / "python"), "-c", FABRIC_RUNNER, str(server.port), str(server.key), str(jobs)]


TOOLS = {"xenrun": xenrun_cmd, "fabric": fabric_cmd, "pyinfra": pyinfra_cmd, "ansible": ansible_cmd}


# -- running ---------------------------------------------------------------------------------

def check_done(roots: list[Path]) -> str:
    """Whether every host ended up with the job done (a short reason if not)."""
    for root in roots:
        for path, content in job.FILES.items():
            if (root / path.lstrip("/")).read_text() != content:
                return f"{root.name}: {path} differs"
        if job.FSTAB_LINE not in (root / "etc/fstab").read_text().splitlines():
            return f"{root.name}: no fstab line"
        if os.readlink(root / job.LINK[0].lstrip("/")) != job.LINK[1]:
            return f"{root.name}: no link"
        if not all((root / c.lstrip("/")).exists() for _, c in job.COMMANDS):
            return f"{root.name}: a command did not run"
        st = (root / job.IMAGE.lstrip("/")).stat()
        if st.st_size != job.IMAGE_SIZE or st.st_blocks > 64:
            return f"{root.name}: image is not a 10 GiB sparse file"
    return "ok"


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1", "LC_ALL": "C.UTF-8",
           "ANSIBLE_LOCAL_TEMP": str(WORK / "ansible-tmp"), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the tool's own CPU (its forked workers included: they are waited for)
    r.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - started, r


def round_trips(r: subprocess.CompletedProcess) -> tuple[int, int] | None:
    """xenrun's most round trips and SFTP requests on one host, from its JSON."""
    try:
        hosts = json.loads(r.stdout)["hosts"]
    except (ValueError, KeyError):
        return None
    trips = [h["round_trips"].get("command", 0) + h["round_trips"].get("sftp_waits", 0) for h in hosts]
    return max(trips), max(h["round_trips"].get("sftp", 0) for h in hosts)


def xenrun_detail(r: subprocess.CompletedProcess) -> str:
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return "no JSON"
    hosts = data["hosts"]
    # a round trip: a shell request ("command") or a wait for SFTP answers ("sftp_waits":
    # one request, or a pipeline of them; "sftp" counts the requests themselves)
    trips = [h["round_trips"].get("command", 0) + h["round_trips"].get("sftp_waits", 0) for h in hosts]
    statuses = data["summary"]["statuses"]
    return (f"{', '.join(f'{n} {s}' for s, n in statuses.items())}; {data['summary']['changed']} changed;"
            f" round trips per host {min(trips)}-{max(trips)} (mean {sum(trips) / len(trips):.0f},"
            f" e.g. {hosts[0]['round_trips']})")


def bench(tool: str, server, n: int) -> dict:
    roots = make_roots(n)
    out = {}
    for label in ("first", "re-run"):
        cmd = TOOLS[tool](server, roots)
        seconds, r = timed(cmd)
        detail = xenrun_detail(r) if tool == "xenrun" else ""
        if r.returncode != 0:
            detail = f"FAILED (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}"
        out[label] = (seconds, detail)
        out[label + " cpu"] = r.cpu / n
        if tool == "xenrun":
            out[label + " trips"] = round_trips(r)
    out["done"] = check_done(roots)
    return out


# issue 16's goals: (what, xenrun's figure, the bound it must stay under)
def goals(results: dict, runs: dict, slow: dict, sizes: list[int]) -> list[tuple[str, float | None, float]]:
    def ratio(tool, n, label):
        if ("xenrun", n) not in results or (tool, n) not in results:
            return None
        return results["xenrun", n][label][0] / results[tool, n][label][0]

    def cpu(tool, n):
        if not runs.get((tool, n)):
            return None
        return statistics.median(r["first cpu"] for r in runs[tool, n])

    def slope(tool):
        lo, hi = min(sizes), max(sizes)
        if hi == lo or (tool, lo) not in results or (tool, hi) not in results:
            return None
        return (results[tool, hi]["first"][0] - results[tool, lo]["first"][0]) / (hi - lo)

    n = 30 if 30 in sizes else max(sizes)
    trips = [r.get("first trips") for r in runs.get(("xenrun", n), []) if r.get("first trips")]
    again = [r.get("re-run trips") for r in runs.get(("xenrun", n), []) if r.get("re-run trips")]
    out = [
        (f"{n} hosts, first run, xenrun / Fabric", ratio("fabric", n, "first"), 1.3),
        (f"{n} hosts, first run, xenrun / pyinfra", ratio("pyinfra", n, "first"), 0.33),
        (f"{n} hosts, re-run, xenrun / Fabric", ratio("fabric", n, "re-run"), 1.2),
        (f"{max(sizes)} hosts, root's real .bashrc, first run, xenrun / Fabric",
         slow["xenrun"]["first"][0] / slow["fabric"]["first"][0] if {"xenrun", "fabric"} <= set(slow) else None, 1.5),
        ("round trips per host, first run", max(t[0] for t in trips) if trips else None, 8),
        ("round trips per host, re-run", max(t[0] for t in again) if again else None, 2),
        (f"client CPU per host, first run, {n} hosts, xenrun / Fabric",
         cpu("xenrun", n) / cpu("fabric", n) if cpu("xenrun", n) and cpu("fabric", n) else None, 1.3),
        (f"seconds per extra host ({min(sizes)} to {max(sizes)}), xenrun / Fabric",
         slope("xenrun") / slope("fabric") if slope("xenrun") and slope("fabric") else None, 1.3),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,30")
    parser.add_argument("--tools", default="xenrun,fabric,pyinfra,ansible")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each tool and size, taken in turns; the medians are compared")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tools = args.tools.split(",")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    os.environ["XENRUN_KNOWN_HOSTS"] = str(WORK / "known_hosts")  # this run's servers, not root's file
    if {"pyinfra", "ansible", "fabric"} & set(tools):
        ensure_venv()
    # xenrun's bytecode, as a package install has it (pip compiles it; the other
    # tools' packages have theirs): this checkout is an editable install, and
    # PYTHONDONTWRITEBYTECODE (set on these machines) would have every run compile it
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "xenrun"), str(HERE / "job.py"),
                    str(HERE / "benchjob.py")], check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    plain, norc = start_servers()
    results: dict = {}
    try:
        print(f"tools: xenrun (this checkout, {sys.executable}); {versions()}; {os.cpu_count()} CPUs,"
              f" load average {os.getloadavg()[0]:.1f} (other work on the machine skews every figure alike)")
        print("sshd with root's .bashrc bound to an empty file (pyenv init not paid):")
        print(f"medians of {args.repeat} runs each, taken in turns (range in brackets)")
        print(f"{'tool':<8} {'hosts':>5} {'first run':>22} {'re-run':>22}  job done  notes")
        every: dict = {}
        for n in sizes:
            runs: dict = {tool: [] for tool in tools}
            for _ in range(args.repeat):
                for tool in tools:
                    runs[tool].append(bench(tool, norc, n))
            for tool in tools:
                every[tool, n] = runs[tool]
                res = results[tool, n] = {label: (statistics.median(r[label][0] for r in runs[tool]),
                                                  runs[tool][-1][label][1],
                                                  min(r[label][0] for r in runs[tool]),
                                                  max(r[label][0] for r in runs[tool]))
                                          for label in ("first", "re-run")}
                done = next((r["done"] for r in runs[tool] if r["done"] != "ok"), "ok")
                first, again = res["first"], res["re-run"]
                cpu = statistics.median(r["first cpu"] for r in runs[tool]) * 1000
                print(f"{tool:<8} {n:>5} {first[0]:>7.2f} s [{first[2]:.2f}-{first[3]:.2f}]"
                      f" {again[0]:>7.2f} s [{again[2]:.2f}-{again[3]:.2f}]  {done:<8}"
                      f"  CPU {cpu:.0f} ms/host; {first[1]}{' | re-run: ' + again[1] if again[1] else ''}", flush=True)
        biggest = max(sizes)
        print(f"\nplain sshd: root's real .bashrc (pyenv init) runs for every session sshd starts,"
              f" {biggest} hosts:")
        slow: dict = {}
        for tool in [t for t in ("xenrun", "fabric") if t in tools]:
            res = slow[tool] = bench(tool, plain, biggest)
            print(f"{tool:<8} {biggest:>5} {res['first'][0]:>8.2f} s {res['re-run'][0]:>6.2f} s  {res['done']:<8}"
                  f"  {res['first'][1]}", flush=True)
        print("\n(xenrun: one SSH connection per host with a persistent shell, started through the login shell,"
              " which also carries the files it writes, so .bashrc runs once per host (an SFTP session, a second"
              " run of it, only on a host lacking base64, mv -T or sync FILE); the Fabric script: one exec per"
              " host; pyinfra and Ansible: one per command or module)")
        if "xenrun" in tools:
            print("\nissue 16's goals (medians of this run):")
            for what, figure, bound in goals(results, every, slow, sizes):
                verdict = "not measured" if figure is None else "met" if figure <= bound else "NOT met"
                shown = "-" if figure is None else f"{figure:.2f}"
                print(f"  {what}: {shown} (goal <= {bound:g})  -> {verdict}")
            for tool in tools:
                lo, hi = min(sizes), max(sizes)
                if hi > lo:
                    per = (results[tool, hi]["first"][0] - results[tool, lo]["first"][0]) / (hi - lo)
                    print(f"  {tool}: {per * 1000:.1f} ms per extra host on a first run ({lo} to {hi} hosts)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        plain.stop()
        norc.stop()


if __name__ == "__main__":
    main()
