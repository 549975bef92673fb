"""Print the facts list of docs/plugins.md from the code: the facts the builtin
plugins' detect_hardware hooks give for the example hosts, with their type and
arch-grub's value. tests/plugins/test_guide.py fails when the doc's list differs.

    python docs/facts_list.py            # the list, as the doc holds it
"""

from __future__ import annotations

import json
from pathlib import Path

from xenrun.testing import changes_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HOSTS = ("arch-grub", "arch-uefi", "arch-syslinux", "debian-grub")


def _kind(value) -> str:
    return {bool: "bool", int: "int", str: "str", list: "list", dict: "dict", type(None): "None"}.get(
        type(value), type(value).__name__)


def facts_list() -> str:
    kinds: dict[str, set[str]] = {}
    first = None
    for host in HOSTS:
        facts, _ = changes_for(EXAMPLES / "plugins.toml", host)
        data = facts.to_json()
        first = first or data
        for key, value in data.items():
            kinds.setdefault(key, set()).add(_kind(value))
    lines = []
    for key in sorted(kinds):
        value = json.dumps(first.get(key), sort_keys=True)
        if len(value) > 60:
            value = value[:57] + "..."
        lines.append(f"- `{key}` ({' or '.join(sorted(kinds[key]))}): e.g. `{value}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(facts_list(), end="")
