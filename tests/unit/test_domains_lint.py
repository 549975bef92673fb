"""Lint (S25) on real config files under tests/samples/xl: each mistake the article
names is caught with its line, the article's own (corrected) examples pass, and the
parser reads what xl reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.helpers import REPO, run_xenrun
from xenrun import xlcfg

SAMPLES = REPO / "tests" / "samples" / "xl"


@pytest.fixture
def host_root(tmp_path) -> Path:
    """A machine root holding the article's loop-mounted ISO (its kernel paths)."""
    boot = tmp_path / "root/mnt/arch/boot/x86_64"
    boot.mkdir(parents=True)
    (boot / "vmlinuz").write_bytes(b"k")
    (boot / "archiso.img").write_bytes(b"i")
    return tmp_path / "root"


def lint(*names, root=None, extra=()):
    files = [SAMPLES / n for n in names]
    args = ["domain.lint", files[0], *[a for f in files[1:] for a in ("--also", f)], *extra]
    if root:
        args += ["--root", root]
    return run_xenrun(*args)


@pytest.mark.parametrize("name", ["article-pv.cfg", "article-hvm.cfg", "article-common.cfg"])
def test_the_articles_corrected_examples_pass(host_root, name):
    r = lint(name, root=host_root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "no problems found"


# (sample, line, key, words in the message)
MISTAKES = [
    ("initrd.cfg", 3, "initrd", "ramdisk"),
    ("unknown-key.cfg", 3, "memroy", "did you mean memory"),
    ("kernel-missing.cfg", 2, "kernel", "/mnt/arch/boot/i686/vmlinuz does not exist"),
    ("mac-outside.cfg", 5, "vif", "outside Xen's block 00:16:3e"),
    ("mac-twice.cfg", 5, "vif", "given twice"),
    ("article-pv-placeholder-mac.cfg", 7, "vif", "not a MAC address"),
    ("article-hvm-open-vnc.cfg", 8, "vnclisten", "without a password"),
    ("vfb-open.cfg", 6, "vnclisten", "192.168.1.5 without a password"),
    ("syntax.cfg", 4, "", "syntax: expected ',' or ']'"),
]


@pytest.mark.parametrize("name,line,key,words", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_caught_with_its_line(host_root, name, line, key, words):
    r = lint(name, root=host_root)
    assert r.returncode == 1, r.stdout + r.stderr
    where = f"{SAMPLES / name}:{line}: " + (f"{key}: " if key else "")
    hits = [x for x in r.stdout.splitlines() if x.startswith(where)]
    assert hits and words in hits[0], r.stdout


def test_initrd_also_means_no_ramdisk_and_lint_names_both(host_root):
    findings = xlcfg.lint((SAMPLES / "initrd.cfg").read_text(), exists=lambda p: (host_root / p[1:]).exists())
    assert [(f.line, f.key) for f in findings] == [(3, "initrd")]


def test_macs_duplicated_across_a_hosts_configs(host_root):
    r = run_xenrun("domain.lint", SAMPLES / "dup", "--root", host_root)
    assert r.returncode == 1
    assert f"{SAMPLES / 'dup/two.cfg'}:5: vif: mac 00:16:3e:20:00:01 is also used by {SAMPLES / 'dup/one.cfg'}:5" \
        in r.stdout


def test_open_vnc_passes_only_when_allowed_explicitly(host_root):
    assert lint("article-hvm-open-vnc.cfg", root=host_root).returncode == 1
    r = lint("article-hvm-open-vnc.cfg", root=host_root, extra=("--allow-open-vnc",))
    assert r.returncode == 0, r.stdout


def test_vnc_with_password_passes():
    text = (SAMPLES / "article-hvm-open-vnc.cfg").read_text() + "vncpasswd = 'pw'\n"
    assert xlcfg.lint(text) == []


def test_kernel_paths_are_checked_on_the_host_not_here(tmp_path):
    r = lint("article-pv.cfg", root=tmp_path)  # an empty root: no /mnt/arch
    assert r.returncode == 1 and "kernel: /mnt/arch/boot/x86_64/vmlinuz does not exist" in r.stdout
    assert "ramdisk: /mnt/arch/boot/x86_64/archiso.img does not exist" in r.stdout


def test_missing_file_is_bad_input():
    r = run_xenrun("domain.lint", "/nonexistent.cfg")
    assert r.returncode == 2 and r.stderr.strip() == "xenrun: domain.lint: /nonexistent.cfg does not exist"


def test_parser_reads_xl_syntax():
    text = ('# comment\nname = "a" ; memory = 0x200\nvcpus=2 # two\n'
            "disk = [ 'file:/x,xvda,w',\n         \"file:/y,xvdb,r\", ]\nextra = \"a \\\"b\\\"\"\ncpu_weight = 1.5\n")
    entries = xlcfg.parse(text)
    assert [(e.key, e.value, e.line) for e in entries] == [
        ("name", "a", 2), ("memory", 512, 2), ("vcpus", 2, 3),
        ("disk", ["file:/x,xvda,w", "file:/y,xvdb,r"], 4), ("extra", 'a "b"', 6), ("cpu_weight", 1.5, 7)]


@pytest.mark.parametrize("text,line", [("name = 'a\n", 1), ("name = \n", 1), ("= 1\n", 1),
                                       ("name = 'a'\nmemory 256\n", 2), ("disk = [ 'a'\n", 1)])
def test_parser_errors_name_the_line(text, line):
    with pytest.raises(xlcfg.XlSyntaxError) as e:
        xlcfg.parse(text)
    assert e.value.line == line


def test_rendered_configs_round_trip_through_the_parser():
    from test_domains import ARTICLE_HVM, ARTICLE_PV
    for text in (ARTICLE_PV, ARTICLE_HVM):
        pairs = [(e.key, e.value) for e in xlcfg.parse(text)]
        style = "hvm" if dict(pairs).get("type") == "hvm" else "pv"
        assert xlcfg.render(pairs, style) == text
