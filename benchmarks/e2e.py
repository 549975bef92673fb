"""The e2e scenario's time, split into image build, boots and steps (issue 6).

Run as root: .venv/bin/python benchmarks/e2e.py [--fresh] [--json]
--fresh builds the disk image from scratch in a new cache folder (debootstrap's
downloads included), as on a machine that keeps nothing between CI runs; without
it the cached image is used when there is one. Prints the table (and with --json
one JSON object); asserts nothing beyond the scenario's own checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", action="store_true", help="build the image from scratch in a new cache folder")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = ap.parse_args()
    fresh = tempfile.mkdtemp(prefix="xenrun-e2e-fresh-") if args.fresh else None
    if fresh:
        os.environ["XENRUN_CACHE"] = fresh
    from e2e import image
    from e2e.scenario import Scenario

    workdir = image.cache_root() / "runs" / time.strftime("bench-%Y%m%d-%H%M%S")
    started = time.monotonic()
    timings = Scenario(workdir).run()
    wall = time.monotonic() - started
    if args.json:
        print(json.dumps({"wall_seconds": round(wall, 1), "fresh_image": bool(fresh),
                          "split": {k: round(timings.total(k), 1) for k in ("image", "boot", "step")},
                          "rows": [{"kind": k, "what": w, "seconds": round(s, 1)} for k, w, s in timings.rows]},
                         indent=2))
    print(f"wall time {wall:.1f} s (image {'built from scratch' if fresh else 'from the cache when present'})")
    if fresh:
        print(f"the fresh cache is left in {fresh}; remove it when done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
