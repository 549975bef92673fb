"""A network plugin whose hook can fail."""

from xenrun.api import hookimpl

from xenrun_faulty.fault import maybe


@hookimpl
def configure_network(facts, host):
    return maybe("configure_network", [])
