"""The installed ``xenrun`` command: invoke's Program over the same tasks that
``invoke`` runs in a site folder."""

from invoke import Program

from xenrun import __version__
from xenrun.tasks import ns

program = Program(namespace=ns, version=__version__, name="xenrun", binary="xenrun")


def main() -> None:
    program.run()
