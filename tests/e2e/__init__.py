"""The end-to-end machine (issue 6): an emulated Debian 12 host driven over SSH.

- ``image``: builds a bootable Debian 12 disk image once (debootstrap, kernel,
  GRUB on the disk's MBR, systemd, OpenSSH, ifupdown, LVM, Xen preinstalled) and
  caches it under $XENRUN_CACHE/e2e (or <repo>/.cache/e2e), stamped with its
  recipe so a change rebuilds it.
- ``vm``: boots it under QEMU TCG on a throw-away qcow2 overlay, user networking
  with restrict=on and SSH forwarded to 127.0.0.1 only, the serial console in a
  log file; reboots, waits for SSH, always kills QEMU.
- ``scenario``: the article end to end with the real ``xenrun`` command; run by
  tests/test_e2e.py and by ``invoke e2e`` (``python -m e2e`` with tests/ on the
  path) for a person to watch.

Not a test module: nothing here is collected by pytest.
"""
