"""Time from `xenrun boot-check` start to dom0 up, per boot path, on the example
hosts given Debian 12's Xen 4.17, a dom0 kernel and a busybox initramfs (as the
tests do). Prints wall time of the whole command and where the time goes (the
stages boot-check reports). Asserts nothing.

Run: .venv/bin/python benchmarks/boot_check.py [grub syslinux uefi]
Hand-measured references: GRUB about 28 s, Syslinux about 21 s, UEFI about 63 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import boot_sites, xenpkgs  # noqa: E402

PATHS = {"grub": ("debian-grub", None), "syslinux": ("arch-syslinux", False), "uefi": ("arch-uefi", True)}
REFERENCE = {"grub": 28, "syslinux": 21, "uefi": 63}


def main() -> None:
    kinds = sys.argv[1:] or list(PATHS)
    t0 = time.perf_counter()
    debian = xenpkgs.fetch()
    with tempfile.TemporaryDirectory() as tmp:
        debian["initrd"] = xenpkgs.make_busybox_initramfs(Path(tmp) / "initrd.gz")
        print(f"packages and initramfs ready in {time.perf_counter() - t0:.1f} s")
        for kind in kinds:
            host, efi = PATHS[kind]
            site = Path(tmp) / kind
            shutil.copytree(REPO / "examples", site, symlinks=True)
            if kind == "grub":
                boot_sites.real_debian_grub(site, debian)
            else:
                boot_sites.real_arch(site, host, debian, efi)
            for until in ("kernel", "userspace"):
                start = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "xenrun", "boot-check", "--config", str(site / "plugins.toml"),
                                    "--host", host, "--until", until, "--format", "json"], capture_output=True, text=True)
                wall = time.perf_counter() - start
                out = json.loads(r.stdout) if r.stdout.strip() else {"ok": False, "stages": {}, "reason": r.stderr}
                stages = ", ".join(f"{k} {v:.1f}" for k, v in out["stages"].items())
                print(f"{kind:8} until {until:9}: {'ok' if out['ok'] else 'FAILED'} in {wall:5.1f} s wall"
                      f" (reference {REFERENCE[kind]} s to dom0 up); QEMU: {stages}"
                      + ("" if out["ok"] else f"; {out['reason'][:200]}"))


if __name__ == "__main__":
    main()
