"""The e2e machine's apt repository, served by the test on 127.0.0.1.

``serve(folder)`` starts an HTTP server on 127.0.0.1 (a free port) in a daemon
thread, serving the folder read-only (GET and HEAD). QEMU forwards the guest's
connections to 10.0.2.100:80 to it, each through tests/e2e/relay.py (see
``VM(guest_forward=...)``), so the machine's apt reaches Debian's packages that
the image build gathered (tests/e2e/image.py) and nothing else. Requests are
not printed; they are kept in ``server.requests`` and, when asked, written to a
log file.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

RELAY = Path(__file__).resolve().with_name("relay.py")  # run by QEMU, one process per guest connection


@dataclass(frozen=True)
class Request:
    path: str
    status: int
    size: int  # bytes of the body, 0 when unknown (an error)


class _Handler(SimpleHTTPRequestHandler):
    # keep-alive: apt sends its requests one after another on one connection (one relay)
    protocol_version = "HTTP/1.1"
    server: RepoServer

    def log_request(self, code="-", size="-") -> None:
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = 0
        length = 0
        if status == 200:  # called as the answer starts: the file's size is its body's
            try:
                length = os.path.getsize(self.translate_path(self.path))
            except OSError:
                pass
        self.server.record(Request(self.path, status, length))
        super().log_request(code, size)

    def log_message(self, format: str, *args) -> None:
        self.server.log_line(f"{self.address_string()} {format % args}")


class RepoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path, log: Path | None = None):
        self.folder = Path(folder)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._log = open(log, "a") if log else None  # noqa: SIM115 (open as long as the server)
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(self.folder)))
        self.thread = threading.Thread(target=self.serve_forever, name="e2e-aptrepo", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def log_line(self, line: str) -> None:
        if self._log:
            with self._lock:
                self._log.write(f"{time.strftime('%H:%M:%S')} {line}\n")
                self._log.flush()

    def fetched(self) -> list[str]:
        """The paths answered with a file (200), in order."""
        return [r.path for r in list(self.requests) if r.status == 200]

    def fetched_bytes(self) -> int:
        return sum(r.size for r in list(self.requests) if r.status == 200)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(folder: Path, log: Path | None = None) -> RepoServer:
    """Serve ``folder`` on 127.0.0.1 (any free port) until ``close()``."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no repository folder {folder}")
    server = RepoServer(folder, log)
    server.thread.start()
    return server
