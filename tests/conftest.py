"""The suite's fixtures: a scratch copy of the example site, a real sshd, each
test's own known_hosts, and the sample third-party plugin installed with pip.
Helpers and harnesses live in the package tests/support (tests/README.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpers import EXAMPLES, REPO


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 (tests/support/sshd.py), key auth as root."""
    from support.sshd import start_sshd
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _known_hosts(tmp_path_factory, monkeypatch):
    """Each test's SSH host keys go to a known_hosts file of its own (its servers
    are new, on ports other tests used with other keys), never root's."""
    monkeypatch.setenv("XENRUN_KNOWN_HOSTS", str(tmp_path_factory.mktemp("ssh") / "known_hosts"))


@pytest.fixture
def site(tmp_path) -> Path:
    """A scratch copy of examples/ (plugins.toml and the machine roots)."""
    dest = tmp_path / "site"
    shutil.copytree(EXAMPLES, dest, symlinks=True)
    return dest


def pip_install(package: Path, target: Path) -> Path:
    """A plugin package installed with pip into ``target`` (for PYTHONPATH)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="session")
def sample_plugin(tmp_path_factory) -> Path:
    """The third-party plugin package under tests/plugin_pkg, installed with pip
    into a folder of its own (added to PYTHONPATH of the xenrun processes)."""
    return pip_install(REPO / "tests" / "plugin_pkg", tmp_path_factory.mktemp("sample-plugin"))


@pytest.fixture(scope="session")
def toy_boot_plugin(tmp_path_factory) -> Path:
    """tests/plugin_toyboot: a boot loader the core does not know (ISOLINUX), as a
    third-party package, installed like sample_plugin."""
    return pip_install(REPO / "tests" / "plugin_toyboot", tmp_path_factory.mktemp("toy-boot-plugin"))


@pytest.fixture(scope="session")
def toy_disk_plugin(tmp_path_factory) -> Path:
    """tests/plugin_toydisk: a disk backend the core does not know (qcow2 images), as
    a third-party package, installed like sample_plugin."""
    return pip_install(REPO / "tests" / "plugin_toydisk", tmp_path_factory.mktemp("toy-disk-plugin"))
