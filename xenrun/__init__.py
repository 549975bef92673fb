"""xenrun: the ArchWiki Xen article as a planned, checked, repeatable and reversible run.

A plugin registers its hook implementations with ``from xenrun import hookimpl``;
that marker is all a plugin needs from the core to register.
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "xenrun"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
