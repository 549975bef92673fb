"""A real ``xl create`` inside an emulated Xen host: Xen 4.17 and a Debian 12
dom0 under QEMU (TCG) create a PV guest from an xl config, and the guest's
console shows the disk and NIC it was given.

Slow (one to three minutes per boot): marked ``qemu``.  Needs qemu-system-x86
and busybox-static; Xen, the kernel, the Xen tools and lvm2 are downloaded
with apt-get into the package cache.  The harness is tests/support/xenhost.py.
"""

from __future__ import annotations

import shutil

import pytest

from support import xenhost, xenpkgs
from support.helpers import run_xenrun
from xenrun import bootcheck

pytestmark = pytest.mark.qemu

MAC = "00:16:3e:12:34:56"
IMAGE = "/var/lib/xen/images/guest.img"
IMAGE_MB = 32
LV_MB = 64


def pv_config(disk: str, *, ramdisk_key: str = "ramdisk", kernel: str = xenhost.GUEST_KERNEL) -> str:
    """A PV guest config in the style of the ArchWiki Xen article."""
    return (
        'name = "guest"\n'
        f'kernel = "{kernel}"\n'
        f'{ramdisk_key} = "{xenhost.GUEST_RAMDISK}"\n'
        'extra = "console=hvc0"\n'
        "memory = 128\n"
        "vcpus = 1\n"
        f"disk = ['{disk}']\n"
        f"vif = ['mac={MAC},bridge=xenbr0']\n"
    )


FILE_DISK = f"file:{IMAGE},xvda,w"
# Sparse, made in dom0: a sparse file would be stored in full in the cpio.
MAKE_IMAGE = f"truncate -s {IMAGE_MB}M {IMAGE}\n"


@pytest.fixture(scope="session")
def pkgs() -> dict:
    if shutil.which(bootcheck.QEMU) is None:
        pytest.skip(f"{bootcheck.QEMU} is not installed (apt-get install qemu-system-x86)")
    p = xenpkgs.fetch()
    xenhost.fetch_xen_tools()
    return p


def _explain(run: xenhost.GuestRun) -> str:
    return (f"{run.host.reason if run.host else ''}\n--- guest console ---\n{run.guest_console[-3000:]}"
            f"\n--- dom0 log (tail) ---\n{run.dom0_log[-6000:]}")


def generated_config(site, name: str, disk: str) -> str:
    """The xl config `xenrun domain.create` writes for a PV guest on the example
    host arch-grub (S16, S17, S19), read back from the host's /etc/xen."""
    return generated_config_of_kind(site, name, disk, "pv")


def test_generated_pv_config_with_image_disk_and_vif(pkgs, site, tmp_path):
    cfg = generated_config(site, "imgguest", f'backend = "image"\nsize = "{IMAGE_MB}M"')
    assert 'disk = [ "file:/var/lib/xen/images/imgguest.img,xvda,w" ]' in cfg
    assert "vif = [ 'mac=00:16:3e:12:34:56,bridge=xenbr0' ]" in cfg
    # the image xenrun made sparse on the host, made the same way inside the emulated host
    run = xenhost.run_guest(pkgs, cfg, dom0_setup=f"truncate -s {IMAGE_MB}M /var/lib/xen/images/imgguest.img\n",
                            workdir=tmp_path)
    assert run.problems(disk="xvda", disk_bytes=IMAGE_MB << 20, mac=MAC) == [], _explain(run)
    assert run.nics == {"eth0": MAC}
    assert run.xl_create_rc == 0 and run.xl_create_attempts >= 1
    assert "GUEST-DISK xvda" in run.guest_console


def test_generated_pv_config_on_an_lvm_volume(pkgs, site, tmp_path):
    pv_disk = tmp_path / "pv.img"
    with open(pv_disk, "wb") as f:
        f.truncate(256 << 20)
    setup = (
        # virtio-blk probes asynchronously after insmod.
        "i=0; while [ ! -b /dev/vda ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done\n"
        "pvcreate -y /dev/vda\n"
        "vgcreate vg0 /dev/vda\n"
        f"lvcreate -y -L {LV_MB}M -n lvguest vg0\n"
        "ls -lL /dev/vg0/lvguest\n"
    )
    cfg = generated_config(site, "lvguest", f'backend = "lvm"\nvg = "vg0"\nsize = "{LV_MB}M"')
    assert "phy:/dev/vg0/lvguest,xvda,w" in cfg
    run = xenhost.run_guest(pkgs, cfg, dom0_setup=setup, extra_drives=[pv_disk], workdir=tmp_path)
    assert run.problems(disk="xvda", disk_bytes=LV_MB << 20, mac=MAC) == [], _explain(run)


@pytest.mark.parametrize("broken", ["initrd-key", "missing-kernel"])
def test_broken_config_fails_the_check(pkgs, tmp_path, broken):
    if broken == "initrd-key":
        # xl ignores an unknown `initrd=` key: the guest boots without its
        # initramfs, panics on the root fs and never reports its devices.
        cfg = pv_config(FILE_DISK, ramdisk_key="initrd")
    else:
        cfg = pv_config(FILE_DISK, kernel="/var/lib/xen/images/vmlinuz-missing")
    run = xenhost.run_guest(pkgs, cfg, dom0_setup=MAKE_IMAGE, workdir=tmp_path, guest_wait_seconds=90)
    # The host itself worked; only the guest check fails.
    assert run.host.ok, _explain(run)
    problems = run.problems(disk="xvda", mac=MAC)
    assert problems, _explain(run)
    assert not run.ok and "xvda" not in run.disks
    if broken == "initrd-key":
        assert run.xl_create_rc == 0
        assert "Kernel panic" in run.guest_console or "Unable to mount root" in run.guest_console, _explain(run)
    else:
        assert run.xl_create_rc not in (0, None), _explain(run)


# QEMU's TCG emulates AMD-V: with it Xen enables SVM and dom0 offers HVM
# (virt_caps "pv hvm"), so PVH guests run; HVM guests would also need Xen's device
# model (qemu-system-xen), which the emulated host does not carry.
SVM_CPU = "qemu64,+svm,+npt"
HVM_CHECK = """\
echo XENHOST-VIRT-CAPS: $(xl info | sed -n 's/^virt_caps *: //p')
mkdir -p /var/lib/xen/iso /var/lib/xen/images
truncate -s 16M /var/lib/xen/iso/archlinux-x86_64.iso
truncate -s 64M /var/lib/xen/images/arch-hvm.img
xl create -n /etc/xen/arch-hvm.cfg >/tmp/hvm-dryrun.out 2>&1; echo XENHOST-HVM-DRYRUN-RC=$?
sed 's/^/HVM-DRYRUN| /' /tmp/hvm-dryrun.out | head -200
"""


def test_a_pvh_guest_boots_and_xl_parses_the_hvm_config(pkgs, site, tmp_path):
    """xenrun's PVH config (direct kernel, type = "pvh") runs under xl on an emulated
    CPU with AMD-V, and the example site's HVM config (S18: disk, ISO as hdc, VNC on
    127.0.0.1) is accepted by xl's own parser (``xl create -n``, a dry run)."""
    (site / "hosts/arch-grub/var/lib/xen/iso").mkdir(parents=True, exist_ok=True)
    (site / "hosts/arch-grub/var/lib/xen/iso/archlinux-x86_64.iso").write_bytes(b"stand-in\n")
    examples = (site / "domains.toml").read_text()
    r = run_xenrun("domain.create", "arch-hvm", "--config", site / "plugins.toml", "--host", "arch-grub",
                   "--files-only", "--yes")
    assert r.returncode == 0, r.stderr
    hvm = (site / "hosts/arch-grub/etc/xen/arch-hvm.cfg").read_text()
    assert "type = 'hvm'" in hvm and "hdc:cdrom" in hvm
    (site / "domains.toml").write_text(examples)
    cfg = generated_config_of_kind(site, "pvhguest", f'backend = "image"\nsize = "{IMAGE_MB}M"', "pvh")
    assert 'type = "pvh"' in cfg and "bootloader" not in cfg
    run = xenhost.run_guest(pkgs, cfg, guest_files={"/etc/xen/arch-hvm.cfg": hvm.encode()},
                            dom0_setup=HVM_CHECK + f"truncate -s {IMAGE_MB}M /var/lib/xen/images/pvhguest.img\n",
                            workdir=tmp_path, cpu=SVM_CPU)
    log = run.host.log if run.host else ""
    assert "XENHOST-VIRT-CAPS: pv hvm" in log, _explain(run)
    assert "XENHOST-HVM-DRYRUN-RC=0" in log, _explain(run)
    assert '"is_cdrom": 1' in log and '"listen": "127.0.0.1"' in log  # xl read the ISO and VNC as written
    assert run.problems(disk="xvda", disk_bytes=IMAGE_MB << 20, mac=MAC) == [], _explain(run)
    assert run.xl_create_rc == 0


def generated_config_of_kind(site, name: str, disk: str, kind: str) -> str:
    """The same for a guest of type ``kind`` (the stand-in kernel files: lint checks
    they exist on the host)."""
    root = site / "hosts/arch-grub"
    for path in (xenhost.GUEST_KERNEL, xenhost.GUEST_RAMDISK):
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_bytes(b"stand-in: the emulated host has the real one\n")
    (site / "domains.toml").write_text(xenhost.guest_domain_toml(name, "arch-grub", disk, MAC, kind=kind))
    r = run_xenrun("domain.create", name, "--config", site / "plugins.toml", "--host", "arch-grub",
                   "--files-only", "--yes")
    assert r.returncode == 0, r.stderr
    return (root / f"etc/xen/{name}.cfg").read_text()
