"""The benchmark's job (job.py) as a xenrun plugin: benchmarks/fleet.py registers
it under the name "benchjob" (not shipped). The xen plugin, always selected, adds
the fstab line and the absent xend.rules."""

from job import COMMANDS, FILES, IMAGE, IMAGE_SIZE, LINK

from xenrun import hookimpl
from xenrun.changes import RunCommand, SparseFile, Symlink, WriteFile


@hookimpl
def configure_host(facts, host):
    changes = [WriteFile(path, content) for path, content in FILES.items()]
    changes.append(Symlink(*LINK))
    changes += [RunCommand(argv, creates=creates) for argv, creates in COMMANDS]
    changes.append(SparseFile(IMAGE, IMAGE_SIZE))
    return changes
