"""The debootstrap installer plugin (issue 14.1), planned: what `domain.create
--dry` shows for a guest with an [domain.NAME.install] table, and each wrong
value refused with domains.toml's line and key before anything runs. The real
installation and boot are in tests/vm/test_guest_install_qemu.py; the script's
refusals are run here for real on small images."""

from __future__ import annotations

import json
import subprocess

import pytest

from support.helpers import REPO, run_xenrun, tree_hash

SCRIPT = REPO / "xenrun/plugins/debootstrap.sh"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0000000000000000000000 test@xenrun"

GUEST = '''
[domain.web1]
host = "arch-grub"
type = "pv"
memory = "256M"
bootloader = "pygrub"

[[domain.web1.disks]]
backend = "image"
size = "4G"

[domain.web1.install]
method = "debootstrap"
'''


def _site(site, install: str = f'ssh_key = "{KEY}"\n', domain: str = GUEST):
    (site / "domains.toml").write_text((site / "domains.toml").read_text() + domain + install)
    return site


def _create(site, *args):
    return run_xenrun("domain.create", "web1", "--config", site / "plugins.toml", "--host", "arch-grub", *args)


def test_dry_run_plans_the_install_between_the_disk_and_the_config(site):
    _site(site, f'ssh_key = "{KEY}"\npackages = ["less"]\naddress = "192.168.1.20/24"\n'
                'gateway = "192.168.1.1"\ndns = ["192.168.1.1", "9.9.9.9"]\nhostname = "www"\n')
    before = tree_hash(site)
    r = _create(site, "--dry", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert tree_hash(site) == before  # --dry changes nothing
    plan = json.loads(r.stdout)["plan"]
    order = [c.get("path") or c["argv"][0] for c in plan]
    assert order[:3] == ["/var/lib/xen/images/web1.img", "/usr/local/lib/xenrun/debootstrap-guest",
                         "/usr/local/lib/xenrun/debootstrap-guest"]
    assert order.index("/etc/xen/web1.cfg") > 2
    install = plan[2]["argv"]
    opts = dict(zip(install[2::2], install[3::2]))
    assert install[1] == "install" and opts["--disk"] == "/var/lib/xen/images/web1.img"
    assert opts["--suite"] == "bookworm" and opts["--mirror"] == "http://deb.debian.org/debian"
    assert "less" in opts["--include"].split(",") and "linux-image-amd64" in opts["--include"].split(",")
    assert (opts["--hostname"], opts["--address"], opts["--gateway"]) == ("www", "192.168.1.20/24", "192.168.1.1")
    assert opts["--dns"] == "192.168.1.1 9.9.9.9" and opts["--ssh-key"] == KEY
    assert "--no-check-gpg" not in opts  # the mirror's signature is checked by default


def test_the_uuid_is_the_guests_own_and_stable(site):
    _site(site)
    argvs = [json.loads(_create(site, "--dry", "--format", "json").stdout)["plan"][2]["argv"] for _ in range(2)]
    assert argvs[0] == argvs[1]
    uuid = argvs[0][argvs[0].index("--uuid") + 1]
    assert len(uuid) == 36 and uuid.count("-") == 4


def test_the_plugin_settings_give_a_site_wide_mirror(site):
    _site(site)
    with open(site / "plugins.toml", "a") as f:
        f.write('\n[plugin.debootstrap]\nmirror = "file:///srv/debian"\ncheck_gpg = false\nsuite = "trixie"\n')
    argv = json.loads(_create(site, "--dry", "--format", "json").stdout)["plan"][2]["argv"]
    assert argv[argv.index("--mirror") + 1] == "file:///srv/debian"
    assert argv[argv.index("--suite") + 1] == "trixie" and argv[-2:] == ["--no-check-gpg", "yes"]


def test_a_key_file_is_read_on_this_machine(site, tmp_path):
    pub = tmp_path / "id.pub"
    pub.write_text(KEY + "\n")
    _site(site, f'ssh_key_file = "{pub}"\n')
    argv = json.loads(_create(site, "--dry", "--format", "json").stdout)["plan"][2]["argv"]
    assert argv[argv.index("--ssh-key") + 1] == KEY


BAD = [
    ('suite = "Bookworm!"\n', "install.suite", "not a Debian suite"),
    ('mirror = "ftp://mirror/debian"\n', "install.mirror", "not a mirror URL"),
    ('mirror = "http://x/debian\'; rm -rf /"\n', "install.mirror", "not a mirror URL"),
    ('packages = ["less", "a b"]\n', "install.packages", "package names"),
    ('hostname = "Bad_Name"\n', "install.hostname", "not a host name"),
    ('address = "10.0.0.300/24"\n', "install.address", ""),
    ('dns = "1.1.1.1"\n', "install.dns", "list"),
    ('colour = "blue"\n', "install.colour", "not a key of a 'debootstrap' install"),
    ('ssh_key_file = "/nonexistent/id.pub"\n', "install.ssh_key_file", "cannot read"),
    ('gateway = "10.0.0.1"\n', "install.gateway", "only with a static address"),
]


@pytest.mark.parametrize("line,key,message", BAD, ids=[b[1] + ":" + b[0][:12] for b in BAD])
def test_a_wrong_install_value_names_its_line_and_key(site, line, key, message):
    _site(site, f'ssh_key = "{KEY}"\n' + line)
    text = (site / "domains.toml").read_text()
    before = tree_hash(site)
    r = _create(site, "--dry")
    assert r.returncode == 2, r.stdout + r.stderr
    lineno = text.splitlines().index(line.rstrip("\n")) + 1
    assert f"domains.toml:{lineno}: domain.web1.{key}:" in r.stderr, r.stderr
    assert message in r.stderr
    assert tree_hash(site) == before


@pytest.mark.parametrize("install,key,message", [
    ("", "install", "ssh_key or ssh_key_file is missing"),
    ('ssh_key_file = "/etc/hostname"\n', "install.ssh_key_file", "not an OpenSSH public key"),
    (f'ssh_key = "{KEY}"\nssh_key_file = "/etc/hostname"\n', "install.ssh_key_file", "not an OpenSSH"),
    ('ssh_key = "hello"\n', "install.ssh_key", "OpenSSH public key"),
], ids=["no-key", "not-a-key-file", "bad-file-beside-a-key", "bad-key"])
def test_root_needs_a_public_key(site, install, key, message):
    _site(site, install)
    r = _create(site, "--dry")
    assert r.returncode == 2 and f"domain.web1.{key}:" in r.stderr and message in r.stderr, r.stderr


def test_a_key_and_a_key_file_are_not_both_given(site, tmp_path):
    (tmp_path / "id.pub").write_text(KEY + "\n")
    _site(site, f'ssh_key = "{KEY}"\nssh_key_file = "{tmp_path / "id.pub"}"\n')
    r = _create(site, "--dry")
    assert r.returncode == 2 and "domain.web1.install.ssh_key_file:" in r.stderr and "not both" in r.stderr, r.stderr


@pytest.mark.parametrize("method,message", [
    ("pacstrap", "'pacstrap': no plugin (installers: debootstrap)"),
    ("image", "'image': not an installer plugin"),
])
def test_an_unknown_method_is_named(site, method, message):
    _site(site, f'ssh_key = "{KEY}"\n', GUEST.replace('method = "debootstrap"', f'method = "{method}"'))
    r = _create(site, "--dry")
    assert r.returncode == 2 and "domain.web1.install.method:" in r.stderr and message in r.stderr, r.stderr


def test_install_with_iso_boot_is_refused_when_read(site):
    domain = GUEST.replace('bootloader = "pygrub"', 'iso = "/var/lib/xen/iso/a.iso"\niso_boot = true')
    _site(site, f'ssh_key = "{KEY}"\n', domain)
    r = _create(site, "--dry")
    assert r.returncode == 2 and "domain.web1.install:" in r.stderr and "iso_boot" in r.stderr, r.stderr


# -- the script's guards, for real on small images ----------------------------------------

def _script(*args):
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


UUID = "0f1e2d3c-4b5a-4697-8877-665544332211"


def test_check_says_done_only_for_the_complete_system(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    subprocess.run(["truncate", "-s", "16M", str(disk)], check=True)
    assert _script("check", "--disk", str(disk), "--uuid", UUID).returncode != 0  # empty
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", UUID, "-L", "xenrun-partial", str(disk)], check=True)
    assert _script("check", "--disk", str(disk), "--uuid", UUID).returncode != 0  # half-written
    subprocess.run(["e2label", str(disk), "root"], check=True)
    assert _script("check", "--disk", str(disk), "--uuid", UUID).returncode == 0
    assert _script("check", "--disk", str(disk), "--uuid", UUID.replace("0f", "0e")).returncode != 0


@pytest.mark.parametrize("made", [["mkfs.ext4", "-q", "-F", "-L", "data"], ["mkswap"]])
def test_install_never_overwrites_a_disk_that_holds_something(tmp_path, made):
    disk = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "16M", str(disk)], check=True)
    subprocess.run([*made, str(disk)], check=True, capture_output=True)
    before = disk.read_bytes()
    r = _script("install", "--disk", str(disk), "--uuid", UUID, "--suite", "bookworm", "--mirror",
                "file:///nonexistent", "--include", "x", "--hostname", "h", "--ssh-key", KEY)
    assert r.returncode == 1 and "xenrun installs only onto an empty disk" in r.stderr, r.stdout + r.stderr
    assert disk.read_bytes() == before


def test_the_script_is_posix_sh():
    for shell in ("sh", "bash"):
        assert subprocess.run([shell, "-n", str(SCRIPT)]).returncode == 0
