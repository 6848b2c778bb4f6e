"""Deadlines are for the whole handshake, request or control question, not for each receive
(issue 24, item 4): a peer that sends a byte at a time, each well within the timeout, used to
hold a client (attach, any request) or the control socket's only thread for minutes."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmemblk import control
from pmemblk import protocol as p
from pmemblk.errors import ConnectionLost, TransportError
from pmemblk.transport.stream import StreamTransport

from ..procs import Target

#: One byte this often: well within every timeout below, so only a deadline over the whole
#: exchange can stop it.
DRIBBLE = 0.25


class Dribbler:
    """A Unix-socket peer that, once it has passed ``fast`` bytes at once, sends the rest of
    what its source gives one byte every DRIBBLE seconds; ``sent`` counts what got through
    before the other side gave up."""

    def __init__(self, path: Path, source: Iterator[bytes] | None = None, fast: int = 0,
                 upstream: str | None = None) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.source, self.fast, self.upstream = source, fast, upstream
        self.sent = 0
        self.finished = threading.Event()
        self.gave_up = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        up = None
        if self.upstream is not None:
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.upstream)
            threading.Thread(target=self._forward, args=(conn, up), daemon=True).start()
            source: Iterator[bytes] = iter(lambda: up.recv(65536), b"")
        else:
            assert self.source is not None
            conn.recv(4096)  # the HELLO
            source = self.source
        try:
            for data in source:
                for i in range(len(data)):
                    if self.sent >= self.fast:
                        time.sleep(DRIBBLE)
                    conn.sendall(data[i:i + 1])
                    self.sent += 1
                    if self._closed(conn):
                        self.gave_up.set()
                        return
            self.finished.set()
        except OSError:
            self.gave_up.set()
        finally:
            conn.close()
            if up is not None:
                up.close()

    @staticmethod
    def _closed(conn: socket.socket) -> bool:
        try:
            return conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False

    @staticmethod
    def _forward(conn: socket.socket, up: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                up.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def test_a_challenge_sent_a_byte_at_a_time_fails_the_handshake_at_its_deadline(
        tmp_path: Path) -> None:
    challenge = p.Challenge(p.AUTH_NONE, bytes(32)).encode()
    peer = Dribbler(tmp_path / "d.sock", iter([challenge]))
    try:
        with pytest.raises(ConnectionLost, match=r"did not answer within 1s"):
            StreamTransport(f"unix:{tmp_path / 'd.sock'}", timeout=1.0)
        assert peer.gave_up.wait(30) and not peer.finished.is_set()
        assert peer.sent < len(challenge), (peer.sent, len(challenge))
    finally:
        peer.close()


def test_a_reply_sent_a_byte_at_a_time_fails_the_request_at_its_deadline(
        region: str, tmp_path: Path) -> None:
    target = Target(region, f"unix:{tmp_path / 't.sock'}", tmp_path, transport="tcp").start()
    # The handshake passes at once; every byte after it (the READ's reply) is dribbled.
    proxy = Dribbler(tmp_path / "p.sock", fast=p.CHALLENGE.size + p.WELCOME.size,
                     upstream=str(tmp_path / "t.sock"))
    t = StreamTransport(f"unix:{tmp_path / 'p.sock'}", timeout=1.0)
    try:
        with pytest.raises(TransportError, match=r"did not answer within 1s"):
            t.read(memoryview(bytearray(16)), 0)  # a 40-byte answer: 10 s at this pace
        t.close()
        assert proxy.gave_up.wait(30)
        assert proxy.sent < p.CHALLENGE.size + p.WELCOME.size + p.REPLY.size + 16
    finally:
        t.close()
        proxy.close()
        target.stop()


def test_an_asker_that_sends_a_byte_at_a_time_holds_the_control_socket_a_second_at_most(
        tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    with control.ControlServer(path, lambda: {"ok": True}, lambda: b"# none\n"):
        slow = socket.socket(socket.AF_UNIX)
        slow.connect(path)
        stop = threading.Event()
        finished = threading.Event()  # every byte sent: the server never cut it short

        def dribble() -> None:  # 64 bytes, never a newline: 16 s at this pace
            try:
                for _ in range(control.MAX_REQUEST):
                    if stop.wait(DRIBBLE):
                        return
                    slow.sendall(b"s")
                finished.set()
            except OSError:
                pass  # the server closed it at its deadline

        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        try:
            # Asked while the dribbler holds the only thread: answered once its deadline
            # (REQUEST_TIMEOUT) passes, well within the asker's own (TIMEOUT).
            assert json.loads(control.ask(path, "status")) == {"ok": True}
            assert not finished.is_set(), "the dribbler finished: it was never cut short"
        finally:
            stop.set()
            thread.join()
            slow.close()
