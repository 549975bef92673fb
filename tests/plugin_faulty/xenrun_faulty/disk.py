"""A disk plugin whose hook can fail (selected by the tests in place of the builtin
image plugin, so that the examples' domains.toml names it)."""

from xenrun.api import DomainDisk, Setting, SparseFile, checks, hookimpl

from xenrun_faulty.fault import maybe


@hookimpl
def declare_disk_keys():
    return {"image": {"size": Setting(checks.size, required=True)}}


@hookimpl
def create_domain(facts, host, domain, disk):
    return maybe("create_domain", DomainDisk(changes=[SparseFile(f"/var/lib/xen/images/{domain.name}.img",
                                                                 disk.options["size"])], entry="file:/x.img,xvda,w"))
