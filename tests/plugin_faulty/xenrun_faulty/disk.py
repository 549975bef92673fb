"""A disk plugin whose hook can fail (selected in place of a builtin by the tests:
domains.toml's backends are a closed list today)."""

from xenrun.api import DomainDisk, SparseFile, hookimpl

from xenrun_faulty.fault import maybe


@hookimpl
def create_domain(facts, host, domain, disk):
    return maybe("create_domain", DomainDisk(changes=[SparseFile(f"/var/lib/xen/images/{domain.name}.img",
                                                                 disk.size)], entry="file:/x.img,xvda,w"))
