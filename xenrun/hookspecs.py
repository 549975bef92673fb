"""The hooks xenrun calls, in the order it calls them. Every hook is documented in one
template: what it does, when it is called, its parameters, what it returns (and what
None means), and whether the first result wins or every selected plugin is called.

A plugin implements any subset of these with ``@xenrun.hookimpl`` on a function of
the same name. Plugins never touch the host: they read ``facts`` and ``host`` and
return Changes (xenrun.changes); only the core applies them. A hook implementation
whose name is not listed here makes the run fail before anything happens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xenrun import hookspec

if TYPE_CHECKING:  # pragma: no cover - typing only
    from xenrun.bootcheck import BootImage
    from xenrun.changes import BootEntry, Change
    from xenrun.config import Host
    from xenrun.domains import DiskSpec, Domain, DomainDisk
    from xenrun.facts import Facts, Probe
    from xenrun.settings import Setting


@hookspec
def declare_settings() -> dict[str, dict[str, Setting]]:
    """Declare the settings a plugin reads from ``[plugin.NAME]`` in plugins.toml.

    When: once per host, after the plugin manager is built and before any value of
    plugins.toml is used, so that every value is checked before anything runs.
    Parameters: none.
    Returns: ``{plugin_name: {key: Setting}}``; None when the plugin has no settings.
    Unknown keys under ``[plugin.NAME]`` are refused.
    Every selected plugin is called.
    """


@hookspec
def detect_hardware(probe: Probe) -> dict | None:
    """Read facts about the host (steps S1 to S5), without changing anything.

    When: once per host, first, before any plan is made.
    Parameters: ``probe`` reads files, lists folders and runs read-only commands on
    the target (the running machine, a --root folder or an SSH host).
    Returns: a dict of new facts (a fragment of Facts); None for nothing. The core
    merges the fragments and refuses two plugins answering the same key.
    Every selected plugin is called (the core's own ``facts`` plugin too).
    """


@hookspec
def xen_options(facts: Facts, host: Host) -> list[str] | None:
    """Contribute options to the Xen hypervisor command line (step S14: dom0_mem,
    dom0_max_vcpus, dom0_vcpus_pin, console ...).

    When: once per host, after detect_hardware, before configure_boot.
    Parameters: ``facts`` of the host; ``host`` its configuration and settings.
    Returns: a list of ``key=value`` or flag strings; None for nothing.
    Every selected plugin is called; the options are joined in plugin order and
    handed to configure_boot, so every boot path gets the same line.
    """


@hookspec
def configure_host(facts: Facts, host: Host) -> list[Change] | None:
    """Plan the host-wide Xen steps that are not boot or network: installing Xen (S6),
    services (S12), xenfs in fstab (S13), stale udev rules (S27).

    When: once per host, after detect_hardware, before configure_boot.
    Parameters: ``facts``; ``host``.
    Returns: a list of Changes; None or [] for nothing to do.
    Every selected plugin is called; changes run in plugin order.
    """


@hookspec(firstresult=True)
def configure_boot(facts: Facts, host: Host, xen_options: list[str]) -> list[Change] | None:
    """Plan the bootloader changes that boot Xen with ``xen_options`` (S7 to S10, S14).

    When: once per host, after configure_host.
    Parameters: ``facts``; ``host``; ``xen_options`` the hypervisor command line
    gathered from xen_options.
    Returns: a list of Changes; None means "not mine" (the next plugin is asked).
    First result wins: a host selects exactly one boot plugin.
    """


@hookspec(firstresult=True)
def boot_entry(facts: Facts, host: Host, xen_options: list[str], linux_options: list[str]) -> BootEntry | None:
    """Describe the Xen boot entry that configure_boot plans, as a bootable image
    would hold it, for ``xenrun boot-check``.

    When: only by boot-check, after detect_hardware and xen_options.
    Parameters: ``facts``; ``host``; ``xen_options`` the hypervisor command line
    (boot-check adds a serial console); ``linux_options`` more dom0 kernel options
    (boot-check adds ``console=hvc0``).
    Returns: a BootEntry; None means "not mine".
    First result wins: the host's one boot plugin answers.
    """


@hookspec(firstresult=True)
def boot_image(entry: BootEntry) -> BootImage | None:
    """Say how ``xenrun boot-check`` makes a bootable image of ``entry`` and boots it
    in QEMU: a BootImage holding the Loader (how QEMU is handed the image, what the
    loader prints when it fails, the tools it needs) and ``build(workdir, files)``.
    xenrun.bootimages has the builders of the builtin loaders (``build_grub_iso``,
    ``build_syslinux_image``, ``build_esp_image``), xenrun.bootcheck their ``LOADERS``.

    When: only by boot-check, after boot_entry; the Loader's tools are checked
    before the entry's files are read from the host, then ``build`` is called.
    Parameters: ``entry`` the BootEntry this host's boot plugin described.
    Returns: a BootImage; None means "not mine" (``entry.kind`` is another loader's).
    First result wins: the host's one boot plugin answers.
    """


@hookspec(firstresult=True)
def promote_xen(facts: Facts, host: Host) -> list[Change] | None:
    """Make the Xen entry the default boot entry, once Xen has been seen to boot
    (S10, S15): until then the old Linux entry stays the default.

    When: by ``xenrun promote``, after the core checked that the host runs as
    Xen's Domain-0 (``xl list``).
    Parameters: ``facts``; ``host``.
    Returns: a list of Changes; None means "not mine".
    First result wins: the host's one boot plugin answers.
    """


@hookspec(firstresult=True)
def configure_network(facts: Facts, host: Host) -> list[Change] | None:
    """Plan the bridge that guests attach to (S11).

    When: once per host, after configure_boot.
    Parameters: ``facts``; ``host``.
    Returns: a list of Changes; None means "not mine".
    First result wins: a host selects at most one network plugin.
    """


@hookspec
def declare_disk_keys() -> dict[str, dict[str, Setting]]:
    """Declare the keys a disk backend reads from a guest's ``[[domain.NAME.disks]]``
    table (beside the keys every disk has: backend, vdev, access).

    When: when a guest is planned (domain.create, finish-install, delete), after its
    disk plugins are selected and before create_domain, so that every key is checked
    before anything runs.
    Parameters: none.
    Returns: ``{backend: {key: Setting}}`` (``Setting(check, default, help,
    required=...)``); None when the plugin declares none. The checked values, with
    defaults filled in, reach create_domain as ``disk.options``. An unknown key, a
    bad value or a missing required key is an error naming domains.toml's line.
    Every selected plugin is called; two plugins declaring one backend are refused.
    """


@hookspec(firstresult=True)
def create_domain(facts: Facts, host: Host, domain: Domain, disk: DiskSpec) -> DomainDisk | None:
    """Plan the disk of one guest (S16) and say how xl should see it.

    When: once per domain and disk, when a domain is created (``xenrun
    domain.create``), before its xl config is written.
    Parameters: ``facts``; ``host``; ``domain`` the validated guest spec;
    ``disk`` the one disk of ``domain`` to plan (its ``backend`` names the plugin;
    ``disk.options`` its keys as declare_disk_keys declared them, checked).
    Returns: a DomainDisk (the Changes that make the disk, the xl ``disk=``
    entry, notes for the plan, and the argv that removes the disk for ``delete
    --purge``); None means "not mine" (the disk names another backend).
    First result wins: the plugin named by the disk's ``backend`` answers.
    """


@hookspec
def declare_install_keys() -> dict[str, dict[str, Setting]]:
    """Declare the keys an installer reads from a guest's ``[domain.NAME.install]``
    table (beside ``method``, which names the installer plugin).

    When: when a guest with an install table is planned, after its installer plugin
    is selected (by ``method``) and before install_domain.
    Parameters: none.
    Returns: ``{method: {key: Setting}}``; None when the plugin declares none. The
    checked values, with defaults filled in, reach install_domain as
    ``domain.install.options``. An unknown key, a bad value or a missing required
    key is an error naming domains.toml's line.
    Every selected plugin is called; two plugins declaring one method are refused.
    """


@hookspec(firstresult=True)
def install_domain(facts: Facts, host: Host, domain: Domain, disk: str, new: bool) -> list[Change] | None:
    """Plan the installation of an operating system onto a guest's first disk.

    When: from ``xenrun domain.create``, for a guest whose domains.toml entry has an
    ``[domain.NAME.install]`` table naming this plugin as ``method``; after the
    disk plugins planned its disks, before its xl config is written and it starts.
    Parameters: ``facts``; ``host``; ``domain`` (``domain.install.options`` its
    install keys, checked); ``disk`` the path on the host of the first disk (an
    image file, a logical volume, a device) as the disk plugin made it; ``new``
    True when this plan makes that disk (it does not exist yet).
    Returns: the Changes that install the system (files written in dom0, and
    commands guarded so that a second run does nothing: a disk that already holds
    the installed system is left alone, and one that holds anything else is never
    overwritten). The Changes come before the xl config: a failure rolls back the
    disk this run made, and no config refers to a half-built disk. None means "not
    mine".
    First result wins: the plugin named by ``method`` answers.
    """
