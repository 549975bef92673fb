"""The facts parsers, on real samples."""

from pathlib import Path

from support.helpers import REPO
from xenrun import facts as parse

SAMPLES = REPO / "tests" / "samples"


def test_intel_vtx_cpuinfo():
    f = parse.parse_cpuinfo((SAMPLES / "cpuinfo-intel-vtx.txt").read_text())
    assert f["hvm"] == "vmx" and f["cpus"] == 4 and f["cpu_vendor"] == "GenuineIntel"
    assert "ept" in f["cpu_flags"]


def test_amd_v_cpuinfo():
    f = parse.parse_cpuinfo((SAMPLES / "cpuinfo-amd-v.txt").read_text())
    assert f["hvm"] == "svm" and f["cpus"] == 2 and f["cpu_vendor"] == "AuthenticAMD"


def test_cpuinfo_under_xen_has_no_hvm_flag():
    f = parse.parse_cpuinfo((SAMPLES / "cpuinfo-xen-dom0.txt").read_text())
    assert f["hvm"] is None and "hypervisor" in f["cpu_flags"]


def test_this_machines_cpuinfo():
    text = (SAMPLES / "cpuinfo-this-machine.txt").read_text()
    f = parse.parse_cpuinfo(text)
    assert f["cpus"] == text.count("processor\t:") and f["cpus"] >= 1
    assert f["hvm"] == ("vmx" if " vmx" in text else "svm" if " svm" in text else None)
    live = parse.parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    assert live["cpus"] >= 1


def test_hypervisor_state():
    assert parse.hypervisor_state("xen\n", "control_d\n") == {"xen_running": True, "xen_dom0": True, "xen_domu": False}
    assert parse.hypervisor_state(None, None) == {"xen_running": False, "xen_dom0": False, "xen_domu": False}
    assert parse.hypervisor_state("xen", "") == {"xen_running": True, "xen_dom0": False, "xen_domu": True}
    # a guest without xenfs mounted cannot be told from a host that has not booted Xen
    assert parse.hypervisor_state("xen", None) == {"xen_running": True, "xen_dom0": False, "xen_domu": False}


def test_os_release():
    text = 'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n# comment\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
    assert parse.parse_os_release(text) == {"name": "Debian GNU/Linux", "version_id": "12", "id": "debian",
                                            "pretty_name": "Debian GNU/Linux 12 (bookworm)"}
    assert parse.parse_os_release(Path("/etc/os-release").read_text())["id"]


def test_meminfo_and_route():
    assert parse.parse_meminfo("MemTotal:       16318480 kB\nMemFree: 1 kB\n") == 15936
    route = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
             "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
             "eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
             "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert parse.parse_default_route(route) == "eth0"
    assert parse.parse_default_route(route.splitlines()[0]) is None


def test_cmdline_fstab_modules():
    c = parse.parse_cmdline("BOOT_IMAGE=/vmlinuz-linux root=UUID=abc rw quiet initrd=\\x.img\n")
    assert c == {"root": "UUID=abc", "options": ["rw", "quiet"]}
    fstab = parse.parse_fstab("# c\nUUID=1 / ext4 rw 0 1\nUUID=2 /boot vfat rw 0 2 # esp\n\n")
    assert [e["file"] for e in fstab] == ["/", "/boot"] and fstab[1]["vfstype"] == "vfat"
    assert parse.parse_modules("vboxdrv 1 0 - Live 0x0\next4 2 1 - Live 0x0\n") == ["vboxdrv", "ext4"]


def test_packages():
    status = ("Package: xen-system-amd64\nStatus: install ok installed\nVersion: 4.17.3+10\n\n"
              "Package: grub-pc\nStatus: deinstall ok config-files\nVersion: 2.06\n")
    assert parse.parse_dpkg_status(status) == {"xen-system-amd64": "4.17.3+10"}
    assert parse.parse_pacman_local(["xen-4.5.0-2", "grub-1:2.02.beta2-5", "ALPM_DB_VERSION"]) == {
        "xen": "4.5.0-2", "grub": "1:2.02.beta2-5"}
    if Path("/var/lib/dpkg/status").exists():
        assert "dpkg" in parse.parse_dpkg_status(Path("/var/lib/dpkg/status").read_text())


def test_vgs_json():
    text = '{"report": [{"vg": [{"vg_name": "vg0", "vg_size": "21470642176", "vg_free": "10733223936"}]}]}'
    assert parse.parse_vgs_json(text) == [{"name": "vg0", "size": 21470642176, "free": 10733223936}]
