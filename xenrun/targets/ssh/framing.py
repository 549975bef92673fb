"""The persistent shell's framing, as pure functions over bytes (no channel).

Every answer of the shell ends with a marker line: "N END status" after a
request, "N READY" once after the prologue (N: the session's random marker, so
nothing a command or an rc file prints can end an answer early). A command's
answer is its stdout in base64, "N E", its stderr in base64. A fetch's answer is
the records of prologue.sh's x_fetch (described there), parsed into a Fetched.
"""

from __future__ import annotations

import base64
import shlex
import stat as statmod
from dataclasses import dataclass, field

from xenrun.targets.base import FileInfo


def take_answer(buf: bytes, nonce: str) -> tuple[bytes, int | None, bytes] | None:
    """The first whole answer in ``buf``: (answer, status, the bytes after it);
    status None for the READY line (what came before it was rc-file noise). None
    while no marker line is complete."""
    for marker, ready in ((f"{nonce} END ".encode(), False), (f"{nonce} READY".encode(), True)):
        found = _line_of(buf, marker)
        if found:
            at, nl = found
            answer, line, rest = buf[:at], buf[at + len(marker):nl], buf[nl + 1:]
            if ready:
                return b"", None, rest
            return answer, int(line or b"0"), rest
    return None


def _line_of(buf: bytes, marker: bytes) -> tuple[int, int] | None:
    """Where ``marker`` starts a line of ``buf``, and where that line ends."""
    if buf.startswith(marker):
        at = 0
    else:
        at = buf.find(b"\n" + marker) + 1
        if not at:
            return None
    nl = buf.find(b"\n", at + len(marker))
    return None if nl < 0 else (at, nl)


def find_line(buf: bytes, marker: bytes) -> str | None:
    """The first whole line of ``buf`` that starts with ``marker``, or None."""
    found = _line_of(buf, marker)
    return None if found is None else buf[found[0]:found[1]].decode(errors="replace")


def split_output(answer: bytes, nonce: str) -> tuple[bytes, bytes]:
    """A command's (stdout, stderr) from its answer (x_end's framing)."""
    sep = f"{nonce} E\n".encode()
    if answer.startswith(sep):
        out, err = b"", answer[len(sep):]
    else:
        out, _, err = answer.partition(b"\n" + sep)
    return base64.b64decode(out.replace(b"\n", b"")), base64.b64decode(err.replace(b"\n", b""))


def parse_stat(fields: str, link: str | None = None) -> FileInfo:
    """A FileInfo from the shell's stat fields (STAT_FORMAT: raw mode in hex, uid,
    gid, size, 512-byte blocks)."""
    raw, uid, gid, size, blocks = fields.split()
    mode = int(raw, 16)
    return FileInfo(kind_of(mode), statmod.S_IMODE(mode), int(uid), int(gid), int(size), int(blocks), link)


def kind_of(mode: int) -> str:
    return ("link" if statmod.S_ISLNK(mode) else "file" if statmod.S_ISREG(mode)
            else "dir" if statmod.S_ISDIR(mode) else "other")


@dataclass
class Fetched:
    """What one fetch answered, by key (a path of the request)."""
    infos: dict[str, FileInfo | None] = field(default_factory=dict)  # lstat; None: absent
    data: dict[str, bytes] = field(default_factory=dict)  # contents of regular files
    dirs: dict[str, list[str]] = field(default_factory=dict)  # listings, sorted
    magic: dict[str, bytes] = field(default_factory=dict)  # first 4 bytes


def fetch_request(wants: dict[str, set]) -> tuple[list[str], str]:
    """(keys, shell request) of a fetch: ``wants`` maps each path to the letters
    of what to fetch (x_fetch's modes: l lstat, c content, o content when small,
    d listing, m magic bytes); the answer's records index ``keys``."""
    keys = sorted(wants)
    args = " ".join(f"{''.join(sorted(wants[k]))} {shlex.quote(k)}" for k in keys)
    return keys, f"x_fetch {args}; printf '%s END 0\\n' \"$N\""


def parse_fetch(answer: bytes, keys: list[str]) -> Fetched:
    """The records of an x_fetch answer for ``keys`` (the request's paths, in
    order). Anything malformed or unknown is left out (then asked again); a link
    whose target did not come is left out too."""
    out = Fetched()
    lines = answer.split(b"\n")
    i = 0
    links: dict[str, str] = {}
    lst: dict[str, str] = {}
    text = lambda b: b.decode(errors="surrogateescape")  # noqa: E731
    while i < len(lines):
        head = text(lines[i])
        words = head.split(" ", 2)
        i += 1
        tag = words[0]
        if tag in ("L", "M"):
            if len(words) > 1 and words[1].isdigit() and int(words[1]) < len(keys):
                value = words[2] if len(words) > 2 else ("?" if tag == "L" else "")
                if tag == "L":
                    lst[keys[int(words[1])]] = value
                else:
                    try:
                        out.magic[keys[int(words[1])]] = bytes.fromhex(value.replace(" ", ""))
                    except ValueError:
                        pass
            continue
        if tag not in ("Y", "Z", "C") and not (tag == "K" and len(words) == 2 and words[1].isdigit()
                                               and int(words[1]) < len(keys)):
            continue
        body = []
        while i < len(lines) and lines[i] not in (b".", b"!"):
            body.append(lines[i])
            i += 1
        ok = i < len(lines) and lines[i] == b"."
        i += 1
        if not ok:
            continue
        data = base64.b64decode(b"".join(body))
        if tag == "Z":  # several links' targets, NUL-terminated, in the order of their indices
            where = [int(w) for w in head[1:].split()]
            targets = data.split(b"\0")
            if len(targets) == len(where) + 1 and not targets[-1] and all(n < len(keys) for n in where):
                links.update((keys[n], text(t)) for n, t in zip(where, targets))
        elif tag == "Y":  # listings: "/i" starts folder i's names
            listings: dict[str, list[str]] = {}
            names: list | None = None
            for entry in data.split(b"\0"):
                if entry.startswith(b"/"):
                    n = int(entry[1:]) if entry[1:].isdigit() else len(keys)
                    names = listings.setdefault(keys[n], []) if n < len(keys) else None
                elif entry and names is not None:
                    names.append(text(entry))
            out.dirs.update((k, sorted(v)) for k, v in listings.items())
        elif tag == "K":
            key = keys[int(words[1])]
            links[key] = text(data[:-1]) if data.endswith(b"\n") else text(data)
        else:  # "C": the files' contents back to back, cut by the sizes stat gave
            out.data.update(cut(data, [keys[n] for n in map(int, head[1:].split()) if n < len(keys)], lst))
    for key, value in lst.items():
        if value == "-":
            out.infos[key] = None
        elif value != "?":
            info = parse_stat(value, links.get(key))
            if info.kind != "link" or key in links:
                out.infos[key] = info
    return out


def cut(data: bytes, keys: list[str], lst: dict[str, str]) -> dict[str, bytes]:
    """The contents of ``keys`` from their concatenation ``data``, cut by the sizes
    in their stat fields; nothing when the sizes do not add up (a file changed
    or could not be read between the stat and the read: then each is read
    again on its own)."""
    try:
        sizes = [int(lst[key].split()[3]) for key in keys]
    except (KeyError, IndexError, ValueError):
        return {}
    if sum(sizes) != len(data):
        return {}
    out, at = {}, 0
    for key, size in zip(keys, sizes):
        out[key], at = data[at:at + size], at + size
    return out
