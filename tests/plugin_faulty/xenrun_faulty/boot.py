"""A boot plugin whose hooks can fail."""

from xenrun.api import BootEntry, hookimpl

from xenrun_faulty.fault import maybe


@hookimpl
def configure_boot(facts, host, xen_options):
    return maybe("configure_boot", [])


@hookimpl
def boot_entry(facts, host, xen_options, linux_options):
    return maybe("boot_entry", BootEntry("grub", "", "boot/grub/grub.cfg", {}))


@hookimpl
def promote_xen(facts, host):
    return maybe("promote_xen", [])
