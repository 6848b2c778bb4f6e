"""Every parser fed valid, truncated, wrong-version, wrong-magic, oversize, out-of-range input."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import struct
import uuid

import pytest

from pmemblk import protocol as p
from pmemblk.errors import ProtocolError

V = p.PROTOCOL_VERSION

EXPORT = 64 << 20


def welcome(**kw: object) -> p.Welcome:
    fields: dict[str, object] = dict(
        export_size=EXPORT, block_size=4096, region_flags=p.REGION_IS_PMEM,
        flush_methods=p.FLUSH_APM | p.FLUSH_GPSPM, rkey=0x1234, remote_addr=0x7F0000001000,
        region_uuid=uuid.uuid4(), max_message_size=p.MAX_MESSAGE_SIZE, commit_depth=8,
    )
    fields.update(kw)
    return p.Welcome(**fields)  # type: ignore[arg-type]


def samples() -> list[tuple[bytes, object]]:
    """(encoded message, decoder) for one valid message of every type."""
    return [
        (p.Hello(readonly=True, nonce=b"n" * 16).encode(), p.Hello.decode),
        (welcome().encode(), p.Welcome.decode),
        (p.Challenge(p.AUTH_HMAC_SHA256, b"c" * 32).encode(), p.Challenge.decode),
        (p.Auth(b"m" * 32).encode(), p.Auth.decode),
        (p.Reject(16, "busy").encode(), p.Reject.decode),
        (p.Commit(7, ((0, 4096), (8192, 100))).encode(), lambda raw: p.Commit.decode(raw, EXPORT)),
        (p.CommitReply(7, 0).encode(), p.CommitReply.decode),
    ]


def test_round_trips() -> None:
    hello = p.Hello(readonly=True, nonce=bytes(range(16)), client_id=bytes(range(16, 32)))
    assert p.Hello.decode(hello.encode()) == hello
    w = welcome(loss_epoch=3, proof=bytes(range(32)))
    assert p.Welcome.decode(w.encode()) == w
    assert w.unproven() == dataclasses.replace(w, proof=bytes(32)).encode()
    ch = p.Challenge(p.AUTH_NONE, bytes(range(32)))
    assert p.Challenge.decode(ch.encode()) == ch
    assert p.Auth.decode(p.Auth(b"x" * 32).encode()) == p.Auth(b"x" * 32)
    assert p.Reject.decode(p.Reject(16, "busy").encode()) == p.Reject(16, "busy")
    c = p.Commit(7, ((0, 4096), (8192, 100)))
    assert p.Commit.decode(c.encode(), EXPORT) == c
    assert p.CommitReply.decode(p.CommitReply(9, 5).encode()) == p.CommitReply(9, 5)


def test_sizes_fit_rdma_cm_private_data() -> None:
    assert len(p.Hello().encode()) <= p.CM_CONNECT_PRIVATE_MAX
    assert len(p.Challenge(0, bytes(32)).encode()) <= p.CM_ACCEPT_PRIVATE_MAX
    assert len(welcome().encode()) <= p.MAX_MESSAGE_SIZE  # a SEND, after authentication
    assert len(p.Reject(1, "x" * 500).encode()) <= 148  # IB CM REJ private data


def test_cm_padding_is_accepted() -> None:
    # IB CM delivers private data padded with zeros to its full size.
    raw = p.Hello().encode().ljust(p.CM_CONNECT_PRIVATE_MAX, b"\0")
    assert p.Hello.decode(raw) == p.Hello()
    ch = p.Challenge(p.AUTH_HMAC_SHA256, b"c" * 32)
    assert p.Challenge.decode(ch.encode().ljust(p.CM_ACCEPT_PRIVATE_MAX, b"\0")) == ch
    # SEND messages have exact lengths
    with pytest.raises(ProtocolError, match="must be"):
        p.Welcome.decode(welcome().encode() + b"\0")
    with pytest.raises(ProtocolError, match="must be"):
        p.Auth.decode(p.Auth(bytes(32)).encode() + b"\0")


@pytest.mark.parametrize("index", range(7))
def test_every_truncation_is_rejected(index: int) -> None:
    raw, decode = samples()[index]
    for n in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode(raw[:n])  # type: ignore[operator]


@pytest.mark.parametrize("index", range(7))
def test_wrong_magic_and_version(index: int) -> None:
    raw, decode = samples()[index]
    with pytest.raises(ProtocolError, match="bad magic"):
        decode(b"XXXX" + raw[4:])  # type: ignore[operator]
    with pytest.raises(ProtocolError, match="protocol version 1 is not supported"):
        decode(raw[:4] + struct.pack("<H", 1) + raw[6:])  # type: ignore[operator]


@pytest.mark.parametrize("index", range(7))
def test_wrong_type(index: int) -> None:
    raw, decode = samples()[index]
    other = p.MSG_HELLO if index else p.MSG_WELCOME
    with pytest.raises(ProtocolError, match="unexpected message type"):
        decode(raw[:6] + struct.pack("<H", other) + raw[8:])  # type: ignore[operator]


def test_random_garbage_never_escapes_as_another_error() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        if rng.random() < 0.5:  # often a valid preamble, so the field checks are reached
            raw = p.PREAMBLE.pack(p.MAGIC, V, rng.randrange(1, 12)) + raw
        for _, decode in samples():
            with contextlib.suppress(ProtocolError):
                decode(raw)  # type: ignore[operator]


def test_hello_unknown_flags() -> None:
    raw = p.HELLO.pack(p.MAGIC, V, p.MSG_HELLO, 0x80, 0, bytes(16), bytes(16))
    with pytest.raises(ProtocolError, match="unknown flags"):
        p.Hello.decode(raw)
    with pytest.raises(ProtocolError, match="reserved"):
        p.Hello.decode(p.HELLO.pack(p.MAGIC, V, p.MSG_HELLO, 0, 1, bytes(16), bytes(16)))


def test_challenge_and_auth_checks() -> None:
    with pytest.raises(ProtocolError, match="unknown authentication method 7"):
        p.Challenge.decode(p.CHALLENGE.pack(p.MAGIC, V, p.MSG_CHALLENGE, 7, 0, 0, bytes(32)))
    with pytest.raises(ProtocolError, match="reserved"):
        p.Challenge.decode(p.CHALLENGE.pack(p.MAGIC, V, p.MSG_CHALLENGE, 1, 0, 9, bytes(32)))
    with pytest.raises(ProtocolError, match="reserved"):
        p.Auth.decode(p.AUTH.pack(p.MAGIC, V, p.MSG_AUTH, 0, 1, bytes(32), bytes(32)))


def test_auth_carries_a_checked_identity_name() -> None:
    auth = p.Auth(b"m" * 32, "host-a.1")
    assert p.Auth.decode(auth.encode()) == auth
    assert p.Auth.decode(p.Auth(b"m" * 32).encode()).identity == ""
    with pytest.raises(ProtocolError, match="does not match its name"):  # bytes past its length
        p.Auth.decode(p.AUTH.pack(p.MAGIC, V, p.MSG_AUTH, 2, 0, bytes(32), b"abc"))
    with pytest.raises(ProtocolError, match="does not match its name"):
        p.Auth.decode(p.AUTH.pack(p.MAGIC, V, p.MSG_AUTH, 33, 0, bytes(32), b"a" * 32))
    with pytest.raises(ProtocolError, match="characters"):
        p.Auth.decode(p.AUTH.pack(p.MAGIC, V, p.MSG_AUTH, 3, 0, bytes(32), b"a b"))
    with pytest.raises(ProtocolError, match="not ASCII"):
        p.Auth.decode(p.AUTH.pack(p.MAGIC, V, p.MSG_AUTH, 1, 0, bytes(32), b"\xff"))
    # a protocol-5 peer is refused with the reason
    with pytest.raises(ProtocolError, match="version 5 is not supported"):
        p.Hello.decode(p.HELLO.pack(p.MAGIC, 5, p.MSG_HELLO, 0, 0, bytes(16), bytes(16)))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"export_size": 0}, "not positive"),
        ({"block_size": 1000}, "block size"),
        ({"export_size": 4097}, "not a multiple"),
        ({"region_flags": 0x20}, "unknown region flags"),
        ({"lane_count": 8}, "grants lanes on a region without atomic blocks"),
        ({"flush_methods": 0x8}, "unknown flush methods"),
        ({"flush_methods": 0x3, "durable_methods": 0x4}, "are durable but offers"),
        ({"remote_addr": (1 << 64) - 4096}, "remote address"),
        ({"max_message_size": 8}, "max message size"),
        ({"max_message_size": 1 << 30}, "max message size"),
        ({"commit_depth": 0}, "commit depth"),
        ({"commit_depth": 5000}, "commit depth"),
    ],
)
def test_welcome_out_of_range(kw: dict[str, int], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.Welcome.decode(welcome(**kw).encode())


def test_welcome_native_bits_round_trip() -> None:
    w = welcome(region_flags=p.REGION_IS_PMEM | p.REGION_ATOMIC_WRITE,
                flush_methods=p.FLUSH_APM | p.FLUSH_GPSPM | p.FLUSH_NATIVE,
                durable_methods=p.FLUSH_GPSPM | p.FLUSH_NATIVE)
    back = p.Welcome.decode(w.encode())
    assert back == w and back.atomic_write and back.is_pmem


def test_reject_reason_length_checked() -> None:
    raw = p.REJECT.pack(p.MAGIC, V, p.MSG_REJECT, 5, 200) + b"x" * 200
    with pytest.raises(ProtocolError, match="exceeds"):
        p.Reject.decode(raw)
    raw = p.REJECT.pack(p.MAGIC, V, p.MSG_REJECT, 5, 10) + b"short"
    with pytest.raises(ProtocolError, match="truncated"):
        p.Reject.decode(raw)


def commit_raw(count: int, ranges: list[tuple[int, int]], reserved: int = 0) -> bytes:
    head = p.COMMIT.pack(p.MAGIC, V, p.MSG_COMMIT, count, reserved, 1)
    return head + b"".join(p.RANGE.pack(o, n) for o, n in ranges)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (commit_raw(0, []), "range count 0"),
        (commit_raw(p.MAX_COMMIT_RANGES + 1, [(0, 1)] * (p.MAX_COMMIT_RANGES + 1)), "range count"),
        (commit_raw(2, [(0, 1)]), "must be"),
        (commit_raw(1, [(0, 1), (0, 1)]), "must be"),
        (commit_raw(1, [(EXPORT - 10, 11)]), "past the end"),
        (commit_raw(1, [(EXPORT, 1)]), "past the end"),
        (commit_raw(1, [((1 << 64) - 1, 1)]), "past the end"),
        (commit_raw(1, [(0, 0)]), "empty"),
        (commit_raw(1, [(0, 1)], reserved=1), "reserved"),
    ],
)
def test_commit_hostile(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.Commit.decode(raw, EXPORT)


def test_commit_encode_limits_and_batches() -> None:
    with pytest.raises(ProtocolError):
        p.Commit(1, ()).encode()
    ranges = [(i * 8192, 4096) for i in range(600)]
    batches = p.commit_batches(ranges)
    assert [len(b) for b in batches] == [p.MAX_COMMIT_RANGES, p.MAX_COMMIT_RANGES,
                                         600 - 2 * p.MAX_COMMIT_RANGES]
    assert [r for b in batches for r in b] == ranges
    for b in batches:
        assert len(p.Commit(1, b).encode()) <= p.MAX_MESSAGE_SIZE
    small = p.COMMIT.size + 3 * p.RANGE.size  # a target that takes smaller messages
    assert [len(b) for b in p.commit_batches(ranges[:7], small)] == [3, 3, 1]
    assert [len(b) for b in p.commit_batches(ranges[:7], 1 << 20)] == [7]  # never over ours
    with pytest.raises(ProtocolError, match="does not fit"):
        p.commit_batches(ranges, p.COMMIT.size + p.RANGE.size - 1)


def test_a_channel_sends_commits_the_size_its_target_takes() -> None:
    """The WELCOME's max message size is what the client's COMMITs are cut to."""
    from pmemblk.transport import TransportBase

    class Recording(TransportBase):
        def __init__(self, info: p.Welcome) -> None:
            self.peer, self.info, self.ids = "test", info, 0
            self.sent: list[int] = []

        def _request_id(self) -> int:
            self.ids += 1
            return self.ids

        def _commit_exchange(self, message: bytes) -> bytes:
            commit = p.Commit.decode(message, EXPORT)
            self.sent.append(len(commit.ranges))
            return p.CommitReply(commit.request_id, 0).encode()

        def close(self) -> None:
            pass

    ranges = [(i * 8192, 4096) for i in range(5)]
    t = Recording(welcome(max_message_size=p.COMMIT.size + 2 * p.RANGE.size))
    t.commit(ranges)
    assert t.sent == [2, 2, 1]
    t = Recording(welcome())
    t.commit(ranges)
    assert t.sent == [5]


def test_commit_reply_exact_length_and_status() -> None:
    raw = p.CommitReply(1, 0).encode()
    with pytest.raises(ProtocolError, match="must be"):
        p.CommitReply.decode(raw + b"\0")
    bad = p.COMMIT_REPLY.pack(p.MAGIC, V, p.MSG_COMMIT_REPLY, -5, 0, 1)
    with pytest.raises(ProtocolError, match="negative"):
        p.CommitReply.decode(bad)


def test_message_type() -> None:
    assert p.message_type(p.CommitReply(1, 0).encode()) == p.MSG_COMMIT_REPLY
    with pytest.raises(ProtocolError):
        p.message_type(b"PMBK")
    with pytest.raises(ProtocolError, match="bad magic"):
        p.message_type(b"XXXX\x01\x00\x01\x00")


# --- stream frames ---------------------------------------------------------------------------

def test_io_request_round_trip_and_frame_sizes() -> None:
    for kind in (p.MSG_READ, p.MSG_WRITE, p.MSG_ZERO):
        req = p.IORequest(kind, 42, 4096, 1000)
        raw = req.encode()
        assert p.IORequest.decode(raw, EXPORT) == req
        assert p.request_header_size(raw[:8]) == p.IO.size
        extra = 1000 if kind == p.MSG_WRITE else 0
        assert p.parse_request_header(raw, EXPORT) == (p.IO.size + extra, req)
    hello = p.Hello().encode()
    assert p.request_header_size(hello[:8]) == 48
    assert p.parse_request_header(hello, EXPORT) == (48, None)
    auth = p.Auth(bytes(32)).encode()
    assert p.request_header_size(auth[:8]) == 80
    assert p.parse_request_header(auth, EXPORT) == (80, None)
    commit = p.Commit(1, ((0, 1), (10, 1))).encode()
    assert p.request_header_size(commit[:8]) == p.COMMIT.size
    assert p.parse_request_header(commit[:p.COMMIT.size], EXPORT) == (len(commit), None)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (p.IO.pack(p.MAGIC, V, p.MSG_READ, 1, 0, 0, 0), "out of range"),
        (p.IO.pack(p.MAGIC, V, p.MSG_READ, 1, 0, p.MAX_IO + 1, 0), "out of range"),
        (p.IO.pack(p.MAGIC, V, p.MSG_WRITE, 1, EXPORT - 1, 2, 0), "past the end"),
        (p.IO.pack(p.MAGIC, V, p.MSG_ZERO, 1, (1 << 64) - 1, 1, 0), "past the end"),
        (p.IO.pack(p.MAGIC, V, p.MSG_ZERO, 1, 0, 1, 5), "reserved"),
        (p.IO.pack(p.MAGIC, V, p.MSG_READ, 1, 0, 1, 0)[:20], "truncated"),
        (p.IO.pack(p.MAGIC, V, p.MSG_COMMIT_REPLY, 1, 0, 1, 0), "unexpected message type"),
    ],
)
def test_io_request_hostile(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.IORequest.decode(raw, EXPORT)


@pytest.mark.parametrize(
    "raw",
    [
        p.PREAMBLE.pack(p.MAGIC, V, p.MSG_WELCOME),  # a target's message from a client
        p.PREAMBLE.pack(p.MAGIC, V, 99),
        p.PREAMBLE.pack(b"JUNK", 1, p.MSG_HELLO),
        p.PREAMBLE.pack(p.MAGIC, 9, p.MSG_HELLO),
        b"PMBK",
    ],
)
def test_request_header_size_refuses(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.request_header_size(raw)


def test_parse_request_header_refuses_huge_commit() -> None:
    head = p.COMMIT.pack(p.MAGIC, V, p.MSG_COMMIT, 100000, 0, 1)
    with pytest.raises(ProtocolError, match="range count"):
        p.parse_request_header(head, EXPORT)


def test_reply_round_trip_and_checks() -> None:
    assert p.Reply.decode(p.Reply(5, 0, 4096).encode()) == p.Reply(5, 0, 4096)
    with pytest.raises(ProtocolError, match="negative"):
        p.Reply.decode(p.REPLY.pack(p.MAGIC, V, p.MSG_REPLY, 1, -1, 0))
    with pytest.raises(ProtocolError, match="payload length"):
        p.Reply.decode(p.REPLY.pack(p.MAGIC, V, p.MSG_REPLY, 1, 0, p.MAX_IO + 1))
    with pytest.raises(ProtocolError, match="payload length"):
        p.Reply.decode(p.REPLY.pack(p.MAGIC, V, p.MSG_REPLY, 1, 5, 10))  # error with data


def test_welcome_for_tcp_has_no_rdma_region() -> None:
    w = welcome(rkey=0, remote_addr=0)
    assert p.Welcome.decode(w.encode()) == w
