"""The end-to-end machine (issue 6): an emulated Debian 12 host driven over SSH.

- ``image``: builds a bootable Debian 12 disk image once (debootstrap, kernel,
  GRUB on the disk's MBR, systemd, OpenSSH, ifupdown, LVM; no Xen) and beside it
  a flat apt repository of Debian's packages for installing Xen, and caches both
  under $XENRUN_CACHE/e2e (or <repo>/.cache/e2e), stamped with its recipe so a
  change rebuilds it.
- ``aptrepo``: serves that repository on 127.0.0.1; ``relay.py`` is the command
  QEMU runs for each guest connection to 10.0.2.100:80, relaying it there.
- ``vm``: boots it under QEMU TCG on a throw-away qcow2 overlay, user networking
  with restrict=on, SSH forwarded to 127.0.0.1 only and the repository forwarded
  in, the serial console in a log file; reboots, waits for SSH, always kills QEMU.
- ``scenario``: the article end to end with the real ``xenrun`` command; run by
  tests/vm/test_e2e.py and by ``invoke e2e`` (``python -m e2e`` with tests/ on the
  path) for a person to watch.

Not a test module: nothing here is collected by pytest.
"""
