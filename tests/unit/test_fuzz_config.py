"""A seeded fuzz test of what users write (issue 17.5): mutations of the example
plugins.toml and domains.toml, each read and planned in-process (--dry, files
only) as `xenrun setup` and `xenrun domain.create` would. Each must plan, or stop
with one of xenrun's errors of the user's making (exit 2); never anything else,
and never a change to the site."""

from __future__ import annotations

import random
import re

import pytest

from support.helpers import tree_hash
from xenrun import guests, run
from xenrun.errors import XenrunError

SEED = 20261205
MUTATIONS = 500
VALUES = ['{ a = 1 }', '[[1]]', '[' * 40 + ']' * 40, '{ x = ' * 30 + '1' + ' }' * 30, "true", "-1", "0", "99999",
          '"../../.."', '"/"', '""', '"a,b"', '"\\u0000"', '"-oProxyCommand"', '"127.0.0.1:22:22"', "1e309",
          '"' + "x" * 5000 + '"', "[]", '["grub", "grub"]', "1979-05-27T07:32:00Z"]


def _mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        op = rng.randrange(6)
        if op == 0 and "=" in lines[i]:  # a value of another type, or a hostile one
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {rng.choice(VALUES)}"
        elif op == 1:
            del lines[i]
        elif op == 2:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 3:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 4 and lines[i]:
            k = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:k] + rng.choice("[]{}=\"'.,#\\\n") + lines[i][k + 1:]
        else:
            m = re.match(r"\s*\[+([^\]]+)\]+", lines[i])
            if m:  # a table header turned into a key, or the reverse
                lines[i] = f"{m.group(1).split('.')[-1]} = {rng.choice(VALUES)}"
    return "\n".join(lines) + "\n"


def _plan(site, host: str, domain: str | None) -> None:
    opts = run.Options(config=str(site / "plugins.toml"), host=host, dry=True, files_only=True)
    if domain is None:
        run.setup(opts, lambda result: False)
    else:
        guests.create(guests.DomainOptions(opts), domain, lambda result: False)


@pytest.mark.parametrize("file", ["plugins.toml", "domains.toml"])
def test_mutated_files_plan_or_give_a_users_error(site, file):
    rng = random.Random(f"{SEED}-{file}")
    original = (site / file).read_text()
    before = tree_hash(site / "hosts")
    outcomes = {"planned": 0, "refused": 0}
    for n in range(MUTATIONS):
        (site / file).write_text(_mutate(original, rng))
        host, domain = rng.choice([("arch-grub", None), ("arch-uefi", None), ("arch-grub", "arch-pv"),
                                   ("debian-grub", "deb-pv"), ("arch-syslinux", None)])
        try:
            _plan(site, host, domain)
            outcomes["planned"] += 1
        except XenrunError as e:
            assert e.exit_code == 2, f"mutation {n}: exit {e.exit_code}: {e}"
            assert "\n" not in str(e), f"mutation {n}: more than one line: {e}"
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - what this test is for
            raise AssertionError(f"mutation {n} of {file} ({host}, {domain}): {type(e).__name__}:"
                                 f" {str(e)[:300]}") from e
    assert tree_hash(site / "hosts") == before
    assert outcomes["planned"] and outcomes["refused"], outcomes  # the mutations reach both ends
