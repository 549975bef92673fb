"""Targets: where a plan is read and applied (see ``targets.base`` for the contract).

``targets.local``: the running machine or a machine root in a folder;
``targets.ssh``: a host over SSH (imported only by SSH runs).
"""

from xenrun.targets.base import SEARCH_PATH, TMP_SUFFIX, FileInfo, Result, Target, resolve_in_root, tmp_name
from xenrun.targets.local import LocalTarget

__all__ = ["Target", "LocalTarget", "FileInfo", "Result", "SEARCH_PATH", "TMP_SUFFIX", "resolve_in_root", "tmp_name"]
