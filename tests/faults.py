"""A fault-injecting HTTP proxy in front of the S3 API server: storage that fails like real storage does.

Requests pass through unchanged unless a rule matches their method and key; a rule answers with
an S3 error (503 SlowDown, 500 InternalError, 403 AccessDenied) or resets the connection. Actions
can run just before the first object is read (to delete an object between listing and reading).
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
import http.client
import http.server
import socket
import struct
import threading
import urllib.parse

ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}


class FaultyS3:
    """Proxy on a free loopback port; `fail(method, key, faults)` queues faults for one key."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.faults: dict[tuple[str, str], collections.deque] = {}
        self.always: dict[tuple[str, str], object] = {}
        self.before_first_read: list = []  # callables run once, before the first object GET is served
        self.holds: dict[tuple[str, str], threading.Event] = {}
        self.requests: collections.Counter = collections.Counter()  # (method, key) → requests seen
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, method: str, key: str, *faults) -> None:
        """The next requests `method /bucket/key` get these faults in turn (503, 500, 403 or "reset")."""
        self.faults.setdefault((method, key), collections.deque()).extend(faults)

    def fail_always(self, method: str, key: str, fault) -> None:
        """Every request `method /bucket/key` gets this fault."""
        self.always[(method, key)] = fault

    def hold(self, method: str, key: str) -> threading.Event:
        """Requests `method /bucket/key` wait until the returned event is set: a run that cannot finish."""
        self.holds[(method, key)] = threading.Event()
        return self.holds[(method, key)]

    def close(self) -> None:
        for event in self.holds.values():
            event.set()
        self.server.shutdown()
        self.server.server_close()

    def _next_fault(self, method: str, key: str):
        with self.lock:
            self.requests[(method, key)] += 1
            if method == "GET" and "/" in key:  # an object, not a bucket listing
                while self.before_first_read:
                    self.before_first_read.pop()()
            if (method, key) in self.always:
                return self.always[(method, key)]
            queued = self.faults.get((method, key))
            return queued.popleft() if queued else None

    def _forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            connection.request(method, path, body=body, headers=dict(headers))
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
                fault = proxy._next_fault(self.command, key)
                if (self.command, key) in proxy.holds:
                    proxy.holds[(self.command, key)].wait(timeout=300)
                if fault == "reset":
                    # SO_LINGER 0: closing sends a TCP reset, as a dropped connection does
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault in ERRORS:
                    code, message = ERRORS[fault]
                    xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                status, headers, payload = proxy._forward(self.command, self.path, self.headers.items(), body)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler


def interrupted_once_staged(command: list[str], folder, parts: int, held: threading.Event, what: str) -> tuple[int, str]:
    """Start `command`, send its process group Ctrl-C once `folder` holds `parts` staged part files, then let
    `held` (a read kept from finishing) go: the command's exit code and standard error."""
    interrupted = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(folder.glob("part-*.parquet"))) < parts:
            assert interrupted.poll() is None and time.monotonic() < deadline, f"{what} ended before it could be stopped"
            time.sleep(0.05)
        os.killpg(interrupted.pid, signal.SIGINT)
        _, stderr = interrupted.communicate(timeout=120)
    finally:
        held.set()
    return interrupted.returncode, stderr
