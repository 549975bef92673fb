"""How long `xenrun setup --dry` takes on an example host, as a whole process,
against the import floor `python -c "import invoke, pluggy, structlog"`; and an
idempotent re-run (apply, then plan again) against the first plan.

Run: .venv/bin/python benchmarks/plan.py [--runs N]. Prints figures; asserts nothing.

Every process runs with its bytecode cached, as in an installed xenrun (pip compiles
it): PYTHONDONTWRITEBYTECODE, set on this project's machines, is dropped, so the
warm-up run writes the .pyc files the timed runs read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv, runs: int) -> float:
    """Median wall time of ``argv`` over ``runs`` runs (after one warm-up)."""
    subprocess.run(argv, capture_output=True, check=True, env=ENV)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, env=ENV)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        shutil.copytree(REPO / "examples", site, symlinks=True)
        xenrun = [py, "-m", "xenrun", "setup", "--config", str(site / "plugins.toml"), "--host", "arch-grub",
                  "--files-only"]  # a machine root in a folder: its commands are left for the host
        floor = timed([py, "-c", "import invoke, pluggy, structlog"], args.runs)
        plan = timed(xenrun + ["--dry"], args.runs)
        subprocess.run(xenrun + ["--yes"], capture_output=True, check=True, env=ENV)
        replan = timed(xenrun + ["--dry"], args.runs)
        rerun = timed(xenrun + ["--yes"], args.runs)
    print(f"import floor (invoke, pluggy, structlog): {floor * 1000:7.1f} ms")
    print(f"xenrun setup --dry, first plan:           {plan * 1000:7.1f} ms  ({plan / floor:.2f}x floor; issue 16: <= 1.3x)")
    print(f"xenrun setup --dry, after apply:          {replan * 1000:7.1f} ms  ({replan / plan:.2f}x first plan)")
    print(f"xenrun setup --yes, nothing to do:        {rerun * 1000:7.1f} ms  ({rerun / plan:.2f}x first plan; target <= 1x)")
    print(f"(median of {args.runs} runs each, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
