"""The repository's tasks: xenrun's own (`invoke setup --config examples/plugins.toml
--host arch-grub --dry`, ...) and `invoke e2e`, the end-to-end scenario to watch."""

import os
import subprocess
import sys
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from xenrun.tasks import ns as xenrun_tasks

HERE = Path(__file__).resolve().parent


@task(help={"workdir": "where the logs and the VM's overlay go (default: a new folder under the e2e cache)"})
def e2e(c, workdir=None):
    """The article end to end on an emulated Debian 12 machine over SSH (root; 15-30 min)."""
    argv = [sys.executable, "-m", "e2e"] + (["--workdir", workdir] if workdir else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "tests"), str(HERE)])}
    status = subprocess.run(argv, env=env, cwd=HERE).returncode
    if status:
        raise Exit(code=status)


# a collection of its own: xenrun's shared one is left as it is
ns = Collection(e2e, *xenrun_tasks.tasks.values(), *xenrun_tasks.collections.values())
