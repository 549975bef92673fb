"""The hypervisor command line merged with the options already on it (issue 13.5):
the pure functions against the real shell, then plans and applied files on the
example hosts with hand-added options, and the values refused before anything."""

from __future__ import annotations

import subprocess

import pytest

from support.helpers import run_xenrun, tree_hash
from xenrun.changes import EnsureLine
from xenrun.plugins import grub
from xenrun.plugins.grub import last_assignment, merge_xen_cmdline, shell_assignment, shell_value
from xenrun.profiles import PROFILES
from xenrun.testing import apply_host, changes_for, plan_host

OURS = ["dom0_mem=512M,max:512M", "dom0_max_vcpus=2", "dom0_vcpus_pin"]  # the example site's settings
MERGED = "loglvl=all iommu=1 dom0_mem=512M,max:512M dom0_max_vcpus=2 dom0_vcpus_pin"


def _sh(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True)


# -- pure functions ----------------------------------------------------------------------

@pytest.mark.parametrize("existing, ours, merged", [
    ("loglvl=all iommu=1 dom0_mem=1024M", OURS, MERGED),
    ("", OURS, " ".join(OURS)),
    ("dom0_vcpus_pin  console=vga", ["dom0_vcpus_pin"], "console=vga dom0_vcpus_pin"),  # a flag is its own key
    ("console=vga com1=115200,8n1", ["console=com1"], "com1=115200,8n1 console=com1"),
    ("xpti=dom0=false,domu=true", ["xpti=dom0=true"], "xpti=dom0=true"),  # the key ends at the first '='
    ("dom0_mem=1G dom0_mem_x=1", ["dom0_mem=512M"], "dom0_mem_x=1 dom0_mem=512M"),  # keys match whole
    ("loglvl=all loglvl=warning", [], "loglvl=all loglvl=warning"),  # theirs kept as they are, repeats too
])
def test_merge_ours_win_by_key_the_rest_kept_in_order_and_merging_again_changes_nothing(existing, ours, merged):
    assert merge_xen_cmdline(existing, ours) == merged
    assert merge_xen_cmdline(merged, ours) == merged


READABLE = [
    ('"loglvl=all iommu=1"', "loglvl=all iommu=1"),
    ("'loglvl=all iommu=1'", "loglvl=all iommu=1"),
    ("xsave=1", "xsave=1"),
    ('""', ""),
    ("", ""),
    ('"a b"  # by hand', "a b"),
    ('a"b c"d', "ab cd"),
    ("'a$b \"c\"'", 'a$b "c"'),
    ("#x", "#x"),  # not a comment inside a word
]
UNREADABLE = ['"$(cat /etc/x) a"', '"`id`"', "$(id)", "`id`", '"$GRUB_CMDLINE_XEN_DEFAULT a"', "$X", '"a\\ b"',
              "a\\ b", '"a b', "'a b", "a b", "a;b", "~/x", "a|b", "a&", "(a)"]


@pytest.mark.parametrize("rhs, value", READABLE)
def test_shell_value_reads_what_sh_reads(rhs, value):
    assert shell_value(rhs) == value
    out = _sh(f'V={rhs}\nprintf %s "$V"')  # the shell itself agrees
    assert out.returncode == 0 and out.stdout == value


@pytest.mark.parametrize("rhs", UNREADABLE)
def test_shell_value_refuses_what_only_a_shell_could_tell(rhs):
    assert shell_value(rhs) is None


@pytest.mark.parametrize("value", ["loglvl=all iommu=1", "", "a$b c", 'a"b', "a`b`", "a\\b", "it's"])
def test_shell_assignment_reads_back_exactly_and_passes_sh_n(value, tmp_path):
    line = shell_assignment("XEN_HYPERVISOR_CMDLINE", value)
    f = tmp_path / "grub.conf"
    f.write_text(line + "\n")
    assert subprocess.run(["sh", "-n", f]).returncode == 0
    assert _sh(f'. "{f}"; printf %s "$XEN_HYPERVISOR_CMDLINE"').stdout == value
    assert shell_value(line.split("=", 1)[1]) == value


def test_shell_assignment_refuses_a_quote_beside_an_expansion():
    assert shell_assignment("V", "it's $HOME") is None
    assert shell_assignment("V", "a\"b'c") is None


def test_last_assignment_is_the_one_in_force():
    text = ('#XEN_HYPERVISOR_CMDLINE="old"\nXEN_HYPERVISOR_CMDLINE="a"\nother=1\n'
            '  XEN_HYPERVISOR_CMDLINE="b c" # later\nXEN_HYPERVISOR_CMDLINE_X=1\n')
    assert last_assignment(text, "XEN_HYPERVISOR_CMDLINE") == {"line": 4, "value": '"b c" # later'}
    assert last_assignment("#GRUB_CMDLINE_XEN_DEFAULT=\"\"\n", "GRUB_CMDLINE_XEN_DEFAULT") is None


def test_every_profiles_file_and_variable_is_read_as_a_fact():
    for profile in PROFILES.values():
        layout = grub.LAYOUTS[profile.id]
        assert (layout.xen_file, layout.xen_var) in grub.XEN_CMDLINE_VARS


# -- plans and applied files -------------------------------------------------------------

def _grub_conf(site, text):
    conf = site / "hosts/arch-grub/etc/xen/grub.conf"
    conf.write_text("# Settings for /etc/grub.d/09_xen (installed by the xen package)\n" + text)
    return conf


def test_hand_added_options_are_kept_and_shown_in_the_plan(site):
    conf = _grub_conf(site, 'XEN_HYPERVISOR_CMDLINE="loglvl=all iommu=1 dom0_mem=1024M"\n')
    facts, changes = changes_for(site / "plugins.toml", "arch-grub")
    assert facts.grub_xen_cmdline["/etc/xen/grub.conf"] == {"line": 2, "value": '"loglvl=all iommu=1 dom0_mem=1024M"'}
    assert [c.line for c in changes if isinstance(c, EnsureLine) and c.path == "/etc/xen/grub.conf"] == [
        f'XEN_HYPERVISOR_CMDLINE="{MERGED}"']
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--dry")
    assert r.returncode == 0, r.stderr
    assert ('-XEN_HYPERVISOR_CMDLINE="loglvl=all iommu=1 dom0_mem=1024M"\n'
            f'    +XEN_HYPERVISOR_CMDLINE="{MERGED}"\n') in r.stdout
    assert apply_host(site / "plugins.toml", "arch-grub")["run"]
    assert conf.read_text().splitlines()[1:] == [f'XEN_HYPERVISOR_CMDLINE="{MERGED}"']
    for check in (["sh", "-n", conf], ["grub-script-check", conf]):
        assert subprocess.run(check).returncode == 0
    assert _sh(f'. "{conf}"; printf %s "$XEN_HYPERVISOR_CMDLINE"').stdout == MERGED
    facts, outcomes = plan_host(site / "plugins.toml", "arch-grub")  # a second plan: nothing to do
    assert [o for o in outcomes if o.action == "change"] == []


def test_single_quoted_options_with_a_dollar_are_kept_in_single_quotes(site):
    conf = _grub_conf(site, "XEN_HYPERVISOR_CMDLINE='loglvl=all x=$1'\n")
    assert apply_host(site / "plugins.toml", "arch-grub")["run"]
    assert conf.read_text().splitlines()[1] == f"XEN_HYPERVISOR_CMDLINE='loglvl=all x=$1 {' '.join(OURS)}'"
    assert subprocess.run(["sh", "-n", conf]).returncode == 0
    assert _sh(f'. "{conf}"; printf %s "$XEN_HYPERVISOR_CMDLINE"').stdout == f"loglvl=all x=$1 {' '.join(OURS)}"
    assert [o for o in plan_host(site / "plugins.toml", "arch-grub")[1] if o.action == "change"] == []


def test_debian_hand_added_options_kept_and_the_if_block_untouched(site):
    cfg = site / "hosts/debian-grub/etc/default/grub.d/xen.cfg"
    before = cfg.read_text()
    cfg.write_text(before.replace('#GRUB_CMDLINE_XEN=""\n', '#GRUB_CMDLINE_XEN=""\n'
                                  'GRUB_CMDLINE_XEN_DEFAULT="loglvl=all iommu=1 dom0_mem=1024M"\n'))
    assert apply_host(site / "plugins.toml", "debian-grub")["run"]
    text = cfg.read_text()
    assert text.count("GRUB_CMDLINE_XEN_DEFAULT=") == 1 and f'\nGRUB_CMDLINE_XEN_DEFAULT="{MERGED}"\n' in text
    assert text.split("\nif ", 1)[1] == before.split("\nif ", 1)[1]
    assert subprocess.run(["sh", "-n", cfg]).returncode == 0
    assert [o for o in plan_host(site / "plugins.toml", "debian-grub")[1] if o.action == "change"] == []


@pytest.mark.parametrize("value, says", [
    ('"$(cat /etc/xen/opts) loglvl=all"', "cannot be read without running the shell"),
    ('"`cat /etc/xen/opts`"', "cannot be read without running the shell"),
    ('"$XEN_HYPERVISOR_CMDLINE loglvl=all"', "cannot be read without running the shell"),
    ('"loglvl=all', "cannot be read without running the shell"),
    ('"loglvl=all noreboot"', "noreboot would keep a panicked Xen from rebooting"),
    ("'it'\"'\"'s $x'", "cannot be written back"),
])
def test_a_value_that_cannot_be_kept_safely_is_refused_with_one_line_and_nothing_touched(site, value, says):
    _grub_conf(site, f"XEN_HYPERVISOR_CMDLINE={value}\n")
    before = tree_hash(site)
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "arch-grub", "--yes", "--files-only")
    assert r.returncode == 2
    error = [line for line in r.stderr.splitlines() if "XEN_HYPERVISOR_CMDLINE" in line]
    assert len(error) == 1 and error[0].startswith("xenrun: /etc/xen/grub.conf:2: XEN_HYPERVISOR_CMDLINE: ")
    assert says in error[0]
    assert tree_hash(site) == before


def test_debian_options_in_force_from_etc_default_grub_are_kept_in_xen_cfg(site):
    # xen.cfg has no assignment of its own: the one in /etc/default/grub was in force
    default = site / "hosts/debian-grub/etc/default/grub"
    default.write_text(default.read_text() + 'GRUB_CMDLINE_XEN_DEFAULT="loglvl=all iommu=1 dom0_mem=1024M"\n')
    facts, changes = changes_for(site / "plugins.toml", "debian-grub")
    assert [c.line for c in changes if isinstance(c, EnsureLine) and c.path.endswith("xen.cfg")][0] == \
        f'GRUB_CMDLINE_XEN_DEFAULT="{MERGED}"'
    default.write_text(default.read_text() + 'GRUB_CMDLINE_XEN_DEFAULT="`cat /etc/opts`"\n')
    r = run_xenrun("setup", "--config", site / "plugins.toml", "--host", "debian-grub", "--dry")
    line = len(default.read_text().splitlines())
    assert r.returncode == 2 and f"/etc/default/grub:{line}: GRUB_CMDLINE_XEN_DEFAULT: the value cannot" in r.stderr
