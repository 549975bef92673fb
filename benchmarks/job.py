"""The benchmark's small Xen-host job as plain data, shared by the xenrun plugin
(benchjob.py) and the pyinfra, Ansible and Fabric versions (fleet.py), so every
tool writes the same bytes to the same paths."""

# path -> content
FILES = {
    "/etc/xen/xl.conf": "autoballoon=\"off\"\nlockfile=\"/var/lock/xl\"\n",
    "/etc/modules-load.d/xen.conf": "xen-evtchn\nxen-gntdev\nxen-netback\nxen-blkback\n",
    "/etc/default/xendomains": "XENDOMAINS_SAVE=\nXENDOMAINS_SHUTDOWN=\"--wait\"\n",
    "/etc/xen/bench/dom0.cfg": "dom0_mem=1024M,max:1024M\ndom0_max_vcpus=2\n",
}
FSTAB_LINE = "none /proc/xen xenfs defaults,nofail 0 0"  # xenrun: written by its xen plugin (S13, its XENFS_LINE)
LINK = ("/etc/systemd/system/multi-user.target.wants/xenstored.service", "/usr/lib/systemd/system/xenstored.service")
# argv, the path whose existence says it is done
COMMANDS = [
    (("mkdir", "-p", "/var/lib/xen/dump"), "/var/lib/xen/dump"),
    (("mkdir", "-p", "/var/log/xen"), "/var/log/xen"),
    (("touch", "/etc/xen/bench-ready"), "/etc/xen/bench-ready"),
]
IMAGE, IMAGE_SIZE = "/var/lib/xen/images/bench.img", 10 << 30
GONE = "/etc/udev/rules.d/xend.rules"  # xenrun: its xen plugin makes sure it is absent (S27)
