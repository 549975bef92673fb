"""Bad input: every malformed plugins.toml or flag gives one line naming the file,
the line (where known) and the key, exit code 2, and leaves every file untouched."""

from __future__ import annotations

import pytest

from support.helpers import run_xenrun, tree_hash

BASE = '''[defaults]
boot = "none"
network = "none"

[hosts.arch-grub]
root = "hosts/arch-grub"

[plugin.xen]
dom0_mem = "512M"
'''

# (name, plugins.toml text, key the error must name, line it must name or None)
CASES = [
    ("toml syntax", BASE + "[plugin.xen\nx = 1\n", "", 10),
    ("duplicate key", BASE + 'dom0_mem = "1G"\n', "", 10),
    ("unknown top-level table", BASE + "[defualts]\nboot = 'none'\n", "defualts", 10),
    ("unknown defaults key", BASE.replace('boot = "none"', 'bot = "none"'), "defaults.bot", 2),
    ("unknown host key", BASE.replace('root = "hosts/arch-grub"', 'root = "hosts/arch-grub"\nboots = "grub"'), "hosts.arch-grub.boots", 7),
    ("unknown boot plugin", BASE.replace('boot = "none"', 'boot = "grubb"'), "defaults.boot", 2),
    ("unknown host plugin", BASE.replace('root = "hosts/arch-grub"', 'root = "hosts/arch-grub"\nplugins = ["nosuch"]'), "hosts.arch-grub.plugins", 7),
    ("boot not a string", BASE.replace('boot = "none"', "boot = 5"), "defaults.boot", 2),
    ("disks not a list", BASE.replace('network = "none"', 'network = "none"\ndisks = "image"'), "defaults.disks", 4),
    ("disks item not a name", BASE.replace('network = "none"', 'network = "none"\ndisks = ["image", 5]'), "defaults.disks", 4),
    ("plugin name with space", BASE.replace('network = "none"', 'network = "none"\nplugins = ["sample x"]'), "defaults.plugins", 4),
    ("host name with slash", BASE + '[hosts."a/b"]\n', 'hosts.a/b', 10),
    ("host name dot dot", BASE + '[hosts.".."]\n', "hosts...", 10),
    ("host name with space", BASE + '[hosts."a b"]\n', "hosts.a b", 10),
    ("host name with quote", BASE + "[hosts.\"a'b\"]\n", "hosts.a'b", 10),
    ("host name with $()", BASE + '[hosts."$(reboot)"]\n', "hosts.$(reboot)", 10),
    ("host name with newline", BASE + '[hosts."a\\nb"]\n', "hosts.a\nb".replace("\n", "\\n"), None),
    ("host name too long", BASE + f'[hosts.{"h" * 64}]\n', "hosts." + "h" * 64, 10),
    ("empty host name", BASE + '[hosts.""]\n', "hosts.", 10),
    ("root missing folder", BASE.replace('root = "hosts/arch-grub"', 'root = "hosts/nope"'), "hosts.arch-grub.root", 6),
    ("root not a string", BASE.replace('root = "hosts/arch-grub"', 'root = 5'), "hosts.arch-grub.root", 6),
    ("address with shell", BASE.replace('root = "hosts/arch-grub"', 'root = "hosts/arch-grub"\naddress = "root@h; rm -rf /"'), "hosts.arch-grub.address", 7),
    ("remote root not absolute", BASE.replace('root = "hosts/arch-grub"', 'address = "root@h"\nroot = "hosts/arch-grub"'), "hosts.arch-grub.root", 7),
    ("identity file missing", BASE.replace('root = "hosts/arch-grub"', 'root = "hosts/arch-grub"\nidentity = "nokey"'), "hosts.arch-grub.identity", 7),
    ("dom0_mem not a size", BASE.replace('"512M"', '"lots"'), "plugin.xen.dom0_mem", 9),
    ("dom0_mem negative", BASE.replace('"512M"', "-5"), "plugin.xen.dom0_mem", 9),
    ("dom0_mem boolean", BASE.replace('"512M"', "true"), "plugin.xen.dom0_mem", 9),
    ("dom0_mem bad unit", BASE.replace('"512M"', '"512X"'), "plugin.xen.dom0_mem", 9),
    ("dom0_mem more than the host has", BASE.replace('"512M"', '"64G"'), "plugin.xen.dom0_mem", 9),
    ("dom0_max_vcpus word", BASE + 'dom0_max_vcpus = "two"\n', "plugin.xen.dom0_max_vcpus", 10),
    ("dom0_max_vcpus zero", BASE + "dom0_max_vcpus = 0\n", "plugin.xen.dom0_max_vcpus", 10),
    ("dom0_max_vcpus more than cpus", BASE + "dom0_max_vcpus = 64\n", "plugin.xen.dom0_max_vcpus", 10),
    ("dom0_vcpus_pin string", BASE + 'dom0_vcpus_pin = "yes"\n', "plugin.xen.dom0_vcpus_pin", 10),
    ("options not a list", BASE + 'options = "console=com1"\n', "plugin.xen.options", 10),
    ("option with semicolon", BASE + 'options = ["console=com1; reboot"]\n', "plugin.xen.options", 10),
    ("option with $()", BASE + 'options = ["$(reboot)"]\n', "plugin.xen.options", 10),
    ("option with quote", BASE + "options = [\"a'b\"]\n", "plugin.xen.options", 10),
    ("unknown setting", BASE + 'dom0mem = "512M"\n', "plugin.xen.dom0mem", 10),
    ("settings for unknown plugin", BASE + "[plugin.nosuch]\nx = 1\n", "plugin.nosuch", 10),
    ("per-host bad setting", BASE + '[hosts.arch-grub.plugin.xen]\ndom0_mem = "1Q"\n', "hosts.arch-grub.plugin.xen.dom0_mem", 11),
    ("aur_user with space", BASE + 'aur_user = "root user"\n', "plugin.xen.aur_user", 10),
    ("plugin is not a table", "plugin = 5\n", "plugin", 1),
    ("hosts is not a table", 'hosts = "x"\n', "hosts", 1),
]


@pytest.mark.parametrize("name,text,key,line", CASES, ids=[c[0] for c in CASES])
def test_malformed_site_is_refused_with_file_line_key(site, name, text, key, line):
    config = site / "plugins.toml"
    config.write_text(text)
    before = tree_hash(site)
    r = run_xenrun("setup", "--config", config, "--host", "arch-grub", "--yes")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    message = lines[0]
    where = f"{config}:{line}:" if line else f"{config}"
    assert message.startswith(f"xenrun: {where}"), message
    assert f" {key}: " in message or not key, message
    assert r.stdout == ""
    assert tree_hash(site) == before


def test_not_utf8(site):
    config = site / "plugins.toml"
    config.write_bytes(b'[defaults]\nboot = "\xff"\n')
    r = run_xenrun("setup", "--config", config, "--host", "arch-grub")
    assert r.returncode == 2 and str(config) in r.stderr and "UTF-8" in r.stderr


@pytest.mark.parametrize("flags,expect", [
    (["--host", "a/b"], "--host: 'a/b' is not a valid name"),
    (["--host", "$(reboot)"], "--host:"),
    (["--host", "nosuch"], "no host 'nosuch'"),
    (["--format", "yaml"], "--format: 'yaml' is not one of"),
    (["--config", "/nonexistent/plugins.toml"], "/nonexistent/plugins.toml: cannot read"),
    (["--root", "/nonexistent"], "--root: /nonexistent is not a folder"),
])
def test_bad_flags(site, flags, expect):
    before = tree_hash(site)
    args = ["setup", "--yes", *flags]
    if "--config" not in flags:
        args += ["--config", site / "plugins.toml"]
    r = run_xenrun(*args)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert tree_hash(site) == before
