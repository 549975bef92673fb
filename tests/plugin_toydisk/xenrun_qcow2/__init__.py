"""qcow2: guest disks as qcow2 images made by ``qemu-img create``, a disk backend the
core does not know. It declares its own keys (size, path, cluster), plans the
command that makes the image, and tells xl to read it through qdisk
(``format=qcow2,...``). One file: what docs/plugins.md says a disk plugin needs."""

from xenrun.api import DomainDisk, RunCommand, Setting, checks, hookimpl

NAME = "qcow2"


def _cluster(value) -> int:
    n = checks.size(value)
    if n & (n - 1) or not 512 <= n <= 2 << 20:
        raise ValueError(f"{value!r}: a qcow2 cluster is a power of two from 512 to 2M")
    return n


@hookimpl
def declare_disk_keys():
    return {NAME: {
        "size": Setting(checks.size, None, "the virtual size, e.g. \"10G\"", required=True),
        "path": Setting(checks.absolute_path, None, "the image (default: /var/lib/xen/images/NAME-VDEV.qcow2)"),
        "cluster": Setting(_cluster, 64 << 10, "the qcow2 cluster size"),
    }}


@hookimpl
def create_domain(facts, host, domain, disk):
    if disk.backend != NAME:
        return None
    path = disk.options["path"] or f"/var/lib/xen/images/{domain.name}-{disk.vdev}.qcow2"
    argv = ("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={disk.options['cluster']}",
            path, str(disk.options["size"]))
    access = "rw" if disk.access == "w" else "ro"
    return DomainDisk(changes=[RunCommand(argv, creates=path, step="S16", why=f"disk {disk.vdev} of {domain.name}")],
                      entry=f"format=qcow2,vdev={disk.vdev},access={access},target={path}",
                      remove=("rm", "-f", "--", path))
