"""The installed ``xenrun`` command: invoke's Program over the same tasks that
``invoke`` runs in a site folder, owning its options.

invoke's own core options (``--dry`` "echo commands", ``--config`` for invoke's
configuration, ``--echo``, ``--pty``, ...) mean nothing for xenrun, and ``--dry``
before the subcommand used to be invoke's while the plan was applied for real. So
the program offers only its own global options (``--help``, ``--version``,
``--debug``) and a subcommand's options may come before it: ``xenrun --dry setup``
is ``xenrun setup --dry``. An option the subcommand does not take is refused with
one line and exit 2, as is any error of the command line; nothing is ignored.
"""

from __future__ import annotations

import inspect
import os
import sys

from invoke import Program
from invoke.exceptions import Exit, ParseError
from invoke.parser import Argument

from xenrun import __version__
from xenrun.tasks import ns

HELP_FLAGS = ("--help", "-h")
GLOBAL_FLAGS = (*HELP_FLAGS, "--version", "-V", "--list", "-l", "--debug")
BAD_USAGE = 2


def _refuse(message: str) -> Exit:
    return Exit(f"xenrun: {message}", code=BAD_USAGE)


class XenrunProgram(Program):
    """invoke's Program with xenrun's options only (see the module's docstring)."""

    def core_args(self) -> list[Argument]:
        return [
            Argument(names=("help", "h"), optional=True,
                     help="show this help, or a subcommand's: xenrun setup --help"),
            Argument(names=("list", "l"), kind=bool, default=False, help="list the subcommands"),
            Argument(names=("version", "V"), kind=bool, default=False, help="show xenrun's version"),
            Argument(names=("debug",), kind=bool, default=False,
                     help="add the traceback to a plugin's fault report (as XENRUN_DEBUG=1)"),
        ]

    def task_args(self) -> list[Argument]:
        return []

    # -- the command line, before invoke parses it ---------------------------

    def _contexts(self) -> dict:
        """Every subcommand's parser context, by each name it answers to."""
        # to_contexts() consumes each task's help dict: keep it for invoke's parser
        saved = [(t, dict(t.help)) for t in _tasks(self.namespace)]
        contexts = self.namespace.to_contexts()
        for t, help_of in saved:
            t.help = help_of
        found = {}
        for ctx in contexts:
            for name in (ctx.name, *ctx.aliases):
                found[name] = ctx
        return found

    def normalize_argv(self, argv) -> None:
        super().normalize_argv(argv)
        self.argv = [self.argv[0], *hoist(self.argv[1:], self._contexts())]

    # -- parsing: invoke's steps without invoke's options --------------------

    def parse_core(self, argv) -> None:
        self.normalize_argv(argv)
        try:
            self.parse_core_args()
        except ParseError as e:
            raise _refuse(str(e)) from None
        if self.args.version.value:
            self.print_version()
            raise Exit

    def parse_tasks(self) -> None:
        try:
            super().parse_tasks()
        except ParseError as e:
            raise _refuse(str(e)) from None

    def parse_cleanup(self) -> None:
        if self.args.debug.value:
            # read by the plugin-fault report (xenrun.errors), here and in forked workers
            os.environ["XENRUN_DEBUG"] = "1"
        wanted = self.args.help.value
        if wanted is True:
            self.print_help()
            raise Exit
        if wanted:
            if wanted not in self.parser.contexts:
                raise _refuse(f"no subcommand {wanted!r} (xenrun --help lists them)")
            self.print_task_help(wanted)
            raise Exit
        if self.args.list.value:
            self.list_tasks()
            raise Exit
        if not self.tasks:
            self.print_help()
            raise Exit

    def update_config(self, merge: bool = True) -> None:
        # xenrun's tasks read nothing from invoke's configuration: no command-line
        # option goes there (invoke's would set run.echo, run.dry, ...)
        if merge:
            self.config.merge()

    # -- help ----------------------------------------------------------------

    def print_help(self) -> None:
        print(f"Usage: {self.binary} [--debug] <subcommand> [--options]")
        print(f"       {self.binary} <subcommand> --help")
        print("")
        print("Global options:")
        print("")
        self.print_columns(self.initial_context.help_tuples())
        print(f"A subcommand's options may also come before it: `{self.binary} --dry setup` is"
              f" `{self.binary} setup --dry`.")
        print("")
        self.list_tasks()

    def print_task_help(self, name: str) -> None:
        ctx = self.parser.contexts[name]
        positional = " ".join(a.name.upper() for a in ctx.positional_args)
        print(f"Usage: {self.binary} {name} [--options]{' ' + positional if positional else ''}")
        print("")
        doc = inspect.getdoc(self.collection[name]) or ""
        for line in doc.splitlines():
            print(self.leading_indent + line if line.strip() else "")
        print("")
        print("Options:")
        tuples = ctx.help_tuples()
        if tuples:
            self.print_columns(tuples)
        else:
            print(self.leading_indent + "none\n")


def _tasks(collection):
    yield from collection.tasks.values()
    for sub in collection.collections.values():
        yield from _tasks(sub)


def _walk(args: list[str], contexts: dict):
    """Yield (index, token, kind) over a command line: kind is "task" for a
    subcommand's name, "flag" for an option (its value, when it takes one, comes
    as "value"), "other" for a positional word. Stops at "--"."""
    flags = {}
    for ctx in contexts.values():
        for flag, arg in ctx.flags.items():
            flags[flag] = arg.takes_value
    want_value = False
    for i, tok in enumerate(args):
        if tok == "--":
            return
        if want_value:
            want_value = False
            yield i, tok, "value"
        elif tok.startswith("-") and tok != "-":
            name, eq, _ = tok.partition("=")
            want_value = flags.get(name, False) and not eq
            yield i, tok, "flag"
        elif tok in contexts:
            yield i, tok, "task"
        else:
            yield i, tok, "other"


def hoist(args: list[str], contexts: dict) -> list[str]:
    """The command line with the options given before the subcommand moved after its
    name, so that they mean exactly what they mean there; ``--help`` anywhere after a
    subcommand becomes that subcommand's help (a subcommand taking a positional word
    would otherwise take "--help" as its value). Raises Exit (2) for an option that
    the subcommand does not take, one given twice, or no subcommand at all."""
    lead: list[str] = []        # the global options, in place
    moved: list[str] = []       # the subcommand's options given before it
    task_at = None
    items = list(_walk(args, contexts))
    for n, (i, tok, kind) in enumerate(items):
        if kind == "task":
            task_at = i
            break
        if kind == "other":
            raise _refuse(f"no subcommand {tok!r} (xenrun --help lists them)")
        if kind == "value":
            moved.append(tok)
            continue
        name = tok.partition("=")[0]
        if name in HELP_FLAGS:
            # `xenrun --help setup` is setup's help, as invoke has it
            following = [t for _, t, k in items[n + 1:] if k == "task"]
            return ["--help", following[0]] if following else ["--help"]
        if name in GLOBAL_FLAGS:
            lead.append(tok)
        elif any(name in ctx.flags for ctx in contexts.values()):
            moved.append(tok)
        else:
            raise _refuse(f"{name}: no such option (xenrun --help)")
    if task_at is None:
        if moved:
            raise _refuse(f"{moved[0].partition('=')[0]} needs a subcommand after it (xenrun --help lists them)")
        return lead + args[len(lead):]
    task = args[task_at]
    ctx = contexts[task]
    rest = args[task_at + 1:]
    given = _flags_of_first_task(rest, contexts)
    for tok in moved:
        if not tok.startswith("-"):
            continue
        name = tok.partition("=")[0]
        if name not in ctx.flags and name not in ctx.inverse_flags:
            raise _refuse(f"{name} is not an option of {task} (xenrun {task} --help)")
        if name in given and ctx.flags.get(name) is not None and ctx.flags[name].kind is not list:
            raise _refuse(f"{name} given twice, before and after {task}")
    current = task
    for _, tok, kind in _walk([task] + rest, contexts):
        if kind == "task":
            current = tok
        elif tok in HELP_FLAGS:
            return [*lead, "--help", current]
    return [*lead, task, *moved, *rest]


def _flags_of_first_task(rest: list[str], contexts: dict) -> set[str]:
    names = set()
    for _, tok, kind in _walk(rest, contexts):
        if kind == "task":
            break
        if kind == "flag":
            names.add(tok.partition("=")[0])
    return names


program = XenrunProgram(namespace=ns, version=__version__, name="xenrun", binary="xenrun")


def main() -> None:
    try:
        program.run()
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`xenrun plugins | head -1`): end quietly, as a
        # program killed by SIGPIPE would, and keep Python's exit flush from
        # complaining about the closed pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(128 + 13)
