"""A tiny HTTP server on 127.0.0.1 for download tests: byte ranges, truncation, request log.

``tgz(files)`` builds a .tar.gz in memory to serve. ``serve(routes)`` starts it in a thread; ``routes`` maps a URL path to ``Route``. Every
request is logged as ``(path, Range header or None)`` in ``server.log``.
"""
from __future__ import annotations

import io
import re
import tarfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes
    ranges: bool = True          # answer "Range: bytes=N-" with 206 and advertise Accept-Ranges
    send_only: int | None = None  # announce the full Content-Length but send this many bytes


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.log.append((self.path, rng))
        route = srv.routes.get(self.path)
        if route is None:
            self.send_error(404, "no such file")
            return
        body, start, status = route.body, 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if route.ranges and m:
            start = int(m.group(1))
            if start >= len(body):
                self.send_error(416, "range not satisfiable")
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        if route.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if route.send_only is not None:
            payload = payload[: route.send_only]
            self.close_connection = True
        self.wfile.write(payload)
        self.wfile.flush()


def serve(routes: dict):
    """Start a server for ``routes``; returns it (``.url(path)``, ``.log``, ``.shutdown()``)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes = routes
    srv.log = []
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv


def tgz(files: dict, extra=()) -> bytes:
    """A .tar.gz in memory: ``files`` name -> bytes, ``extra`` ready-made (TarInfo, bytes|None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tf.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()
