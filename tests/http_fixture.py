"""A loopback HTTP server for tests of remote shards: serves a folder on 127.0.0.1 (port 0), counts
requests per path, and can cut the first N responses of a path short (the connection closes after half
the body, as a reset or a dying proxy would) to exercise the reader's retry and resume."""
from __future__ import annotations

import functools
import http.server
import threading
from collections import Counter
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests[path] += 1
            cut = srv.cut.get(path, 0) > 0
            if cut:
                srv.cut[path] -= 1
        if not cut:
            return super().do_GET()
        data = (Path(self.directory) / path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True


class LoopbackServer:
    """`with LoopbackServer(folder) as s:` -> s.url ("http://127.0.0.1:PORT"), s.requests, s.cut."""

    def __init__(self, folder: str | Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(_Handler, directory=str(folder)))
        self.httpd.requests, self.httpd.cut, self.httpd.lock = Counter(), {}, threading.Lock()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> Counter:
        return self.httpd.requests

    @property
    def cut(self) -> dict:
        return self.httpd.cut

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
