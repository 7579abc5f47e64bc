"""A headless live preview: the newest overlay as MJPEG over HTTP (stdlib http.server), viewable in a browser.

Bound to 127.0.0.1 by default: the preview shows patient images and has no authentication, so reaching it
from another machine is a deliberate choice (`--host 0.0.0.0`, or better an SSH tunnel).
Pictures are JPEG-encoded only while someone watches, so an unwatched preview costs nothing per frame.

Limits: at most `max_clients` connections at once (more are closed at once), a connection that sends nothing or
stops reading for `idle_timeout_s` is dropped, and while bound to a loopback address a request whose Host header
is not a loopback name is refused (403): a web page on another site cannot reach the preview through its
visitor's browser by rebinding its DNS name to 127.0.0.1.

    /             a page showing the stream
    /stream.mjpg  multipart/x-mixed-replace JPEG stream
    /frame.jpg    the newest picture
"""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from ..core.errors import InputError

_PAGE = b"<!doctype html><title>nerveseg</title><body style='margin:0;background:#111'>" \
        b"<img src='/stream.mjpg' style='max-width:100%;max-height:100vh;display:block;margin:auto'>"
_BOUNDARY = b"nervesegframe"
_INTEREST_S = 2.0  # a /frame.jpg request keeps encoding on this long, so polling viewers see fresh pictures


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_CLIENTS = 4
IDLE_TIMEOUT_S = 10.0


class _BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that closes connections beyond `max_clients` before starting a thread for them.

    The connections held are a set, not a count: socketserver also calls `shutdown_request` for a connection
    that `verify_request` refused, and a count would take that close for the end of a held one, letting a
    further viewer in each time (8 clients on a bound of 4 once got 6 served)."""

    max_clients = MAX_CLIENTS

    def __init__(self, *args, **kwargs):
        self._held: set = set()
        self._held_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def verify_request(self, request, client_address) -> bool:
        with self._held_lock:
            if len(self._held) >= self.max_clients:
                return False  # socketserver closes it: one thread and socket per viewer, bounded
            self._held.add(request)
            return True

    def shutdown_request(self, request) -> None:
        with self._held_lock:
            self._held.discard(request)  # a refused connection was never held: it frees no place
        super().shutdown_request(request)


def _host_allowed(header: str | None) -> bool:
    """A loopback Host header: localhost, 127.0.0.1 or [::1], with or without a port."""
    if not header:
        return False
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in _LOOPBACK


class MjpegServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 8080, quality: int = 80,
                 max_clients: int = MAX_CLIENTS, idle_timeout_s: float = IDLE_TIMEOUT_S):
        self._quality = [cv2.IMWRITE_JPEG_QUALITY, quality]
        self._ready = threading.Condition()
        self._jpeg: bytes | None = None
        self._sequence = 0
        self._streams = 0
        self._last_request = 0.0
        self.closing = False
        self.check_host = host in _LOOPBACK
        self.idle_timeout_s = idle_timeout_s
        try:
            self._server = _BoundedServer((host, port), _handler_for(self))
            self._server.max_clients = max_clients
        except OSError as err:
            raise InputError(f"MJPEG preview: cannot listen on {host}:{port} ({err.strerror or err})") from None
        self._server.daemon_threads = True  # a viewer left open must not keep the process alive
        self.url = f"http://{host}:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="mjpeg", daemon=True)
        self._thread.start()
        if host not in _LOOPBACK:
            print(f"warning: the MJPEG preview on {host} is reachable from the network without a password",
                  file=sys.stderr)

    def wants_frames(self) -> bool:
        return self._jpeg is None or self._streams > 0 or time.monotonic() - self._last_request < _INTEREST_S

    def publish(self, bgr: np.ndarray) -> None:
        ok, encoded = cv2.imencode(".jpg", bgr, self._quality)
        if not ok:
            return  # an encoder hiccup loses one preview picture, nothing else
        with self._ready:
            self._jpeg, self._sequence = encoded.tobytes(), self._sequence + 1
            self._ready.notify_all()

    def next_picture(self, after: int, timeout: float = 1.0) -> tuple[bytes | None, int]:
        """The newest JPEG once it is newer than sequence number `after` (or None after `timeout`)."""
        with self._ready:
            if self._sequence <= after and not self.closing:
                self._ready.wait(timeout)
            return (self._jpeg, self._sequence) if self._sequence > after else (None, after)

    def latest(self) -> bytes | None:
        self._last_request = time.monotonic()
        return self._jpeg

    def count_stream(self, delta: int) -> None:
        with self._ready:
            self._streams += delta

    def close(self) -> None:
        with self._ready:
            self.closing = True
            self._ready.notify_all()
        self._server.shutdown()
        self._server.server_close()


def _handler_for(owner: MjpegServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = owner.idle_timeout_s  # socket timeout: a silent or stalled connection is dropped

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if owner.check_host and not _host_allowed(self.headers.get("Host")):
                self.send_error(403, "Host must be localhost while the preview is bound to it")
                return
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._reply(b"text/html; charset=utf-8", _PAGE)
            elif path == "/frame.jpg":
                picture = owner.latest()
                if picture is None:
                    self.send_error(503, "no frame yet")
                else:
                    self._reply(b"image/jpeg", picture)
            elif path == "/stream.mjpg":
                self._stream()
            else:
                self.send_error(404)

        def _reply(self, content_type: bytes, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type.decode())
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY.decode()}")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            owner.count_stream(+1)
            sequence = 0
            try:
                while not owner.closing:
                    picture, sequence = owner.next_picture(sequence)
                    if picture is None:
                        continue
                    self.wfile.write(b"--" + _BOUNDARY + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(picture)).encode() + b"\r\n\r\n" + picture + b"\r\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the viewer closed the page or stopped reading: that ends this stream, nothing else
            finally:
                owner.count_stream(-1)

        def log_message(self, format, *args):  # noqa: A002 (signature of http.server)
            pass  # one line per request would drown the run's own output

    return Handler
