"""A reverse proxy with a request body limit, on loopback, in front of a real server.

It behaves like nginx with ``client_max_body_size``: a request whose ``Content-Length`` is over
``max_body_bytes`` is answered ``413 Request Entity Too Large`` with a small HTML page and the
connection closed (the body is read and thrown away first, as nginx's lingering close does, so
the client reads the answer instead of a reset); any other request is forwarded to ``upstream``
and the upstream's answer relayed unchanged. It is a real proxy in front of a real server, not a
stand-in for one: everything that passes is answered by the server itself.

    with BodyLimitProxy(es.url, max_body_bytes=64 * 1024) as proxy:
        proxy.url      # "http://127.0.0.1:40211", give it to the client
        proxy.bulks    # every ``_bulk`` request in order: (status answered, documents in it)
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from .servers import LOOPBACK

# Not forwarded in either direction: they describe one connection, not the message.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                         "te", "trailer", "upgrade", "host", "content-length"})
_TOO_LARGE_PAGE = (b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n"
                   b"<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n"
                   b"</body>\r\n</html>\r\n")
_DRAIN_CHUNK = 65536


class BodyLimitProxy:
    def __init__(self, upstream: str, max_body_bytes: int) -> None:
        target = urlsplit(upstream)
        if target.scheme != "http" or target.hostname is None or target.port is None:
            raise ValueError(f"BodyLimitProxy forwards to http://host:port only, not {upstream}")
        self.max_body_bytes = max_body_bytes
        self.forwarded = 0
        self.refused = 0
        self.bulks: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        proxy = self
        upstream_host, upstream_port = target.hostname, target.port

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the client expects

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test reads the counters, not an access log

            def _note(self, status: int, newlines: int) -> None:
                with proxy._lock:
                    if status == 413:
                        proxy.refused += 1
                    else:
                        proxy.forwarded += 1
                    if "/_bulk" in self.path:
                        proxy.bulks.append((status, newlines // 2))

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > proxy.max_body_bytes:
                    newlines = 0
                    left = length
                    while left > 0:
                        chunk = self.rfile.read(min(_DRAIN_CHUNK, left))
                        if not chunk:
                            break
                        newlines += chunk.count(b"\n")
                        left -= len(chunk)
                    self._note(413, newlines)
                    self.send_response(413)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(_TOO_LARGE_PAGE)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(_TOO_LARGE_PAGE)
                    self.close_connection = True
                    return
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(upstream_host, upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self._note(answer.status, body.count(b"\n") if body else 0)
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _relay

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="body-limit-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> BodyLimitProxy:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
