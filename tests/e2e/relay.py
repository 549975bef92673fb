"""QEMU's guestfwd command for the e2e machine's apt repository: relays one guest
connection to the test's HTTP server on 127.0.0.1.

QEMU (libslirp) starts ``python relay.py PORT`` for each connection the guest
opens to the forwarded address (``guestfwd=tcp:10.0.2.100:80-cmd:...``, see
tests/e2e/vm.py); the connection is the program's stdin and stdout (and
stderr, so nothing is ever written there). Bytes are copied both ways until the
server closes; when the guest stops sending, the socket's write side is shut
down and the answer still read. It connects to 127.0.0.1 only. Stdlib only.
"""

import os
import selectors
import socket
import sys

CHUNK = 1 << 16


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(port: int) -> None:
    upstream = socket.create_connection(("127.0.0.1", port), timeout=30)
    upstream.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "guest")
    sel.register(upstream, selectors.EVENT_READ, "server")
    while True:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(0, CHUNK)
                if data:
                    upstream.sendall(data)
                else:  # the guest sent all it will: tell the server, keep reading its answer
                    sel.unregister(0)
                    upstream.shutdown(socket.SHUT_WR)
            else:
                data = upstream.recv(CHUNK)
                if not data:  # the server is done: so is the guest's connection (closed on exit)
                    upstream.close()
                    return
                write_all(1, data)


def main() -> int:
    # stderr is the guest's connection too: nothing may go there
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        port = int(sys.argv[1])
        if not 0 < port < 65536:
            return 2
        relay(port)
    except (OSError, ValueError, IndexError):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
