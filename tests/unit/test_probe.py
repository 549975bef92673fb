"""Probe.installed: programs looked up once per real bin folder."""

from __future__ import annotations

import os

from xenrun.facts import BIN_DIRS, Probe
from xenrun.targets.local import LocalTarget


class CountingTarget(LocalTarget):
    def __init__(self, root):
        super().__init__(root)
        self.looked_up: list[str] = []

    def exists(self, path: str) -> bool:
        self.looked_up.append(path)
        return super().exists(path)


def _tool(root, path: str) -> None:
    (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / path.lstrip("/")).write_text("#!/bin/sh\n")


def test_merged_usr_folders_are_looked_in_once(tmp_path):
    for d in ("usr/bin", "usr/sbin", "usr/local/bin"):
        (tmp_path / d).mkdir(parents=True)
    os.symlink("usr/bin", tmp_path / "bin")
    os.symlink("/usr/sbin", tmp_path / "sbin")  # absolute: inside the root all the same
    _tool(tmp_path, "/usr/sbin/xl")
    target = CountingTarget(tmp_path)
    probe = Probe(target)
    assert probe.bin_dirs() == ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"]
    assert probe.installed("xl")
    target.looked_up.clear()
    assert not probe.installed("pacman")
    assert target.looked_up == [f"{d}/pacman" for d in probe.bin_dirs()]


def test_separate_folders_are_each_looked_in(tmp_path):
    _tool(tmp_path, "/bin/ip")  # only in /bin, a folder of its own (no merged /usr)
    os.symlink("../bin", tmp_path / "sbin")  # a link with "..": looked in as written, not guessed at
    probe = Probe(LocalTarget(tmp_path))
    assert probe.bin_dirs() == list(BIN_DIRS)
    assert probe.installed("ip")
    assert not probe.installed("xl")
