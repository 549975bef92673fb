"""The SSH target's shell framing (xenrun/targets/ssh/framing.py) on its own: the
answer markers, command output, and fetch records, against a real /bin/sh
running prologue.sh on this machine (the same script an SSH host runs), and on
hand-made answers for what a real shell does not easily produce."""

from __future__ import annotations

import base64
import os
import subprocess

import pytest

from xenrun.targets.ssh.framing import Fetched, cut, fetch_request, parse_fetch, split_output, take_answer
from xenrun.targets.ssh.shell import prologue

NONCE = "xenrun-0123456789abcdef"


class LocalShell:
    """prologue.sh in a local sh, fed requests as SSHTarget feeds the remote one."""

    def __init__(self, tmp_path, noise: bytes = b""):
        env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}
        self.p = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.buf = noise  # what rc files would print before the prologue runs
        self.send(f"N={NONCE}\nB=1\n" + prologue())
        assert self.answer() == (b"", None)

    def send(self, script: str) -> None:
        self.p.stdin.write(script.encode() + b"\n")
        self.p.stdin.flush()

    def answer(self) -> tuple[bytes, int | None]:
        while (taken := take_answer(self.buf, NONCE)) is None:
            data = os.read(self.p.stdout.fileno(), 65536)
            assert data, "the shell ended"
            self.buf += data
        answer, status, self.buf = taken
        return answer, status

    def fetch(self, wants: dict[str, str]) -> Fetched:
        keys, script = fetch_request({k: set(v) for k, v in wants.items()})
        self.send(script)
        answer, status = self.answer()
        assert status == 0
        return parse_fetch(answer, keys)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=10)


@pytest.fixture
def shell(tmp_path):
    s = LocalShell(tmp_path)
    yield s
    s.close()


def test_noise_before_ready_is_skipped_and_a_marker_counts_only_at_a_line_start(tmp_path):
    s = LocalShell(tmp_path, noise=b"Welcome! " + f"{NONCE} END 5 inside a line\n".encode())
    s.send(f"printf 'x {NONCE} END 9\\n'; printf '%s END 3\\n' \"$N\"")
    assert s.answer() == (f"x {NONCE} END 9\n".encode(), 3)
    s.close()


def test_take_answer_waits_for_a_whole_marker_line():
    assert take_answer(f"out\n{NONCE} END 1".encode(), NONCE) is None  # the line is not ended yet
    assert take_answer(f"out\n{NONCE} END 1\nmore".encode(), NONCE) == (b"out\n", 1, b"more")
    assert take_answer(f"{NONCE} END \n".encode(), NONCE) == (b"", 0, b"")
    assert take_answer(b"another-marker END 0\n", NONCE) is None


def test_command_output_is_framed_whatever_it_contains(shell):
    odd = "it's $HOME `id` \"q\"\n" + f"{NONCE} END 0\n" + "\x01\xff"
    encoded = base64.b64encode(odd.encode()).decode()
    shell.send(f"(printf '%s' {encoded} | base64 -d) >\"$X/o\" 2>\"$X/e\"; x_end 7")
    answer, status = shell.answer()
    assert status == 7 and split_output(answer, NONCE) == (odd.encode(), b"")
    shell.send("(echo err >&2) >\"$X/o\" 2>\"$X/e\"; x_end 0")
    assert split_output(shell.answer()[0], NONCE) == (b"", b"err\n")


def test_a_fetch_brings_lstat_links_contents_listings_and_magic(shell, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "small").write_bytes(b"small\n")
    (d / "big").write_bytes(b"b" * 70000)
    (d / "prog").write_bytes(b"#!/bin/sh\n")
    (d / "link").symlink_to("small")
    (d / ".hidden").write_text("")
    (d / "new\nline").write_text("nl\n")
    got = shell.fetch({f"{d}/small": "lc", f"{d}/big": "lo", f"{d}/prog": "lm", f"{d}/link": "l",
                       str(d): "ld", f"{d}/absent": "lc", f"{d}/new\nline": "lc"})
    info = got.infos[f"{d}/small"]
    assert (info.kind, info.size, info.mode) == ("file", 6, (d / "small").stat().st_mode & 0o7777)
    assert got.infos[f"{d}/link"].link == "small" and got.infos[f"{d}/absent"] is None
    assert got.data == {f"{d}/small": b"small\n"}  # "o": big is not brought; a newline name is read alone
    assert got.infos[f"{d}/new\nline"].size == 3
    assert got.magic[f"{d}/prog"] == b"#!/b"
    assert got.dirs[str(d)] == sorted(["small", "big", "prog", "link", ".hidden", "new\nline"])
    assert got.infos[str(d)].kind == "dir"


def test_contents_that_do_not_add_up_to_their_sizes_are_not_kept(shell, tmp_path):
    """/proc files say size 0 and read as text: the concatenation cannot be cut,
    so nothing is kept (each is then read alone), not a wrong cut."""
    (tmp_path / "f").write_text("first\n")
    got = shell.fetch({str(tmp_path / "f"): "lc", "/proc/version": "lc"})
    assert got.infos["/proc/version"].size == 0 and got.data == {}


def test_cut_by_sizes():
    lst = {"/a": "81a4 0 0 3 8", "/b": "81a4 0 0 0 0", "/c": "81a4 0 0 2 8"}
    assert cut(b"onexy", ["/a", "/b", "/c"], lst) == {"/a": b"one", "/b": b"", "/c": b"xy"}
    assert cut(b"onex", ["/a", "/b", "/c"], lst) == {}
    assert cut(b"one", ["/a", "/missing"], lst) == {}


def test_malformed_and_failed_records_are_left_out():
    keys = ["/a", "/b", "/l"]
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    answer = "\n".join([
        "L 0 81a4 0 0 3 8", "L 1 -", "L 2 a1ff 0 0 1 0", "L 9 81a4 0 0 1 1", "L x junk", "M 0 zz",
        "C 0", b64(b"one"), "!",  # reading failed: no content kept
        "K 7", b64(b"x"), ".",  # an index out of range
        "Q what", "Y", b64(b"/1\0x\0/7\0y\0"), ".",  # an unknown tag; a listing of a folder not asked
    ]).encode()
    got = parse_fetch(answer, keys)
    assert got.infos == {"/a": got.infos["/a"], "/b": None}  # the link came without its target: left out
    assert got.infos["/a"].size == 3 and got.data == {} and got.magic == {} and got.dirs == {"/b": ["x"]}
