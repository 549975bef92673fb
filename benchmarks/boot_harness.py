"""Time the three real Xen boot paths (GRUB, Syslinux, UEFI) and show where the time goes.

Run from the repository root:  python benchmarks/boot_harness.py [--cpu MODEL] [--memory MB] [kind ...]

Prints, per path, image build time, seconds to each stage and the time spent
between stages (firmware + loader, Xen until dom0 build, dom0 build, Linux
until userspace).  Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "vm")]

from xenrun import bootcheck  # noqa: E402
from support import xenpkgs  # noqa: E402
from test_bootcheck_qemu import build  # noqa: E402  (same configs as the tests)

SEGMENTS = (
    ("firmware+loader", None, "xen started"),
    ("xen init", "xen started", "dom0 building"),
    # Linux buffers its messages until hvc0 registers, so this segment holds
    # the dom0 build plus early Linux setup.
    ("dom0 build+early linux", "dom0 building", "dom0 kernel"),
    ("linux to userspace", "dom0 kernel", "hypervisor=xen"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kinds", nargs="*", metavar="kind", help=f"any of {', '.join(bootcheck.KINDS)} (default: all)")
    ap.add_argument("--cpu", default=bootcheck.DEFAULT_CPU)
    ap.add_argument("--memory", type=int, default=bootcheck.DEFAULT_MEMORY_MB)
    ap.add_argument("--timeout", type=float, default=240.0)
    args = ap.parse_args()
    for k in args.kinds:
        if k not in bootcheck.KINDS:
            ap.error(f"unknown kind {k!r}")
    args.kinds = args.kinds or list(bootcheck.KINDS)

    missing = bootcheck.qemu_missing()
    if missing:
        print(missing)
        return 1
    t = time.monotonic()
    pkgs = xenpkgs.fetch()
    print(f"packages ready in {time.monotonic() - t:.1f} s (kernel {pkgs['kernel_abi']})")
    print(f"qemu: -cpu {args.cpu} -m {args.memory} -smp 2, TCG")

    with tempfile.TemporaryDirectory(prefix="xenrun-bench-") as tmp:
        tmp = Path(tmp)
        initrd = xenpkgs.make_busybox_initramfs(tmp / "initrd.gz")
        files = bootcheck.BootFiles(xen=pkgs["xen_gz"], xen_efi=pkgs["xen_efi"],
                                    kernel=pkgs["vmlinuz"], initrd=initrd)
        rows = []
        for kind in args.kinds:
            work = tmp / kind
            work.mkdir()
            t = time.monotonic()
            image = build(kind, files, work)
            built = time.monotonic() - t
            r = bootcheck.boot(image, kind, timeout=args.timeout, cpu=args.cpu, memory_mb=args.memory)
            rows.append((kind, built, r))
            print(f"\n{kind}: build {built:.2f} s, boot {r.seconds:.1f} s, ok={r.ok}"
                  + ("" if r.ok else f" ({r.reason.splitlines()[0]})"))
            for name, stamp in r.marker_seconds.items():
                print(f"  {name:<22} at {stamp:6.1f} s")
            for label, a, b in SEGMENTS:
                if b in r.marker_seconds and (a is None or a in r.marker_seconds):
                    d = r.marker_seconds[b] - (r.marker_seconds[a] if a else 0.0)
                    print(f"  {label:<22} {d:6.1f} s")

        print("\nsummary (seconds to dom0 userspace, build excluded)")
        for kind, built, r in rows:
            print(f"  {kind:<9} {r.seconds:6.1f}{'' if r.ok else '  FAILED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
