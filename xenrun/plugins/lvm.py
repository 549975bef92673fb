"""lvm: guest disks as LVM logical volumes (S16), faster than image files.

``lvcreate`` makes NAME (or NAME-VDEV for further disks) in the volume group of the
disk (``vg``) or of the plugin's setting; xl sees it as ``phy:/dev/VG/LV,VDEV,w``.
Free space is checked from the facts before planning (``vgs``, gathered by the
facts plugin); where it cannot be known (a --root folder without LVM) the plan
says so instead. A volume is never removed, shrunk or resized by xenrun: a volume
of another size than the spec is reported, with what to run by hand."""

from __future__ import annotations

import json

from xenrun.api import hookimpl, checks as check, RunCommand, DomainDisk, Setting

NAME = "lvm"
_GIB = 1 << 30


@hookimpl
def declare_settings():
    return {NAME: {"vg": Setting(check.name, None, "the volume group guest volumes go in, e.g. \"vg0\"")}}


@hookimpl
def declare_disk_keys():
    return {NAME: {
        "size": Setting(check.size, None, "the volume's size, e.g. \"20G\"", required=True),
        "vg": Setting(check.name, None, "the volume group (default: [plugin.lvm] vg)"),
        "lv": Setting(check.name, None, "the volume's name (default: NAME, NAME-VDEV for further disks)"),
    }}


def volume_name(domain, disk) -> str:
    """The disk's ``lv``, else NAME for the first disk and NAME-VDEV for the others."""
    if disk.options.get("lv"):
        return disk.options["lv"]
    return domain.name if domain.disks[0].vdev == disk.vdev else f"{domain.name}-{disk.vdev}"


@hookimpl
def detect_hardware(probe):
    """The logical volumes that exist, so a second run knows a volume is there
    (and its size) without counting it against the free space again."""
    out = probe.command(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                         "-o", "vg_name,lv_name,lv_size"])
    return {"logical_volumes": parse_lvs(out) if out else None}


def parse_lvs(text: str) -> list[dict]:
    """``lvs --reportformat json --units b --nosuffix -o vg_name,lv_name,lv_size``
    -> [{vg, name, size}] in bytes."""
    data = json.loads(text)
    return [{"vg": lv["vg_name"], "name": lv["lv_name"], "size": int(float(lv["lv_size"]))}
            for report in data.get("report", []) for lv in report.get("lv", [])]


@hookimpl
def create_domain(facts, host, domain, disk):
    if disk.backend != NAME:
        return None
    vg = disk.options.get("vg") or host.settings[NAME]["vg"]
    lv, size = volume_name(domain, disk), disk.options["size"]
    if vg is None:
        raise domain.disk_error(disk, "vg", "no volume group: give vg here or [plugin.lvm] vg in plugins.toml")
    device = f"/dev/{vg}/{lv}"
    entry = f"phy:{device},{disk.vdev},{disk.access}"
    notes = []
    groups = facts.get("volume_groups")
    volumes = facts.get("logical_volumes")
    existing = next((v for v in volumes or [] if v["vg"] == vg and v["name"] == lv), None)
    if existing is not None:
        if existing["size"] != size:
            notes.append(f"{domain.name}: {vg}/{lv} exists with {_human(existing['size'])}, the spec says"
                         f" {_human(size)}; xenrun never resizes volumes (back up first, then"
                         f" `lvextend -L {size}b {device}` and grow the filesystem inside)")
        return DomainDisk(changes=[], entry=entry, notes=notes, remove=("lvremove", "-f", device))
    if groups is None:
        notes.append(f"{domain.name}: free space in {vg} unknown here (vgs cannot run on this target);"
                     f" lvcreate will check {_human(size)} on the host")
    else:
        group = next((g for g in groups if g["name"] == vg), None)
        if group is None:
            known = ", ".join(g["name"] for g in groups) or "none"
            raise domain.disk_error(disk, "vg", f"no volume group {vg!r} on {host.name} (volume groups: {known})")
        if group["free"] < size:
            raise domain.disk_error(disk, "size", f"{_human(size)} does not fit: volume group {vg} has"
                                                   f" {_human(group['free'])} free")
    change = RunCommand(("lvcreate", "--yes", "--name", lv, "--size", f"{size}b", vg),
                        creates=device, step="S16", why=f"disk {disk.vdev} of {domain.name} (logical volume)")
    return DomainDisk(changes=[change], entry=entry, notes=notes, remove=("lvremove", "-f", device))


def _human(n: int) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n >> 20} MiB"
