"""A fault-injecting HTTP reverse proxy on 127.0.0.1, put in front of a test server (the hub stand-in, the GCS
emulator) so the real clients meet real network faults:

    with FaultProxy(server_url) as proxy:
        proxy.add("GET", r"/resolve/.*\\.safetensors$", 503, times=2)   # an HTTP status (Retry-After: 0)
        proxy.add("GET", r"/resolve/", "truncate", times=1)             # half the body, then the connection closes
        proxy.add("POST", r"/commit/", "drop", times=None)              # connection closed, no answer (forever)
        proxy.add("GET", r"/resolve/", "corrupt", times=1)              # one byte flipped, length unchanged

Rules are tried in order; the first matching one with tries left is applied (and counted down), otherwise the
request is forwarded as is. `proxy.applied` lists (method, path, action) of every fault injected. The Host header
is passed through unchanged, so URLs the server builds from it point back at the proxy.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


@dataclass
class Rule:
    method: str | None
    pattern: re.Pattern
    action: int | str
    times: int | None  # None: forever


class FaultProxy:
    def __init__(self, target: str):
        """`target`: the server's URL. Injected errors carry a JSON body in Google's API error shape
        (`{"error": {"code", "message", "errors"}}`), which the hub client reads as well."""
        parsed = urllib.parse.urlsplit(target)
        self.target = (parsed.hostname, parsed.port or 80)
        self.rules: list[Rule] = []
        self.applied: list[tuple[str, str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy._handle(self)

            do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def add(self, method: str | None, pattern: str, action: int | str, times: int | None = 1) -> None:
        with self.lock:
            self.rules.append(Rule(method, re.compile(pattern), action, times))

    def count(self, action: int | str | None = None) -> int:
        return sum(1 for _, _, a in self.applied if action is None or a == str(action))

    # ------------------------------------------------------------------------------------------------ serving

    def _pick(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.requests.append((method, path))
            for r in self.rules:
                if (
                    (r.method is None or r.method == method)
                    and r.pattern.search(path)
                    and (r.times is None or r.times > 0)
                ):
                    if r.times is not None:
                        r.times -= 1
                    self.applied.append((method, path, str(r.action)))
                    return r
        return None

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    h.rfile.readline()
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        rule = self._pick(h.command, h.path)
        if rule is not None and isinstance(rule.action, int):
            data = json.dumps(
                {
                    "error": {
                        "code": rule.action,
                        "message": "injected fault",
                        "errors": [{"message": "injected fault", "reason": "backendError"}],
                    }
                }
            ).encode()
            h.send_response(rule.action)
            h.send_header("Content-Type", "application/json")
            h.send_header("Retry-After", "0")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            return
        if rule is not None and rule.action == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return
        conn = http.client.HTTPConnection(*self.target, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or h.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn.request(h.command, h.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if rule is not None and rule.action == "corrupt" and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                h.send_header(k, v)
        # HEAD: the length of the body a GET would get (clients read the file size from it)
        length = resp.getheader("Content-Length", "0") if h.command == "HEAD" else str(len(data))
        h.send_header("Content-Length", length)
        h.end_headers()
        if h.command == "HEAD":
            return
        if rule is not None and rule.action == "truncate":
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        h.wfile.write(data)
