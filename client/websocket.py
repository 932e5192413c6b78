"""A small WebSocket client (RFC 6455) over the standard library: enough to follow ComfyUI's /ws messages
without adding a dependency (the client must run where only Python is installed, e.g. a laptop driving
remote servers). Receives text/binary messages, answers pings, sends masked frames."""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
from urllib.parse import urlsplit

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WebSocketClosed(ConnectionError):
    pass


class WebSocket:
    def __init__(self, url: str, headers: dict | None = None, timeout: float = 10.0):
        parts = urlsplit(url)
        secure = parts.scheme in ("wss", "https")
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        self.sock = sock
        self._buf = b""
        self._message, self._kind = b"", None  # a fragmented message being received
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status = head.split("\r\n", 1)[0]
        if " 101 " not in status + " ":
            self.close()
            raise ConnectionError(f"websocket handshake with {url} refused: {status}")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in head.split("\r\n")[1:] if ":" in line)}
        expect = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if fields.get("sec-websocket-accept") != expect:
            self.close()
            raise ConnectionError(f"websocket handshake with {url}: bad Sec-WebSocket-Accept")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            self._fill()
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise WebSocketClosed("connection closed by the server")
        self._buf += chunk

    def settimeout(self, seconds: float | None):
        self.sock.settimeout(seconds)

    def _frame(self):
        """(fin, opcode, payload) of the first whole frame in the buffer, consumed; None while it is incomplete."""
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, at = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, at = struct.unpack(">Q", buf[2:10])[0], 10
        mask = None
        if b1 & 0x80:
            if len(buf) < at + 4:
                return None
            mask, at = buf[at:at + 4], at + 4
        if len(buf) < at + n:
            return None
        payload, self._buf = buf[at:at + n], buf[at + n:]
        if mask:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        return b0 & 0x80, b0 & 0x0F, payload

    def recv(self) -> str | bytes:
        """The next text (str) or binary (bytes) message; raises socket.timeout, WebSocketClosed. Frames are taken
        from the buffer only when whole, and a fragmented message is kept across calls, so a timeout in the middle
        of a frame loses nothing: the next call goes on where this one stopped."""
        while True:
            frame = self._frame()
            if frame is None:
                self._fill()  # may time out: the buffer is left as it is
                continue
            fin, opcode, payload = frame
            if opcode == 8:
                raise WebSocketClosed("the server closed the websocket")
            if opcode == 9:
                self._send(10, payload)
                continue
            if opcode == 10:
                continue
            if opcode in (1, 2):
                self._kind, self._message = opcode, b""
            self._message += payload
            if fin:
                message, self._message = self._message, b""
                return message.decode("utf-8") if self._kind == 1 else message

    def _send(self, opcode: int, payload: bytes):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    def send_text(self, text: str):
        self._send(1, text.encode())

    def close(self):
        try:
            self._send(8, b"")
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
