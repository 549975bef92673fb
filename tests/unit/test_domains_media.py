"""Guest media: the ISO's label and PV kernel read from a real ISO 9660 image (no
mount), sparse disk images, the guest's mkinitcpio.conf read from a real ext4
image (no mount), and the lvm plugin's free-space checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.helpers import run_xenrun, tree_hash
from xenrun import guestmedia as media
from xenrun.domains import parse_domains, with_disk_keys
from xenrun.guestmedia import Iso9660, guest_notes, mkinitcpio_missing, partition_offsets
from xenrun.errors import ConfigError
from xenrun.facts import Facts
from xenrun.targets.local import LocalTarget

MKISOFS = shutil.which("xorriso") or shutil.which("genisoimage")
needs_iso_tool = pytest.mark.skipif(MKISOFS is None, reason="needs xorriso or genisoimage (apt-get install xorriso)")
needs_e2fs = pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs")),
                                reason="needs e2fsprogs (mkfs.ext4, debugfs)")
KERNEL = b"\x7fKERNEL" + os.urandom(5000)
INITRAMFS = os.urandom(70000)


def make_iso(tmp: Path, label: str = "ARCH_201301", rock_ridge: bool = True, tool: str | None = None,
             kernel_name: str = "vmlinuz", ramdisk_name: str = "archiso.img") -> Path:
    src = tmp / f"iso-src-{label}-{rock_ridge}"
    boot = src / "arch/boot/x86_64"
    boot.mkdir(parents=True)
    (boot / kernel_name).write_bytes(KERNEL)
    (boot / ramdisk_name).write_bytes(INITRAMFS)
    (src / "arch/boot/memtest").write_bytes(b"m")
    out = tmp / f"{label}-{rock_ridge}.iso"
    tool = tool or MKISOFS
    if tool.endswith("xorriso"):
        argv = [tool, "-as", "mkisofs"]
    else:
        argv = [tool]
    argv += ["-quiet", "-V", label, "-o", str(out)] + (["-R", "-J"] if rock_ridge else []) + [str(src)]
    subprocess.run(argv, check=True, capture_output=True)
    return out


def reader(path: Path) -> Iso9660:
    return media.iso_reader(LocalTarget("/"), str(path))


@needs_iso_tool
@pytest.mark.parametrize("label", ["ARCH_201301", "ARCH_202405"])
def test_iso_label_is_read_from_the_image(tmp_path, label):
    iso = reader(make_iso(tmp_path, label))
    assert iso.label == label
    assert media.archiso_extra(iso.label) == f"archisobasedir=arch archisolabel={label}"


@needs_iso_tool
@pytest.mark.parametrize("rock_ridge", [True, False])
def test_iso_files_are_read_without_mounting(tmp_path, rock_ridge):
    iso = reader(make_iso(tmp_path, rock_ridge=rock_ridge))
    assert iso.read("/arch/boot/x86_64/vmlinuz") == KERNEL
    assert iso.read("/arch/boot/x86_64/archiso.img") == INITRAMFS
    assert iso.find("/arch/boot/x86_64/nothing") is None and iso.find("/arch/boot") is None


@pytest.mark.skipif(not shutil.which("genisoimage"), reason="needs genisoimage")
def test_iso_by_genisoimage_with_rock_ridge_names(tmp_path):
    iso = reader(make_iso(tmp_path, tool=shutil.which("genisoimage"), kernel_name="vmlinuz-linux",
                          ramdisk_name="initramfs-linux.img"))
    assert iso.read("/arch/boot/x86_64/vmlinuz-linux") == KERNEL
    assert iso.label == "ARCH_201301"


def test_not_an_iso_is_refused(tmp_path):
    f = tmp_path / "x.iso"
    f.write_bytes(b"\0" * 40000)
    with pytest.raises(ValueError, match="not an ISO 9660"):
        reader(f)


PV_ISO = '''[domain.archpv]
host = "arch-grub"
type = "pv"
memory = "512M"
iso = "/var/lib/xen/iso/arch.iso"
iso_boot = true

[[domain.archpv.disks]]
size = "10G"
'''


def _pv_iso_site(site, tmp_path):
    """arch-grub with an Arch ISO labelled ARCH_201301 and the PV guest archpv
    installed from it: (the host's root, the CLI options for it)."""
    root = site / "hosts/arch-grub"
    (root / "var/lib/xen/iso").mkdir(parents=True)
    shutil.copy(make_iso(tmp_path, "ARCH_201301"), root / "var/lib/xen/iso/arch.iso")
    (site / "domains.toml").write_text(PV_ISO)
    return root, ("--config", site / "plugins.toml", "--host", "arch-grub", "--files-only", "--format", "json")


@needs_iso_tool
def test_pv_install_takes_kernel_and_label_from_the_iso_then_finish_install(site, tmp_path):
    root, args = _pv_iso_site(site, tmp_path)
    r = run_xenrun("domain.create", "archpv", *args, "--yes")
    assert r.returncode == 0, r.stderr
    cfg = (root / "etc/xen/archpv.cfg").read_text()
    assert cfg.startswith('name = "archpv"\nkernel = "/var/lib/xen/boot/archpv/vmlinuz"\n'
                          'ramdisk = "/var/lib/xen/boot/archpv/archiso.img"\n'
                          'extra = "archisobasedir=arch archisolabel=ARCH_201301"\nmemory = 512\n')
    assert '"file:/var/lib/xen/iso/arch.iso,xvdb,r"' in cfg
    assert (root / "var/lib/xen/boot/archpv/vmlinuz").read_bytes() == KERNEL
    assert (root / "var/lib/xen/boot/archpv/archiso.img").read_bytes() == INITRAMFS
    again = json.loads(run_xenrun("domain.create", "archpv", *args, "--dry").stdout)
    assert again["summary"]["changed"] == 0
    r = run_xenrun("domain.finish-install", "archpv", *args, "--yes")
    assert r.returncode == 0, r.stderr
    cfg = (root / "etc/xen/archpv.cfg").read_text()
    assert 'bootloader = "pygrub"' in cfg and "kernel" not in cfg and "arch.iso" not in cfg
    # create after finish-install keeps the installed guest booting from its disk
    after = json.loads(run_xenrun("domain.create", "archpv", *args, "--dry").stdout)
    assert after["summary"]["changed"] == 0, after["plan"]
    assert any("finish-install was applied" in n for n in after["report"]["notes"])


@needs_iso_tool
def test_finish_install_to_pvgrub2_needs_its_image_then_keeps_booting_through_it(site, tmp_path):
    root, args = _pv_iso_site(site, tmp_path)
    assert run_xenrun("domain.create", "archpv", *args, "--yes").returncode == 0
    installing = (root / "etc/xen/archpv.cfg").read_text()
    r = run_xenrun("domain.finish-install", "archpv", *args, "--loader", "pvgrub3", "--yes")
    assert r.returncode == 2 and "--loader 'pvgrub3': one of pygrub, pvgrub2" in r.stderr, r.stderr
    r = run_xenrun("domain.finish-install", "archpv", *args, "--loader", "pvgrub2", "--yes")
    assert r.returncode != 0 and "grub-x86_64-xen.bin does not exist on the host" in r.stderr \
        and "apt-get install grub-xen-host" in r.stderr, r.stderr
    assert (root / "etc/xen/archpv.cfg").read_text() == installing  # nothing changed on either refusal
    pvgrub = root / "usr/lib/grub-xen/grub-x86_64-xen.bin"
    pvgrub.parent.mkdir(parents=True)
    pvgrub.write_bytes(b"GRUB as a PV kernel")
    r = run_xenrun("domain.finish-install", "archpv", *args, "--loader", "pvgrub2", "--yes")
    assert r.returncode == 0, r.stderr
    cfg = (root / "etc/xen/archpv.cfg").read_text()
    assert cfg.startswith('name = "archpv"\nkernel = "/usr/lib/grub-xen/grub-x86_64-xen.bin"\nmemory = 512\n'), cfg
    assert "ramdisk" not in cfg and "extra" not in cfg and "bootloader" not in cfg and "arch.iso" not in cfg
    after = json.loads(run_xenrun("domain.create", "archpv", *args, "--dry").stdout)
    assert after["summary"]["changed"] == 0, after["plan"]
    assert any("kept booting through pvgrub2" in n and "grub-x86_64-xen.bin" in n for n in after["report"]["notes"])
    # and back to pygrub: the pvgrub2 kernel line becomes the bootloader
    r = run_xenrun("domain.finish-install", "archpv", *args, "--yes")
    assert r.returncode == 0, r.stderr
    cfg = (root / "etc/xen/archpv.cfg").read_text()
    assert 'bootloader = "pygrub"' in cfg and "kernel" not in cfg


@needs_iso_tool
def test_iso_without_the_kernel_names_the_paths_tried(site, tmp_path):
    root = site / "hosts/arch-grub"
    (root / "var/lib/xen/iso").mkdir(parents=True)
    shutil.copy(make_iso(tmp_path, kernel_name="bzImage"), root / "var/lib/xen/iso/arch.iso")
    (site / "domains.toml").write_text(PV_ISO)
    r = run_xenrun("domain.create", "archpv", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 2
    assert f"{site / 'domains.toml'}:5: domain.archpv.iso: " in r.stderr and "vmlinuz-linux" in r.stderr


# -- sparse images (S16) ----------------------------------------------------------------------

def test_10_gib_image_allocates_almost_nothing(tmp_path):
    target = LocalTarget(tmp_path)
    target.make_sparse("/domU.img", 10 << 30, 0o600)
    st = (tmp_path / "domU.img").stat()
    assert st.st_size == 10 << 30
    assert st.st_blocks * 512 < 1 << 20


def test_created_guest_image_is_sparse_and_never_truncated(site):
    args = ("--config", site / "plugins.toml", "--host", "arch-grub", "--files-only", "--format", "json")
    r = run_xenrun("domain.create", "arch-hvm", *args, "--yes")
    assert r.returncode == 0, r.stderr
    image = site / "hosts/arch-grub/var/lib/xen/images/arch-hvm.img"
    st = image.stat()
    assert st.st_size == 10 << 30 and st.st_blocks * 512 < 1 << 20 and st.st_mode & 0o777 == 0o600
    with open(image, "r+b") as f:  # the guest wrote something
        f.write(b"guest data")
    text = (site / "domains.toml").read_text()
    (site / "domains.toml").write_text(text.replace('size = "10G"', 'size = "5G"'))
    plan = json.loads(run_xenrun("domain.create", "arch-hvm", *args, "--dry").stdout)
    [disk] = [p for p in plan["plan"] if p["kind"] == "SparseFile"]
    assert disk["action"] == "unchanged" and "never truncated" in disk["reason"]
    (site / "domains.toml").write_text(text.replace('size = "10G"', 'size = "12G"'))
    plan = json.loads(run_xenrun("domain.create", "arch-hvm", *args, "--dry").stdout)
    [disk] = [p for p in plan["plan"] if p["kind"] == "SparseFile"]
    assert disk["action"] == "unchanged" and "not grown unless asked" in disk["reason"]
    (site / "domains.toml").write_text(text.replace('size = "10G"', 'size = "12G"\ngrow = true'))
    r = run_xenrun("domain.create", "arch-hvm", *args, "--yes")
    assert r.returncode == 0, r.stderr
    assert image.stat().st_size == 12 << 30 and image.read_bytes()[:10] == b"guest data"


def test_image_plugin_entries():
    from xenrun.plugins import image
    [d] = parse_domains('[domain.g]\ntype = "pv"\nbootloader = "pygrub"\n[[domain.g.disks]]\nsize = "1G"\n'
                        '[[domain.g.disks]]\nsize = "2G"\npath = "/srv/g-data.img"\n')
    d = with_disk_keys(d, image.declare_disk_keys())
    host = _Host({"image": {"dir": "/var/lib/xen/images/", "syntax": "file"}})
    first = image.create_domain(facts=Facts({}), host=host, domain=d, disk=d.disks[0])
    second = image.create_domain(facts=Facts({}), host=host, domain=d, disk=d.disks[1])
    assert first.entry == "file:/var/lib/xen/images/g.img,xvda,w"
    assert second.entry == "file:/srv/g-data.img,xvdb,w" and second.changes[0].size == 2 << 30
    host.settings["image"]["syntax"] = "target"
    assert image.create_domain(facts=Facts({}), host=host, domain=d, disk=d.disks[0]).entry == \
        "format=raw,vdev=xvda,access=rw,target=/var/lib/xen/images/g.img"


# -- lvm ---------------------------------------------------------------------------------------

class _Host:
    name = "h"

    def __init__(self, settings):
        self.settings = settings


LVM = '''[domain.db]
type = "pv"
bootloader = "pygrub"
[[domain.db.disks]]
backend = "lvm"
vg = "vg0"
size = "20G"
'''


def lvm_answer(facts: dict, text: str = LVM, vg=None):
    from xenrun.plugins import lvm
    [d] = parse_domains(text)
    d = with_disk_keys(d, lvm.declare_disk_keys())
    return lvm.create_domain(facts=Facts(facts), host=_Host({"lvm": {"vg": vg}}), domain=d, disk=d.disks[0])


def test_lvm_plans_lvcreate_when_the_group_has_room():
    answer = lvm_answer({"volume_groups": [{"name": "vg0", "size": 100 << 30, "free": 50 << 30}],
                         "logical_volumes": []})
    assert answer.entry == "phy:/dev/vg0/db,xvda,w"
    [cmd] = answer.changes
    assert cmd.argv == ("lvcreate", "--yes", "--name", "db", "--size", f"{20 << 30}b", "vg0")
    assert cmd.creates == "/dev/vg0/db"


def test_lvm_short_of_space_is_a_clear_error():
    with pytest.raises(ConfigError, match="20.0 GiB does not fit: volume group vg0 has 5.0 GiB free") as e:
        lvm_answer({"volume_groups": [{"name": "vg0", "size": 100 << 30, "free": 5 << 30}], "logical_volumes": []})
    assert e.value.key == "domain.db.disks[0].size" and e.value.line == 7


def test_lvm_unknown_group_and_unknown_free_space():
    with pytest.raises(ConfigError, match="no volume group 'vg0'.*vgdata"):
        lvm_answer({"volume_groups": [{"name": "vgdata", "size": 1, "free": 1}], "logical_volumes": []})
    answer = lvm_answer({"volume_groups": None, "logical_volumes": None})
    assert "free space in vg0 unknown" in answer.notes[0] and answer.changes[0].argv[0] == "lvcreate"


def test_lvm_existing_volume_is_never_resized():
    answer = lvm_answer({"volume_groups": [{"name": "vg0", "size": 100 << 30, "free": 0}],
                         "logical_volumes": [{"vg": "vg0", "name": "db", "size": 10 << 30}]})
    assert answer.changes == () and "never resizes" in answer.notes[0]


def test_lvm_group_from_the_plugin_setting():
    answer = lvm_answer({"volume_groups": None, "logical_volumes": None}, LVM.replace('vg = "vg0"\n', ""), vg="vgx")
    assert answer.entry == "phy:/dev/vgx/db,xvda,w"


def test_parse_lvs_json():
    from xenrun.plugins.lvm import parse_lvs
    text = ('{"report": [{"lv": [{"vg_name": "vg0", "lv_name": "root", "lv_size": "21474836480"},'
            ' {"vg_name": "vg0", "lv_name": "db", "lv_size": "1073741824"}]}]}')
    assert parse_lvs(text) == [{"vg": "vg0", "name": "root", "size": 20 << 30},
                               {"vg": "vg0", "name": "db", "size": 1 << 30}]


# -- the guest's mkinitcpio (S20, S26) -------------------------------------------------------------

def make_guest_disk(tmp: Path, modules: str, grub: bool = True) -> Path:
    tree = tmp / "guest-root"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/mkinitcpio.conf").write_text(f"# vim:set ft=sh\n{modules}\nBINARIES=()\nHOOKS=(base udev)\n")
    if grub:
        (tree / "boot/grub").mkdir(parents=True)
        (tree / "boot/grub/grub.cfg").write_text("menuentry 'Arch' {}\n")
    image = tmp / "guest.img"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True, capture_output=True)
    return image


@pytest.mark.parametrize("text,missing", [
    ("MODULES=()", ["xen-blkfront", "xen-fbfront", "xen-netfront", "xen-kbdfront"]),
    ("MODULES=(xen-blkfront xen-fbfront xen-netfront xen-kbdfront)", []),
    ('MODULES="xen_blkfront xen-fbfront"\n', ["xen-netfront", "xen-kbdfront"]),
    ("#MODULES=(xen-blkfront xen-fbfront xen-netfront xen-kbdfront)\nMODULES=(ext4)", media.GUEST_MODULES),
])
def test_mkinitcpio_missing(text, missing):
    assert mkinitcpio_missing(text) == list(missing)


@needs_e2fs
def test_guest_disk_is_read_without_mounting(tmp_path):
    image = make_guest_disk(tmp_path, "MODULES=(xen-blkfront xen-netfront)")
    assert b"MODULES=(xen-blkfront xen-netfront)" in media.read_guest_file(image, "/etc/mkinitcpio.conf")
    assert media.read_guest_file(image, "/etc/nothing") is None
    [d] = parse_domains(LVM)
    notes = guest_notes(d, [str(image)])
    assert len(notes) == 1 and "lacks xen-fbfront, xen-kbdfront" in notes[0] and "mkinitcpio -P" in notes[0]


@needs_e2fs
def test_finish_install_reports_the_guests_missing_modules(site, tmp_path):
    args = ("--config", site / "plugins.toml", "--host", "arch-grub", "--files-only", "--format", "json")
    (site / "domains.toml").write_text((site / "domains.toml").read_text().replace('size = "8G"', 'size = "32M"'))
    assert run_xenrun("domain.create", "arch-pv", *args, "--yes").returncode == 0
    image = make_guest_disk(tmp_path, "MODULES=()", grub=False)
    shutil.copy(image, site / "hosts/arch-grub/var/lib/xen/images/arch-pv.img")
    before = tree_hash(site)
    r = run_xenrun("domain.finish-install", "arch-pv", *args, "--dry")
    # without a grub.cfg in the guest, pygrub would boot nothing: refused, nothing touched
    assert r.returncode == 2 and "no /boot/grub/grub.cfg in the guest's disk" in r.stderr, r.stderr
    assert tree_hash(site) == before
    shutil.copy(make_guest_disk(tmp_path / "with-grub", "MODULES=()", grub=True),
                site / "hosts/arch-grub/var/lib/xen/images/arch-pv.img")
    r = run_xenrun("domain.finish-install", "arch-pv", *args, "--dry")
    assert r.returncode == 0, r.stderr
    notes = json.loads(r.stdout)["report"]["notes"]
    assert any("lacks xen-blkfront, xen-fbfront, xen-netfront, xen-kbdfront" in n for n in notes), notes


def test_partition_offsets_of_mbr_and_bare_images():
    assert partition_offsets(b"\0" * 4096) == [0]
    mbr = bytearray(34 * 512)
    mbr[446 + 4] = 0x83
    mbr[446 + 8:446 + 12] = (2048).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    assert partition_offsets(bytes(mbr)) == [2048 * 512]


@needs_e2fs
def test_partitioned_guest_disk(tmp_path):
    if not shutil.which("sfdisk"):
        pytest.skip("needs sfdisk")
    fs = make_guest_disk(tmp_path, "MODULES=(xen-blkfront xen-fbfront xen-netfront xen-kbdfront)")
    disk = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "40M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input=b"2048,,83\n", check=True, capture_output=True)
    with open(disk, "r+b") as out, open(fs, "rb") as src:
        out.seek(2048 * 512)
        out.write(src.read())
    [d] = parse_domains(LVM)
    assert "has the Xen front-end modules" in guest_notes(d, [str(disk)])[0]
