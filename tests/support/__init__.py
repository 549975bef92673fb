"""What the tests share, as a package (tests/ is on sys.path: pyproject's pytest
``pythonpath``; the benchmarks and ``invoke e2e`` put it there themselves):

- ``helpers``: REPO, EXAMPLES, HOSTS, STATE, tree_hash, file_map, run_xenrun,
  add_busybox, lab_host, talk (tests/conftest.py holds only fixtures).
- ``sshd``: a real OpenSSH server on 127.0.0.1 for SSH targets.
- ``xenpkgs``: Debian 12's Xen, kernel and tools fetched into the package cache.
- ``xenhost``: an emulated Xen host (Xen and a Debian dom0 under QEMU) running xl.
- ``boot_sites``: example hosts with real boot files, for ``xenrun boot-check``.
- ``netlab``: network namespaces with a DHCP server, for the real bridge switch.

Not test modules: nothing here is collected by pytest.
"""
