"""Boot Xen and a dom0 for real under QEMU, through GRUB, Syslinux or UEFI.

This is the harness behind ``boot-check`` and the project's QEMU tests.  It
builds a boot image the way a host's boot loader would see it (an ISO made by
grub-mkrescue, a Syslinux FAT image, or an EFI system partition holding
xen.efi), boots it under QEMU with the serial console on a pipe, and follows
the console line by line until the boot succeeded, clearly failed, or timed
out.  QEMU is always killed before :func:`boot` returns.

Stages reported on the way (``BootResult.stage`` is the last one reached):

====================  ===================================================
stage                 console line
====================  ===================================================
``xen started``       ``(XEN) Xen version``
``dom0 building``     ``*** Building a PV Dom0 ***`` or ``(XEN)  Dom0 kernel:``
``dom0 kernel``       ``Booting [paravirtualized ]kernel on Xen`` (Linux runs)
``hypervisor=xen``    ``XENRUN-HYPERVISOR-TYPE=xen`` printed by dom0 userspace
====================  ===================================================

Only the standard library is used; every command is an argv list.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "BootFiles",
    "BootResult",
    "KINDS",
    "LOADERS",
    "Loader",
    "BootImage",
    "STAGES",
    "HYPERVISOR_MARKER",
    "boot",
    "qemu_command",
    "missing_tools",
    "qemu_missing",
]

QEMU = "qemu-system-x86_64"
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
SYSLINUX_BIOS_DIR = Path("/usr/lib/syslinux/modules/bios")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

# `-cpu max` exposes SMAP/SMEP/PKU, which makes Xen 4.17's PV dom0 fault at
# once ("d0v0 Unhandled: vec 14, #PF"); qemu64 is known to work under TCG.
DEFAULT_CPU = "qemu64"
# dom0_mem=512M plus Xen's own heap fits; more RAM only costs TCG time in Xen's
# memory setup and in the firmware.
DEFAULT_MEMORY_MB = 1024

HYPERVISOR_MARKER = "XENRUN-HYPERVISOR-TYPE="

# Each stage has the message the notes name plus what a stock Debian 12 boot
# actually prints: Xen 4.17 logs "*** Building a PV Dom0 ***" only at
# loglvl=info, but always prints the "Dom0 kernel: 64-bit, ..." summary while
# building dom0; Linux 6.1 says "Booting kernel on Xen" (older kernels said
# "Booting paravirtualized kernel on Xen").
STAGES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\(XEN\) Xen version"), "xen started"),
    (re.compile(r"\*\*\* Building a PV Dom0 \*\*\*|\(XEN\)\s+Dom0 kernel: "), "dom0 building"),
    (re.compile(r"Booting (paravirtualized )?kernel on Xen"), "dom0 kernel"),
    (re.compile(re.escape(HYPERVISOR_MARKER) + r"xen\s*$"), "hypervisor=xen"),
)
STAGE_NAMES = tuple(name for _, name in STAGES)

# Failures that mean the boot is over whatever loader got us there.
_COMMON_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Panic on CPU \d+"), "Xen panicked"),
    (re.compile(r"Hardware Dom0 crashed"), "dom0 crashed"),
    (re.compile(r"Hardware Dom0 (shutdown|halted)"), "dom0 stopped before the boot was confirmed"),
    (re.compile(r"Kernel panic - not syncing"), "dom0 kernel panicked"),
)

# Loader messages, only believed before Xen starts (a dom0 kernel can print
# harmless "error:" or "failed" lines).  "Soft" ones may be survivable: GRUB
# prints "error: Can't get controller info" without a graphics card and boots
# anyway, so they fail the boot only if Xen has not started within
# _LOADER_GRACE_SECONDS.  "Final" ones mean the loader has given up.

MEDIA = ("cdrom", "disk", "uefi")


@dataclass(frozen=True)
class Loader:
    """What the harness must know of a boot loader to boot its image and judge its
    console: ``name`` (in messages), ``media`` how QEMU is handed the image
    ("cdrom": a BIOS El Torito ISO; "disk": a BIOS hard disk; "uefi": a FAT disk
    booted by OVMF), the ``soft`` and ``final`` error patterns above, and what
    building and booting its image ``needs``: (command on PATH or absolute file,
    Debian package) pairs. A boot plugin defines its own for a loader of its own."""

    name: str
    media: str
    soft: tuple[re.Pattern[str], ...] = ()
    final: tuple[re.Pattern[str], ...] = ()
    needs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.media not in MEDIA:
            raise ValueError(f"Loader {self.name!r}: media {self.media!r} is not one of {', '.join(MEDIA)}")
        for attr in ("soft", "final"):
            object.__setattr__(self, attr, tuple(re.compile(rx) if isinstance(rx, str) else rx
                                                 for rx in getattr(self, attr)))

    def missing(self) -> list[tuple[str, str]]:
        """The (tool, package) pairs of QEMU and ``needs`` that are absent here."""
        needs = [(QEMU, "qemu-system-x86"), *self.needs]
        if self.media == "uefi":
            needs += [(str(OVMF_CODE), "ovmf"), (str(OVMF_VARS), "ovmf")]
        return [(tool, pkg) for tool, pkg in needs
                if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool))]


_FAT_TOOLS = (("mkfs.vfat", "dosfstools"), ("mcopy", "mtools"))
LOADERS: dict[str, Loader] = {
    # GRUB waits for a key after a menu entry failed; prompts come without a
    # newline, so "final" patterns are also matched against the unterminated tail.
    "grub": Loader(
        "GRUB", "cdrom", soft=(r"\berror: ",),
        final=(r"Press any key to continue", r"^grub> ?$", r"No bootable device|Boot failed"),
        needs=(("grub-mkrescue", "grub-common"), (str(GRUB_PC_DIR / "moddep.lst"), "grub-pc-bin"),
               ("xorriso", "xorriso"))),
    "syslinux": Loader(
        "Syslinux", "disk", soft=(r"Could not find kernel image|not found|[Ff]ailed|Invalid|No files found",),
        final=(r"^boot: ?$", r"Boot failed|No bootable device"),
        needs=(("syslinux", "syslinux"), (str(SYSLINUX_BIOS_DIR / "mboot.c32"), "syslinux-common"), *_FAT_TOOLS)),
    # xen.efi's loader reports e.g. "Open failed for vmlinuz: Not found"; when it
    # returns to the firmware, OVMF falls back to its menu (UiApp)
    "uefi": Loader(
        "UEFI/xen.efi", "uefi", soft=(re.compile(r"failed for |Couldn't |Unable to |Not found", re.I),),
        final=(r"Shell> ?$", r"No bootable option|BdsDxe: failed to load|Access Denied",
               r'BdsDxe: (loading|starting) Boot\w+ "UiApp"'),
        needs=_FAT_TOOLS),
}
KINDS: tuple[str, ...] = tuple(LOADERS)
_LOADER_GRACE_SECONDS = 4.0

# After a failure line, keep reading briefly: Xen prints the panic reason on
# the lines following "Panic on CPU".
_FAILURE_CONTEXT_SECONDS = 1.5
_FAILURE_CONTEXT_LINES = 12

_ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>c78])")


@dataclass(frozen=True)
class BootFiles:
    """The pieces of a Xen boot.

    ``xen`` is the multiboot hypervisor (``xen-*.gz``, gzipped is fine for
    GRUB and mboot.c32), ``xen_efi`` the EFI build (``xen-*.efi``) or None if
    UEFI is not wanted, ``kernel`` the dom0 vmlinuz, ``initrd`` its initramfs.
    """

    xen: Path
    xen_efi: Path | None
    kernel: Path
    initrd: Path


@dataclass
class BootResult:
    """Outcome of :func:`boot`.

    ``stage`` is the last stage reached ("" if none), ``seconds`` the wall time
    from QEMU start to the verdict, ``marker_seconds`` when each stage (and
    extra marker) was first seen, ``log`` the serial console (escape sequences
    and carriage returns removed) followed by QEMU's stderr if any, and
    ``reason`` a one-paragraph explanation (the failing lines on failure).
    """

    ok: bool
    stage: str
    seconds: float
    marker_seconds: dict[str, float] = field(default_factory=dict)
    log: str = ""
    reason: str = ""


@dataclass(frozen=True)
class BootImage:
    """How ``xenrun boot-check`` makes and boots the image of a boot plugin's entry
    (the boot_image hook): the :class:`Loader` that boots it (its tools are checked
    before anything is read from the host), and ``build(workdir, files)``, which
    builds the image in ``workdir`` from ``files`` (path inside the image -> local
    copy of the host's file) and returns its path."""

    loader: Loader
    build: Callable[[Path, dict[str, Path]], Path]

    def __post_init__(self):
        if not isinstance(self.loader, Loader):
            raise TypeError("BootImage: loader must be a bootcheck.Loader")
        if not callable(self.build):
            raise TypeError("BootImage: build must be callable as build(workdir, files) -> image path")


# --- tool checks -------------------------------------------------------------

def loader_of(kind: str | Loader) -> Loader:
    """A builtin loader by name ("grub", "syslinux", "uefi"), or ``kind`` itself."""
    if isinstance(kind, Loader):
        return kind
    if kind not in LOADERS:
        raise ValueError(f"unknown boot kind {kind!r} (expected one of {', '.join(KINDS)}, or a Loader)")
    return LOADERS[kind]


def missing_tools(kind: str | Loader) -> list[str]:
    """Tools or files needed for ``kind`` that are absent, as "tool (package)"."""
    return [f"{tool} ({pkg})" for tool, pkg in loader_of(kind).missing()]


def qemu_missing(kind: str | Loader | None = None) -> str | None:
    """None if everything to build and boot ``kind`` (all builtin kinds if None) is
    installed, else a message naming the Debian packages to install."""
    loaders = LOADERS.values() if kind is None else (loader_of(kind),)
    missing: list[str] = []
    packages: list[str] = []
    for loader in loaders:
        for tool, pkg in loader.missing():
            if f"{tool} ({pkg})" not in missing:
                missing.append(f"{tool} ({pkg})")
                packages += [pkg] if pkg not in packages else []
    if not missing:
        return None
    return f"missing {', '.join(missing)}; install with: apt-get install {' '.join(packages)}"


# --- booting -------------------------------------------------------------------

def qemu_command(
    image: Path,
    kind: str | Loader,
    workdir: Path,
    *,
    cpu: str = DEFAULT_CPU,
    memory_mb: int = DEFAULT_MEMORY_MB,
    smp: int = 2,
) -> list[str]:
    """The QEMU argv used by :func:`boot` (UEFI: copies the OVMF VARS into ``workdir``)."""
    argv = [
        QEMU,
        "-accel", "tcg",  # KVM is not usable on the project's machines
        "-machine", "pc",
        "-cpu", cpu,
        "-smp", str(smp),
        "-m", str(memory_mb),
        # No default NIC, VGA, floppy or monitor: nothing to emulate that the
        # boot does not need, and no network at all.
        "-nodefaults",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
    ]
    media = loader_of(kind).media
    if media == "cdrom":
        argv += ["-drive", f"file={image},format=raw,media=cdrom,if=ide,readonly=on", "-boot", "d"]
    elif media == "disk":
        argv += ["-drive", f"file={image},format=raw,if=ide", "-boot", "c"]
    else:
        vars_copy = Path(workdir) / "OVMF_VARS.fd"
        # OVMF writes boot entries into VARS; a private copy keeps runs apart.
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-drive", f"file={image},format=raw,if=ide",
        ]
    return argv


def watch_pipes(proc: subprocess.Popen) -> selectors.BaseSelector:
    """A selector over ``proc``'s stdout and stderr, both made non-blocking, for
    read_pipes (the console loops of boot() and the tests' emulated host)."""
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    return sel


def read_pipes(sel: selectors.BaseSelector, wait: float):
    """(stream, chunk) for each stream with something to read within ``wait``
    seconds; ``chunk`` is b"" when the stream has closed (it is then unregistered)."""
    for key, _ in sel.select(wait):
        try:
            chunk = os.read(key.fileobj.fileno(), 65536)
        except BlockingIOError:
            continue
        if not chunk:
            sel.unregister(key.fileobj)
        yield key.fileobj, chunk


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a QEMU started in a session of its own (and anything it started), and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _clean(line: str) -> str:
    return _ANSI.sub("", line).replace("\r", "")


def boot(
    image: Path,
    kind: str | Loader,
    timeout: float = 180.0,
    progress: Callable[[str], None] | None = None,
    extra_markers: Iterable[str | tuple[str, str]] = (),
    *,
    require: str = "hypervisor=xen",
    workdir: Path | None = None,
    cpu: str = DEFAULT_CPU,
    memory_mb: int = DEFAULT_MEMORY_MB,
    smp: int = 2,
    follow_fallback: bool = False,
) -> BootResult:
    """Boot ``image`` under QEMU and follow the serial console.

    ``kind`` says how the image boots: ``"grub"`` (ISO from
    :func:`build_grub_iso`), ``"syslinux"`` (disk from
    :func:`build_syslinux_image`), ``"uefi"`` (ESP from
    :func:`build_esp_image`, booted by OVMF), or a plugin's own :class:`Loader`.  ``progress`` is called with
    each stage name as it is reached.  ``extra_markers`` are additional
    console substrings to time, given as ``"text"`` (stage named by the text)
    or ``("text", "stage name")``; they never decide success.

    ``require`` is the stage that counts as success: ``"dom0 kernel"`` (Linux
    took over from Xen, enough to check a real host's boot configuration) or
    ``"hypervisor=xen"`` (dom0 userspace saw /sys/hypervisor/type = xen).
    QEMU is stopped as soon as that stage or a clear failure is seen, or when
    ``timeout`` seconds have passed, and in any case before returning.

    ``follow_fallback``: a loader error is not the end; GRUB's "Press any key"
    is answered (over the serial line) so that it goes on to its fallback entry,
    and the verdict comes from what boots next.
    """
    if require not in STAGE_NAMES:
        raise ValueError(f"require must be one of {', '.join(STAGE_NAMES)}")
    loader = loader_of(kind)
    image = Path(image)
    workdir = Path(workdir) if workdir else image.parent
    argv = qemu_command(image, loader, workdir, cpu=cpu, memory_mb=memory_mb, smp=smp)

    watcher = _Watcher(loader, require, extra_markers, progress, follow_fallback)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if follow_fallback else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Own process group: a Ctrl-C aimed at the caller must not kill QEMU
        # behind our back, and killpg below reaches anything QEMU spawned.
        start_new_session=True,
    )
    sel = watch_pipes(proc)
    stderr_chunks: list[bytes] = []
    pending = b""
    try:
        open_streams = 2
        while open_streams and not watcher.finished(time.monotonic() - start):
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                watcher.timed_out(timeout)
                break
            for stream, chunk in read_pipes(sel, min(timeout - elapsed, watcher.next_wakeup(elapsed))):
                if not chunk:
                    open_streams -= 1
                elif stream is proc.stderr:
                    stderr_chunks.append(chunk)
                else:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        watcher.line(_clean(raw.decode("utf-8", "replace")), time.monotonic() - start)
                        if watcher.finished(time.monotonic() - start):
                            break
                    else:
                        watcher.tail(_clean(pending.decode("utf-8", "replace")), time.monotonic() - start)
                    if watcher.keypress and proc.stdin is not None:
                        watcher.keypress = False
                        try:
                            proc.stdin.write(b"\r")
                            proc.stdin.flush()
                        except OSError:
                            pass
        if not open_streams:
            # Both pipes closed: QEMU is gone.
            watcher.exited(proc.wait(timeout=5))
    finally:
        sel.close()
        kill_group(proc)
        for f in (proc.stdout, proc.stderr):
            if f is None:
                continue
            try:
                # QEMU's stderr explains bad options or unreadable images.
                os.set_blocking(f.fileno(), True)
                rest = f.read()
                if f is proc.stderr and rest:
                    stderr_chunks.append(rest)
            except (OSError, ValueError):
                pass
            f.close()

    seconds = round(time.monotonic() - start, 2)
    log = watcher.log
    if pending:
        log.append(_clean(pending.decode("utf-8", "replace")))
    text = "\n".join(log)
    err = b"".join(stderr_chunks).decode("utf-8", "replace").strip()
    reason = watcher.reason
    if err:
        text += "\n--- qemu stderr ---\n" + err
        if not watcher.ok and not watcher.marker_seconds:
            reason += f"\nqemu stderr: {err[-1000:]}"
    return BootResult(ok=watcher.ok, stage=watcher.stage, seconds=seconds,
                      marker_seconds=dict(watcher.marker_seconds), log=text, reason=reason)


class _Watcher:
    """Turns console lines into stages and a verdict (kept apart from the I/O)."""

    def __init__(self, loader: Loader, require: str, extra_markers: Iterable[str | tuple[str, str]],
                 progress: Callable[[str], None] | None, follow_fallback: bool = False) -> None:
        self.require, self.progress = require, progress
        self.follow_fallback = follow_fallback
        self.keypress = False  # the loader waits for a key (follow_fallback)
        self._answered: set[int] = set()
        self.markers: list[tuple[re.Pattern[str], str]] = list(STAGES)
        for m in extra_markers:
            text, name = (m, m) if isinstance(m, str) else (m[0], m[1])
            self.markers.append((re.compile(re.escape(text)), name))
        self.soft, self.final, self.loader = loader.soft, loader.final, loader.name
        self.log: list[str] = []
        self.marker_seconds: dict[str, float] = {}
        self.stage = ""
        self.ok = False
        self.reason = ""
        self.xen_started = False
        self.loader_errors: list[str] = []
        self.loader_error_at: float | None = None
        self.failed_at: float | None = None  # set once the boot has failed
        self.context_lines = 0
        self.done = False  # no more reading needed at all

    # -- verdict ---------------------------------------------------------------
    def finished(self, now: float) -> bool:
        if self.done:
            return True
        if self.failed_at is not None:
            # Give the failure's explanation (Xen's panic text) time to arrive.
            return now - self.failed_at >= _FAILURE_CONTEXT_SECONDS
        if (self.loader_error_at is not None and not self.xen_started
                and now - self.loader_error_at >= _LOADER_GRACE_SECONDS):
            self._fail(now, f"{self.loader} error, Xen did not start: " + " | ".join(self.loader_errors))
            self.done = True
        return self.done

    def next_wakeup(self, now: float) -> float:
        """How long the reader may block before :meth:`finished` must be asked again."""
        wake = 0.5
        if self.failed_at is not None:
            wake = _FAILURE_CONTEXT_SECONDS - (now - self.failed_at)
        elif self.loader_error_at is not None and not self.xen_started:
            wake = _LOADER_GRACE_SECONDS - (now - self.loader_error_at)
        return max(0.02, min(wake, 0.5))

    def _fail(self, now: float, reason: str) -> None:
        if self.failed_at is None:
            self.failed_at = now
            self.reason = reason

    def timed_out(self, timeout: float) -> None:
        if self.failed_at is None and not self.ok:
            self.reason = (f"timeout after {timeout:g} s waiting for {self.require!r}; "
                           f"last stage reached: {self.stage or 'none'}")
            if self.loader_errors:
                self.reason += f"; {self.loader} said: " + " | ".join(self.loader_errors)

    def exited(self, status: int | None) -> None:
        if self.failed_at is None and not self.ok:
            self.reason = (f"QEMU exited (status {status}) before {self.require!r}; "
                           f"last stage reached: {self.stage or 'none'}")

    # -- input -----------------------------------------------------------------
    def _press_any_key(self, text: str) -> bool:
        """With follow_fallback, answer "Press any key" once per occurrence."""
        if self.follow_fallback and "Press any key" in text:
            if len(self.log) not in self._answered:
                self._answered.add(len(self.log))
                self.keypress = True
            return True
        return False

    def tail(self, text: str, now: float) -> None:
        """The unterminated end of the stream: where prompts wait for input."""
        if self._press_any_key(text):
            return
        if self.failed_at is None and not self.xen_started and text.strip():
            for rx in self.final:
                if rx.search(text):
                    self._loader_gave_up(text, now)
                    return

    def _loader_gave_up(self, line: str, now: float) -> None:
        said = " | ".join(self.loader_errors)
        self._fail(now, f"{self.loader} failed: {said + ' | ' if said else ''}{line.strip()}")
        # An idle prompt or menu prints nothing more worth waiting for.
        self.done = True

    def line(self, line: str, now: float) -> None:
        """Digest one complete console line."""
        self.log.append(line)
        if self.done or self.ok:
            return
        if self.failed_at is not None:
            if line.strip():
                self.reason += "\n" + line.strip()
                self.context_lines += 1
                if self.context_lines >= _FAILURE_CONTEXT_LINES:
                    self.done = True
            return
        for rx, name in self.markers:
            if name not in self.marker_seconds and rx.search(line):
                self.marker_seconds[name] = round(now, 2)
                if name in STAGE_NAMES:
                    self.stage = name
                if name == "xen started":
                    self.xen_started = True
                if self.progress:
                    self.progress(name)
                if name == self.require:
                    self.ok = True
                    self.done = True
                    self.reason = f"reached {name!r} after {now:.1f} s"
                    return
        if HYPERVISOR_MARKER in line:
            value = line.split(HYPERVISOR_MARKER, 1)[1].strip()
            if value != "xen":
                self._fail(now, f"dom0 userspace reports hypervisor type {value!r}, not 'xen'")
                self.done = True
                return
        for rx, what in _COMMON_FAILURES:
            if rx.search(line):
                self._fail(now, f"{what}: {line.strip()}")
                if self.loader_errors:
                    self.reason += f"\n({self.loader} said earlier: " + " | ".join(self.loader_errors) + ")"
                return
        if self.xen_started or self._press_any_key(line):
            return
        for rx in self.final:
            if rx.search(line):
                self._loader_gave_up(line, now)
                return
        for rx in self.soft:
            if rx.search(line):
                self.loader_errors.append(line.strip())
                if self.loader_error_at is None and not self.follow_fallback:
                    self.loader_error_at = now
                return
