"""The grub plugin (S7, S10, S14): exact plans for Arch with 09_xen, Arch without it
and Debian with 20_linux_xen; validators that really run; the helper script
against real GRUB tools; idempotency."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from support.helpers import REPO, run_xenrun
from xenrun.changes import EnsureLine, RunCommand, WriteFile
from xenrun.plugins import grub
from xenrun.testing import apply_host, changes_for, plan_host

XEN = 'dom0_mem=512M,max:512M dom0_max_vcpus=2 dom0_vcpus_pin'
ARCH_XEN = f'xsave=1 {XEN}'  # the xen package's own grub.conf has xsave=1: kept


REPO_XEN_CFG = REPO / 'examples/hosts/debian-grub/etc/default/grub.d/xen.cfg'


def _boot_changes(site, host):
    facts, changes = changes_for(site / "plugins.toml", host)
    return facts, [c for c in changes if c.plugin == "grub"]


def test_arch_with_09_xen_golden(site):
    facts, changes = _boot_changes(site, "arch-grub")
    assert changes == [
        EnsureLine("/etc/xen/grub.conf", f'XEN_HYPERVISOR_CMDLINE="{ARCH_XEN}"', replace=r"^\s*#?\s*XEN_HYPERVISOR_CMDLINE=",
                   validate=("sh", "-n", "{}"), step="S7", why="the Xen command line (S14 settings)", plugin="grub"),
        EnsureLine("/etc/default/grub", "GRUB_DEFAULT=saved", replace=r"^\s*#?\s*GRUB_DEFAULT=",
                   validate=("sh", "-n", "{}"), step="S10", why="boot the saved entry (Linux until promoted)",
                   plugin="grub"),
        WriteFile(grub.HELPER, grub.HELPER_SCRIPT, mode=0o755, step="S10", why="finds GRUB's Xen and Linux entries",
                  plugin="grub"),
        RunCommand(("grub-mkconfig", "-o", "/boot/grub/grub.cfg"), onchange=("/etc/xen/grub.conf", "/etc/default/grub"),
                   writes=("/boot/grub/grub.cfg",), unless=(grub.HELPER, "has-xen", "/boot/grub/grub.cfg"),
                   step="S7", why="regenerate grub.cfg with the Xen entries", plugin="grub"),
        RunCommand((grub.HELPER, "keep-linux", "/boot/grub/grub.cfg"), onchange=("/etc/default/grub",),
                   writes=("/boot/grub/grubenv",), step="S10", why="save the Linux entry as the default", plugin="grub"),
        RunCommand((grub.HELPER, "once", "/boot/grub/grub.cfg"), onchange=("/etc/xen/grub.conf",),
                   writes=("/boot/grub/grubenv",), step="S10",
                   why="boot Xen at the next boot only; a failure falls back to Linux", plugin="grub"),
    ]


def test_debian_with_20_linux_xen_golden(site):
    facts, changes = _boot_changes(site, "debian-grub")
    lines = [(c.path, c.line) for c in changes if isinstance(c, EnsureLine)]
    assert lines == [
        ("/etc/default/grub.d/xen.cfg", f'GRUB_CMDLINE_XEN_DEFAULT="{XEN}"'),
        ("/etc/default/grub.d/xen.cfg", "XEN_OVERRIDE_GRUB_DEFAULT=0"),
        ("/etc/default/grub", "GRUB_DEFAULT=saved"),
    ]
    assert changes[0].validate == ("sh", "-n", "{}")  # Debian's xen.cfg is shell grub-script-check rejects
    assert [c.argv for c in changes if isinstance(c, RunCommand)] == [
        ("update-grub",), (grub.HELPER, "keep-linux", "/boot/grub/grub.cfg"), (grub.HELPER, "once", "/boot/grub/grub.cfg")]


def test_arch_without_09_xen_uses_grubs_own_20_linux_xen(site):
    root = site / "hosts/arch-grub"
    (root / "etc/grub.d/09_xen").unlink()
    shutil.copy("/etc/grub.d/20_linux_xen", root / "etc/grub.d/20_linux_xen")
    facts, changes = _boot_changes(site, "arch-grub")
    assert changes[0].path == "/etc/default/grub" and changes[0].line == f'GRUB_CMDLINE_XEN_DEFAULT="{XEN}"'


def test_no_xen_script_is_a_clear_error(site):
    (site / "hosts/arch-grub/etc/grub.d/09_xen").unlink()
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 2 and "no GRUB script makes Xen entries" in r.stderr


@pytest.mark.parametrize("host", ["arch-grub", "debian-grub"])
def test_applied_files_are_exact_valid_and_idempotent(site, host):
    report = apply_host(site / "plugins.toml", host)
    assert report["run"]
    root = site / "hosts" / host
    default = (root / "etc/default/grub").read_text()
    assert re.search(r"^GRUB_DEFAULT=saved$", default, re.M) and "GRUB_DEFAULT=0" not in default
    if host == "arch-grub":
        conf = (root / "etc/xen/grub.conf").read_text()
        assert conf.splitlines()[-1] == f'XEN_HYPERVISOR_CMDLINE="{ARCH_XEN}"' and conf.count("XEN_HYPERVISOR") == 1
        checked = [root / "etc/xen/grub.conf", root / "etc/default/grub"]
    else:
        cfg = (root / "etc/default/grub.d/xen.cfg").read_text()
        assert f'\nGRUB_CMDLINE_XEN_DEFAULT="{XEN}"\n' in cfg and "\nXEN_OVERRIDE_GRUB_DEFAULT=0\n" in cfg
        assert subprocess.run(["sh", "-n", root / "etc/default/grub.d/xen.cfg"]).returncode == 0
        # golden: Debian's own if block is left exactly as the package ships it
        assert cfg.split("\nif ", 1)[1] == (REPO_XEN_CFG.read_text().split("\nif ", 1)[1])
        checked = []
    for f in checked:  # the Arch files pass GRUB's own parser too
        assert subprocess.run(["grub-script-check", f]).returncode == 0
        assert subprocess.run(["sh", "-n", f]).returncode == 0
    # sourced as grub-mkconfig does, the variables read back exactly
    out = subprocess.run(["sh", "-c", '. "$1"; [ -f "$2" ] && . "$2"; printf "%s|%s" "$GRUB_DEFAULT" "${XEN_HYPERVISOR_CMDLINE:-$GRUB_CMDLINE_XEN_DEFAULT}"',
                          "_", root / "etc/default/grub",
                          root / ("etc/xen/grub.conf" if host == "arch-grub" else "etc/default/grub.d/xen.cfg")],
                         capture_output=True, text=True)
    assert out.stdout == f"saved|{ARCH_XEN if host == 'arch-grub' else XEN}"
    facts, outcomes = plan_host(site / "plugins.toml", host)
    assert [o for o in outcomes if o.action == "change"] == []


def test_a_shell_syntax_error_blocks_the_file(site):
    # a stray quote left in /etc/default/grub by hand: the new file fails sh -n
    default = site / "hosts/arch-grub/etc/default/grub"
    default.write_text(default.read_text() + 'GRUB_CMDLINE_LINUX="quiet\n')
    before = default.read_bytes()
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes", "--files-only")
    assert r.returncode == 1 and "sh -n {} rejected the new /etc/default/grub" in r.stderr
    assert default.read_bytes() == before


def test_a_quote_in_options_is_refused_before_anything(site):
    # an option containing a quote would break the sourced file; settings refuse it first
    text = (site / "plugins.toml").read_text() + '\n[hosts.arch-grub.plugin.xen]\noptions = ["a\\"b"]\n'
    (site / "plugins.toml").write_text(text)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 2 and "plugin.xen.options" in r.stderr


def test_grubenv_on_lvm_is_refused_for_boot_once(site):
    fstab = site / "hosts/arch-grub/etc/fstab"
    fstab.write_text(fstab.read_text().replace("UUID=b411dc99-f0a0-4c87-9e05-184977be8539\t/boot", "/dev/mapper/vg0-boot\t/boot"))
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 2 and "grubenv is on /dev/mapper/vg0-boot" in r.stderr and "once" in r.stderr
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text() + "\n[plugin.grub]\nonce = false\n")
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 0 and "grub-xen once" not in r.stdout


GENERATED = """menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-7d0e' {
	linux /boot/vmlinuz root=UUID=7d0e ro
}
menuentry 'Debian GNU/Linux, with Xen hypervisor' --class xen $menuentry_id_option 'xen-gnulinux-simple-7d0e' {
	multiboot2 /boot/xen.gz placeholder dom0_mem=512M,max:512M
}
submenu 'Advanced options for Debian GNU/Linux (with Xen hypervisor)' $menuentry_id_option 'gnulinux-advanced-7d0e' {
}
"""


@pytest.mark.skipif(not shutil.which("grub-reboot"), reason="grub-reboot (grub2-common) not installed")
def test_helper_script_with_real_grub_tools(tmp_path):
    script = tmp_path / "grub-xen"
    script.write_text(grub.HELPER_SCRIPT)
    script.chmod(0o755)
    boot = tmp_path / "boot"
    (boot / "grub").mkdir(parents=True)
    cfg = boot / "grub/grub.cfg"
    cfg.write_text(GENERATED)
    env_list = lambda: subprocess.run(["grub-editenv", boot / "grub/grubenv", "list"],  # noqa: E731
                                      capture_output=True, text=True).stdout
    run = lambda *a: subprocess.run([script, *a, cfg, boot], capture_output=True, text=True)  # noqa: E731
    assert run("has-xen").returncode == 0
    assert run("keep-linux").returncode == 0 and "saved_entry=gnulinux-simple-7d0e" in env_list()
    assert run("once").returncode == 0 and "next_entry=xen-gnulinux-simple-7d0e" in env_list()
    assert run("promoted").returncode == 1
    assert run("keep-linux").returncode == 0 and "saved_entry=gnulinux-simple-7d0e" in env_list()  # kept
    assert run("promote").returncode == 0 and "saved_entry=xen-gnulinux-simple-7d0e" in env_list()
    assert run("promoted").returncode == 0
    cfg.write_text(GENERATED.split("menuentry 'Debian GNU/Linux, with Xen")[0])
    assert run("has-xen").returncode == 1
    r = run("once")
    assert r.returncode == 1 and "no Xen entry" in r.stderr


def test_noreboot_is_refused(site):
    (site / "plugins.toml").write_text((site / "plugins.toml").read_text() + '\n[hosts.arch-grub.plugin.xen]\noptions = ["noreboot"]\n')
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry", "--files-only")
    assert r.returncode == 2 and "hosts.arch-grub.plugin.xen.options: noreboot" in r.stderr


def test_boot_check_grub_config_passes_grub_script_check(site):
    from xenrun import run
    p = run.prepare(run.Options(config=str(site / "plugins.toml"), host="arch-grub"))
    facts = run.gather_facts(p)
    entry = p.pm.hook.boot_entry(facts=facts, host=p.host, xen_options=run.xen_options_of(p, facts) + run.CHECK_XEN_OPTIONS,
                                 linux_options=run.CHECK_LINUX_OPTIONS)
    assert entry.validate == ("grub-script-check", "{}")
    cfg = site / "check.cfg"
    cfg.write_text(entry.config)
    assert subprocess.run(["grub-script-check", cfg]).returncode == 0
    assert "console=com1" in entry.config and "dom0_mem=512M,max:512M" in entry.config
    cfg.write_text(entry.config + "if [ x ]; then\n")  # the same check refuses a broken one
    assert subprocess.run(["grub-script-check", cfg], capture_output=True).returncode != 0


def test_boot_check_names_missing_tools_and_their_packages(site):
    r = run_xenrun("boot-check", "--config", site / "plugins.toml", "--host", "arch-grub", env={"PATH": "/nonexistent"})
    assert r.returncode == 2
    assert "qemu-system-x86_64 (qemu-system-x86)" in r.stderr and "grub-mkrescue (grub-common)" in r.stderr


def test_a_boot_plugins_own_loader_names_its_tools(site, toy_boot_plugin):
    """The tools come from the plugin's Loader (tests/plugin_toyboot), not a core table."""
    text = (site / "plugins.toml").read_text()
    (site / "plugins.toml").write_text(text.replace('root = "hosts/arch-syslinux"\nboot = "syslinux"',
                                                    'root = "hosts/arch-syslinux"\nboot = "isolinux"'))
    r = run_xenrun("boot-check", "--config", site / "plugins.toml", "--host", "arch-syslinux",
                   env={"PATH": "/nonexistent", "PYTHONPATH": str(toy_boot_plugin)})
    assert r.returncode == 2, r.stderr
    assert "boot-check (isolinux) needs:" in r.stderr and "xorriso (xorriso)" in r.stderr, r.stderr
    assert "grub-mkrescue" not in r.stderr and "syslinux (syslinux)" not in r.stderr
