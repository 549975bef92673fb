"""image: guest disks as sparse image files (S16), as `truncate -s 10G domU.img`.

A new image only has its size set: a 10 GiB disk allocates almost nothing until the
guest writes. An existing image is never truncated or overwritten; it is grown only
when its disk says ``grow = true``. xl sees it as ``file:PATH,VDEV,w`` (the article's
form); ``syntax = "target"`` writes xl's newer key=value form instead
(``format=raw,vdev=xvda,access=rw,target=PATH``), which Xen 4.2 and later read and
which does not depend on the deprecated ``file:`` prefix."""

from __future__ import annotations

from xenrun.api import hookimpl, checks as check, SparseFile, DomainDisk, Setting

NAME = "image"


def _path(value) -> str:
    """An image's own path: absolute, and nothing xl's disk spec would read as a
    separator or a quote."""
    path = check.absolute_path(value)
    if any(c in path for c in ",'\" \t") or path.endswith("/"):
        raise ValueError(f"{path!r} cannot be a disk image's path: no commas, quotes, spaces or trailing '/'")
    return path


@hookimpl
def declare_disk_keys():
    return {NAME: {
        "size": Setting(check.size, None, "the image's size, e.g. \"10G\" (sparse: allocated as the guest writes)",
                        required=True),
        "path": Setting(_path, None, "the image file (default: DIR/NAME.img, DIR/NAME-VDEV.img for further disks)"),
        "grow": Setting(check.boolean, False, "grow an existing, smaller image to size (never shrunk)"),
    }}


@hookimpl
def declare_settings():
    return {NAME: {
        "dir": Setting(check.absolute_path, "/var/lib/xen/images", "the folder new disk images go in"),
        "syntax": Setting(check.choice("file", "target"), "file",
                          "file: the article's file:PATH,VDEV,w; target: xl's format=raw,...,target=PATH"),
    }}


def image_path(host, domain, disk) -> str:
    """Where a disk's image is: its own ``path``, else DIR/NAME.img for the first
    disk and DIR/NAME-VDEV.img for the others."""
    if disk.options.get("path"):
        return disk.options["path"]
    folder = host.settings[NAME]["dir"].rstrip("/")
    first = domain.disks[0].vdev == disk.vdev
    return f"{folder}/{domain.name}.img" if first else f"{folder}/{domain.name}-{disk.vdev}.img"


@hookimpl
def create_domain(facts, host, domain, disk):
    if disk.backend != NAME:
        return None
    path = image_path(host, domain, disk)
    access = "w" if disk.access == "w" else "r"
    if host.settings[NAME]["syntax"] == "target":
        entry = f"format=raw,vdev={disk.vdev},access={'rw' if access == 'w' else 'ro'},target={path}"
    else:
        entry = f"file:{path},{disk.vdev},{access}"
    change = SparseFile(path, disk.options["size"], grow=disk.options["grow"], mode=0o600, step="S16",
                        why=f"disk {disk.vdev} of {domain.name} (sparse image)")
    return DomainDisk(changes=[change], entry=entry, remove=("rm", "-f", "--", path))
