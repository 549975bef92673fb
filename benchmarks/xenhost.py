"""Time the emulated Xen host: initramfs build, Xen+dom0 boot, and `xl create` to the guest's markers.

Run from the repository root:  python benchmarks/xenhost.py [--lvm] [--keep DIR] [--timeout S]

Uses the same harness and PV config as tests/vm/test_xenhost_qemu.py (file: disk
and a vif on xenbr0; --lvm: a logical volume on a second virtual disk).
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "vm")]

from test_xenhost_qemu import FILE_DISK, LV_MB, MAC, MAKE_IMAGE, pv_config  # noqa: E402

from support import xenhost, xenpkgs  # noqa: E402

SEGMENTS = (
    ("firmware+Xen until dom0 kernel", None, "dom0 kernel"),
    ("dom0 kernel to toolstack ready", "dom0 kernel", "dom0 ready"),
    ("dom0 setup script", "dom0 ready", "xl create"),
    ("xl create (build + hotplug)", "xl create", "xl create returned"),
    ("guest boot to its markers", "xl create returned", "guest console"),
    ("console dump + poweroff", "guest console", "done"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lvm", action="store_true", help="phy: disk on an LVM volume instead of a file: image")
    ap.add_argument("--keep", type=Path, help="keep initramfs images and the console log in this folder")
    ap.add_argument("--timeout", type=float, default=480.0)
    ap.add_argument("--xen-options", default=xenhost.XEN_OPTIONS)
    args = ap.parse_args()
    if shutil.which(xenhost.bootcheck.QEMU) is None:
        print(f"{xenhost.bootcheck.QEMU} missing: apt-get install qemu-system-x86")
        return 1

    t = time.monotonic()
    pkgs = xenpkgs.fetch()
    tools = xenhost.fetch_xen_tools()
    xenhost.xen_elf(pkgs)
    print(f"packages ready in {time.monotonic() - t:.1f} s (kernel {pkgs['kernel_abi']}, tools {tools})")

    with tempfile.TemporaryDirectory(prefix="xenhost-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        drives = []
        if args.lvm:
            pv = work / "pv.img"
            with open(pv, "wb") as f:
                f.truncate(256 << 20)
            drives = [pv]
            setup = ("while [ ! -b /dev/vda ]; do sleep 0.5; done\n"
                     f"pvcreate -y /dev/vda && vgcreate vg0 /dev/vda && lvcreate -y -L {LV_MB}M -n guest vg0\n")
            cfg = pv_config("phy:/dev/vg0/guest,xvda,w")
        else:
            setup, cfg = MAKE_IMAGE, pv_config(FILE_DISK)

        t = time.monotonic()
        guest_initrd = xenhost.build_guest_initramfs(work / "guest-initrd.gz", pkgs)
        t_guest = time.monotonic() - t
        script = xenhost.guest_script(setup)
        t = time.monotonic()
        initrd = xenhost.build_dom0_initramfs(work / "dom0-initrd.gz", pkgs, script,
                                              {xenhost.GUEST_CONFIG: cfg.encode()},
                                              guest_initramfs=guest_initrd)
        t_dom0 = time.monotonic() - t
        print(f"guest initramfs: {t_guest:6.1f} s  {guest_initrd.stat().st_size / 1e6:5.1f} MB")
        print(f"dom0 initramfs:  {t_dom0:6.1f} s  {initrd.stat().st_size / 1e6:5.1f} MB")

        host = xenhost.boot_xen_host(pkgs, initrd, drives, args.timeout, xen_options=args.xen_options,
                                     progress=lambda name, s: print(f"  {s:7.1f} s  {name}", flush=True))
        if args.keep:
            (work / "console.log").write_text(host.log)
        console = xenhost.parse_guest_console(host.log)
        print(f"host: ok={host.ok} ({host.reason}); total {host.seconds:.1f} s")
        print("guest:", " | ".join(l for l in console.splitlines() if l.startswith(("GUEST-DISK", "GUEST-NIC"))) or "no markers",
              f"(expected MAC {MAC})")
        m = host.marker_seconds
        print("split:")
        print(f"  {'initramfs build (guest+dom0)':34s} {t_guest + t_dom0:6.1f} s")
        for label, a, b in SEGMENTS:
            if b in m and (a is None or a in m):
                print(f"  {label:34s} {m[b] - (m[a] if a else 0):6.1f} s")
            else:
                print(f"  {label:34s}    n/a")
    return 0 if host.ok and "GUEST-INIT-DONE" in console else 1


if __name__ == "__main__":
    sys.exit(main())
