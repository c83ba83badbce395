"""A small HTTP server on 127.0.0.1 for the download tests: files from memory, Range requests, injected faults.

    with FileServer({"/a.bin": payload}) as server:
        server.cut_after = [1000]      # the 1st GET sends 1,000 body bytes, then drops the connection
        download(server.url("/a.bin"), dest)
        server.requests                # [(path, range header or None, status), ...]

Faults apply to successive GET requests in order (one list entry per request; ``None`` = no fault).
"""
from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple


class FileServer:
    def __init__(self, files: Dict[str, bytes]) -> None:
        self.files = dict(files)
        self.cut_after: List[Optional[int]] = []     # per GET: drop the connection after this many body bytes
        self.stall: List[Optional[float]] = []       # per GET: sleep this long after the headers (a stalled server)
        self.status: List[Optional[int]] = []        # per GET: answer with this error status instead
        self.ignore_range = False                    # answer 200 with the whole file even to a Range request
        self.chunk_delay = 0.0                       # seconds between 64 KiB chunks (a slow link)
        self.requests: List[Tuple[str, Optional[str], int]] = []
        self._lock = threading.Lock()
        self._gets = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 20

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server._serve(self)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def gets(self, path: Optional[str] = None) -> int:
        return sum(1 for p, _, _ in self.requests if path is None or p == path)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    @staticmethod
    def _fault(faults: list, i: int):
        return faults[i] if i < len(faults) else None

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            i = self._gets
            self._gets += 1
        path = h.path.split("?")[0]
        range_header = h.headers.get("Range")
        body = self.files.get(path)
        status = self._fault(self.status, i)
        if body is None or status:
            status = status or 404
            self.requests.append((path, range_header, status))
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and not self.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.requests.append((path, range_header, 416))
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(body)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.requests.append((path, range_header, 206))
        else:
            h.send_response(200)
            self.requests.append((path, range_header, 200))
        h.send_header("Content-Length", str(len(body) - start))
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        stall = self._fault(self.stall, i)
        if stall:
            time.sleep(stall)
        cut = self._fault(self.cut_after, i)
        end = len(body) if cut is None else min(len(body), start + cut)
        try:
            for pos in range(start, end, 1 << 16):
                h.wfile.write(body[pos:min(end, pos + (1 << 16))])
                h.wfile.flush()
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if cut is not None:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)  # the client sees the connection drop mid-body
