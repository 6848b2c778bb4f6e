"""The pmemblk wire format: every message the client and target exchange.

All messages are little-endian and start with the same 8-byte preamble:

    magic "PMBK" (4) | protocol version u16 | message type u16

The handshake (docs/security.md) is HELLO → CHALLENGE → AUTH → WELCOME (or REJECT at any
step). Nothing about the region is sent before the target has checked AUTH. Over RDMA CM, HELLO
travels as the connect private data (at most 56 bytes), CHALLENGE as the accept private data and
REJECT, before the connection is established, as the reject private data; AUTH, WELCOME and a
later REJECT are two-sided SEND messages, like COMMIT and COMMIT_REPLY. CM private data may
arrive padded with zeros to its full size, so the HELLO, CHALLENGE and REJECT decoders ignore
bytes past their fixed layout; SEND messages must have their exact lengths.

Over a stream (TCP or a Unix socket) the same messages are frames, and READ, WRITE and ZERO
requests (tagged, several in flight) and their REPLY frames are added. ``request_header_size`` and
``parse_request_header`` tell a reader how long a frame is from its fixed part, after checking
it, so that no length is trusted before it is validated.

Every decoder validates before anything is used and raises ProtocolError saying what is wrong.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError, ProtocolError

MAGIC = b"PMBK"
#: 6: AUTH names the client's identity (serve --clients), and its MAC covers the name.
PROTOCOL_VERSION = 6

MSG_HELLO = 1
MSG_WELCOME = 2
MSG_REJECT = 3
MSG_COMMIT = 4
MSG_COMMIT_REPLY = 5
MSG_READ = 6
MSG_WRITE = 7
MSG_ZERO = 8
MSG_REPLY = 9
MSG_CHALLENGE = 10
MSG_AUTH = 11
MSG_CAS = 12
_TYPE_NAMES = {
    MSG_HELLO: "HELLO",
    MSG_WELCOME: "WELCOME",
    MSG_REJECT: "REJECT",
    MSG_COMMIT: "COMMIT",
    MSG_COMMIT_REPLY: "COMMIT_REPLY",
    MSG_READ: "READ",
    MSG_WRITE: "WRITE",
    MSG_ZERO: "ZERO",
    MSG_REPLY: "REPLY",
    MSG_CHALLENGE: "CHALLENGE",
    MSG_AUTH: "AUTH",
    MSG_CAS: "CAS",
}

# HELLO flags
HELLO_READONLY = 1 << 0
# Region flags in WELCOME
REGION_IS_PMEM = 1 << 0
REGION_READONLY = 1 << 1
REGION_ATOMIC_WRITE = 1 << 2  # the client may post 8-byte ATOMIC WRITEs into its rkey
REGION_ATOMIC_BLOCKS = 1 << 3  # the data area holds atomic blocks (pmemblk.atomicblocks)
REGION_SHARED = 1 << 4  # other read-write clients may be connected (serve --shared)
REGION_FLAGS = (REGION_IS_PMEM | REGION_READONLY | REGION_ATOMIC_WRITE | REGION_ATOMIC_BLOCKS
                | REGION_SHARED)
# Flush methods (bit mask in WELCOME)
FLUSH_APM = 1 << 0
FLUSH_GPSPM = 1 << 1
FLUSH_NATIVE = 1 << 2  # the IBTA FLUSH verb on the client's rkey (durable: PERSISTENT)
FLUSH_METHODS = {"apm": FLUSH_APM, "gpspm": FLUSH_GPSPM, "native": FLUSH_NATIVE}
# Authentication methods in CHALLENGE
AUTH_NONE = 0
AUTH_HMAC_SHA256 = 1
AUTH_METHODS = {AUTH_NONE: "none", AUTH_HMAC_SHA256: "hmac-sha256"}
CLIENT_NONCE_SIZE = 16
CLIENT_ID_SIZE = 16
TARGET_NONCE_SIZE = 32
MAC_SIZE = 32
#: An identity's name (serve --clients): 1 to 32 of these characters; "" is the anonymous
#: identity of a target with one --secret-file.
IDENTITY_MAX = 32
IDENTITY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

PREAMBLE = struct.Struct("<4sHH")
HELLO = struct.Struct("<4sHHII16s16s")  # preamble, flags, reserved, client nonce, client id
CHALLENGE = struct.Struct("<4sHHHHI32s")  # preamble, auth method, reserved x2, target nonce
AUTH = struct.Struct("<4sHHII32s32s")  # preamble, name length, reserved, MAC, identity name
WELCOME = struct.Struct("<4sHHQIIIIQ16sIHHQQHHI32s")
REJECT = struct.Struct("<4sHHIH")  # preamble, errno, reason length; reason follows
COMMIT = struct.Struct("<4sHHIIQ")  # preamble, range count, reserved, request id
RANGE = struct.Struct("<QQ")  # offset, length
COMMIT_REPLY = struct.Struct("<4sHHiIQ")  # preamble, status (0 or errno), reserved, request id
IO = struct.Struct("<4sHHQQII")  # preamble, tag, offset, length, reserved (READ/WRITE/ZERO/CAS)
CAS = struct.Struct("<QQ")  # a CAS request's payload: expected, new (its reply's: the old value)
CAS_WORD = 8
REPLY = struct.Struct("<4sHHQiI")  # preamble, tag, status (0 or errno), payload length

#: COMMIT messages one client channel may have outstanding (the WELCOME says it; over verbs
#: the target keeps this many receives posted per channel).
COMMIT_DEPTH = 8

CM_CONNECT_PRIVATE_MAX = 56
CM_ACCEPT_PRIVATE_MAX = 196
REJECT_REASON_MAX = 128  # IB CM REJ carries 148 bytes of private data
#: Largest COMMIT message: the target posts receive buffers of this size.
MAX_MESSAGE_SIZE = 4096
MAX_COMMIT_RANGES = (MAX_MESSAGE_SIZE - COMMIT.size) // RANGE.size
#: Largest READ/WRITE/ZERO a stream frame may carry or ask for.
MAX_IO = 32 << 20

assert HELLO.size <= CM_CONNECT_PRIVATE_MAX
assert CHALLENGE.size <= CM_ACCEPT_PRIVATE_MAX
assert WELCOME.size + REJECT.size + REJECT_REASON_MAX <= MAX_MESSAGE_SIZE
assert REJECT.size + REJECT_REASON_MAX <= 148


def _preamble(raw: bytes, expected: int) -> None:
    if len(raw) < PREAMBLE.size:
        raise ProtocolError(
            f"message truncated: {len(raw)} bytes, a preamble needs {PREAMBLE.size}")
    magic, version, mtype = PREAMBLE.unpack_from(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r}): not a pmemblk peer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    if mtype != expected:
        raise ProtocolError(
            f"unexpected message type {_TYPE_NAMES.get(mtype, mtype)} "
            f"(expected {_TYPE_NAMES[expected]})"
        )


def _need(raw: bytes, size: int, what: str) -> None:
    if len(raw) < size:
        raise ProtocolError(f"{what} truncated: {len(raw)} of {size} bytes")


def _exact(raw: bytes, layout: struct.Struct, what: str) -> None:
    """SEND messages have exact lengths (no CM padding)."""
    if len(raw) != layout.size:
        raise ProtocolError(f"{what} must be {layout.size} bytes, got {len(raw)}")


def message_type(raw: bytes) -> int:
    """The type of a message whose preamble is valid (any type)."""
    if len(raw) < PREAMBLE.size:
        raise ProtocolError(
            f"message truncated: {len(raw)} bytes, a preamble needs {PREAMBLE.size}")
    magic, version, mtype = PREAMBLE.unpack_from(raw)
    if magic != MAGIC or version != PROTOCOL_VERSION:
        _preamble(raw, mtype)  # raises with the precise reason
    return int(mtype)


# --- HELLO ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    readonly: bool = False
    #: Fresh per connection: binds the target's proof in WELCOME to this handshake.
    nonce: bytes = bytes(CLIENT_NONCE_SIZE)
    #: The same on every channel of one client (one plugin instance): the target counts those
    #: channels as one client, with one writer slot. All zeros: a client of its own.
    client_id: bytes = bytes(CLIENT_ID_SIZE)

    def encode(self) -> bytes:
        return HELLO.pack(MAGIC, PROTOCOL_VERSION, MSG_HELLO,
                          HELLO_READONLY if self.readonly else 0, 0, self.nonce, self.client_id)

    @classmethod
    def decode(cls, raw: bytes) -> Hello:
        _preamble(raw, MSG_HELLO)
        _need(raw, HELLO.size, "HELLO")
        _, _, _, flags, reserved, nonce, client_id = HELLO.unpack_from(raw)
        if flags & ~HELLO_READONLY:
            raise ProtocolError(f"HELLO has unknown flags 0x{flags:x}")
        if reserved:
            raise ProtocolError("HELLO reserved field is not zero")
        return cls(readonly=bool(flags & HELLO_READONLY), nonce=nonce, client_id=client_id)


# --- CHALLENGE and AUTH ----------------------------------------------------------------------

@dataclass(frozen=True)
class Challenge:
    """The target's answer to HELLO: how to authenticate, and a fresh nonce to do it with."""

    method: int
    nonce: bytes

    def encode(self) -> bytes:
        return CHALLENGE.pack(MAGIC, PROTOCOL_VERSION, MSG_CHALLENGE, self.method, 0, 0,
                              self.nonce)

    @classmethod
    def decode(cls, raw: bytes) -> Challenge:
        _preamble(raw, MSG_CHALLENGE)
        _need(raw, CHALLENGE.size, "CHALLENGE")
        _, _, _, method, r1, r2, nonce = CHALLENGE.unpack_from(raw)
        if method not in AUTH_METHODS:
            raise ProtocolError(f"CHALLENGE asks for unknown authentication method {method}")
        if r1 or r2:
            raise ProtocolError("CHALLENGE reserved fields are not zero")
        return cls(method, nonce)


def check_identity(name: str, what: str = "identity") -> str:
    """``name`` if it is a valid identity name (or "", the anonymous one); ConfigError if not."""
    if len(name) > IDENTITY_MAX or not set(name) <= IDENTITY_CHARS:
        raise ConfigError(f"{what} {name[:IDENTITY_MAX + 8]!r} is not a valid name: 1 to "
                          f"{IDENTITY_MAX} letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class Auth:
    """The client's proof that it holds its identity's secret (all zeros when the target does
    not authenticate), and the identity's name ("" for a target with one --secret-file)."""

    mac: bytes
    identity: str = ""

    def encode(self) -> bytes:
        name = self.identity.encode()
        return AUTH.pack(MAGIC, PROTOCOL_VERSION, MSG_AUTH, len(name), 0, self.mac, name)

    def unproven(self) -> bytes:
        """What the client's MAC covers of its AUTH: all of it but the MAC."""
        return Auth(bytes(MAC_SIZE), self.identity).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Auth:
        _preamble(raw, MSG_AUTH)
        _exact(raw, AUTH, "AUTH")
        _, _, _, length, reserved, mac, padded = AUTH.unpack_from(raw)
        if reserved:
            raise ProtocolError("AUTH reserved field is not zero")
        if length > IDENTITY_MAX or any(padded[length:]):
            raise ProtocolError(f"AUTH identity length {length} does not match its name")
        try:
            name = padded[:length].decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("AUTH identity name is not ASCII") from None
        if not set(name) <= IDENTITY_CHARS:
            raise ProtocolError(f"AUTH identity name {name!r} has characters a name cannot have")
        return cls(mac, name)


# --- WELCOME -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Welcome:
    """What the client learns about the export when the target accepts it."""

    export_size: int
    block_size: int
    region_flags: int
    flush_methods: int
    rkey: int
    remote_addr: int
    region_uuid: uuid.UUID
    max_message_size: int
    commit_depth: int
    #: Flush methods that give persistence (not only visibility) on this region.
    durable_methods: int = 0
    #: Counts the times the region may have lost unflushed writes (an unclean restart after
    #: a reboot or power cut): a reconnecting client compares it (docs/security.md).
    loss_epoch: int = 0
    #: Random for each start of the target: a client that meets another one knows the
    #: target restarted since it last saw it.
    instance: int = 0
    #: The atomic-blocks lanes this client may write through (pmemblk.atomicblocks): the
    #: first, how many (0: none), and which grant (new each time a writer is given lanes).
    lane_first: int = 0
    lane_count: int = 0
    lane_grant: int = 0
    #: HMAC proving the target holds the shared secret (zeros without authentication).
    proof: bytes = bytes(MAC_SIZE)

    @property
    def is_pmem(self) -> bool:
        return bool(self.region_flags & REGION_IS_PMEM)

    @property
    def readonly(self) -> bool:
        return bool(self.region_flags & REGION_READONLY)

    @property
    def atomic_write(self) -> bool:
        return bool(self.region_flags & REGION_ATOMIC_WRITE)

    @property
    def atomic_blocks(self) -> bool:
        return bool(self.region_flags & REGION_ATOMIC_BLOCKS)

    @property
    def shared(self) -> bool:
        return bool(self.region_flags & REGION_SHARED)

    def encode(self) -> bytes:
        return WELCOME.pack(
            MAGIC, PROTOCOL_VERSION, MSG_WELCOME, self.export_size, self.block_size,
            self.region_flags, self.flush_methods, self.rkey, self.remote_addr,
            self.region_uuid.bytes, self.max_message_size, self.commit_depth,
            self.durable_methods, self.loss_epoch, self.instance, self.lane_first,
            self.lane_count, self.lane_grant, self.proof,
        )

    def unproven(self) -> bytes:
        """The encoding the target's proof is computed over (the proof field zeroed)."""
        return self.encode()[:-MAC_SIZE] + bytes(MAC_SIZE)

    @classmethod
    def decode(cls, raw: bytes) -> Welcome:
        _preamble(raw, MSG_WELCOME)
        _exact(raw, WELCOME, "WELCOME")
        (_, _, _, size, bsize, rflags, methods, rkey, addr, uuid_b, max_msg, depth,
         durable, epoch, instance, lane_first, lane_count, grant, proof) = WELCOME.unpack_from(raw)
        if size <= 0:
            raise ProtocolError(f"WELCOME export size {size} is not positive")
        if bsize < 512 or bsize > 65536 or bsize & (bsize - 1):
            raise ProtocolError(f"WELCOME block size {bsize} is not a power of two in 512..65536")
        if size % bsize:
            raise ProtocolError(f"WELCOME export size {size} is not a multiple of {bsize}")
        if rflags & ~REGION_FLAGS:
            raise ProtocolError(f"WELCOME has unknown region flags 0x{rflags:x}")
        if methods & ~(FLUSH_APM | FLUSH_GPSPM | FLUSH_NATIVE):
            raise ProtocolError(f"WELCOME offers unknown flush methods 0x{methods:x}")
        if addr + size > 1 << 64:
            raise ProtocolError(f"WELCOME remote address 0x{addr:x} is invalid")
        if not (COMMIT.size + RANGE.size <= max_msg <= 1 << 20):
            raise ProtocolError(f"WELCOME max message size {max_msg} is out of range")
        if not (1 <= depth <= 1024):
            raise ProtocolError(f"WELCOME commit depth {depth} is out of range 1..1024")
        if durable & ~methods:
            raise ProtocolError(
                f"WELCOME says methods 0x{durable:x} are durable but offers 0x{methods:x}")
        if lane_count and not rflags & REGION_ATOMIC_BLOCKS:
            raise ProtocolError("WELCOME grants lanes on a region without atomic blocks")
        return cls(size, bsize, rflags, methods, rkey, addr, uuid.UUID(bytes=uuid_b),
                   max_msg, depth, durable, epoch, instance, lane_first, lane_count, grant,
                   proof)


# --- REJECT --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reject:
    errno: int
    reason: str

    def encode(self) -> bytes:
        reason = self.reason.encode("utf-8")[:REJECT_REASON_MAX]
        return REJECT.pack(MAGIC, PROTOCOL_VERSION, MSG_REJECT, self.errno, len(reason)) + reason

    @classmethod
    def decode(cls, raw: bytes) -> Reject:
        _preamble(raw, MSG_REJECT)
        _need(raw, REJECT.size, "REJECT")
        _, _, _, err, length = REJECT.unpack_from(raw)
        if length > REJECT_REASON_MAX:
            raise ProtocolError(f"REJECT reason length {length} exceeds {REJECT_REASON_MAX}")
        _need(raw, REJECT.size + length, "REJECT reason")
        reason = raw[REJECT.size:REJECT.size + length].decode("utf-8", errors="replace")
        return cls(err, reason)


# --- COMMIT --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Commit:
    """Persist these (offset, length) ranges of the export, then reply."""

    request_id: int
    ranges: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        if not 1 <= len(self.ranges) <= MAX_COMMIT_RANGES:
            raise ProtocolError(
                f"a COMMIT carries 1..{MAX_COMMIT_RANGES} ranges, not {len(self.ranges)}"
            )
        head = COMMIT.pack(MAGIC, PROTOCOL_VERSION, MSG_COMMIT, len(self.ranges), 0,
                           self.request_id)
        return head + b"".join(RANGE.pack(o, n) for o, n in self.ranges)

    @classmethod
    def decode(cls, raw: bytes, export_size: int) -> Commit:
        _preamble(raw, MSG_COMMIT)
        _need(raw, COMMIT.size, "COMMIT")
        _, _, _, count, reserved, req_id = COMMIT.unpack_from(raw)
        if reserved:
            raise ProtocolError("COMMIT reserved field is not zero")
        if not 1 <= count <= MAX_COMMIT_RANGES:
            raise ProtocolError(
                f"COMMIT range count {count} is out of range 1..{MAX_COMMIT_RANGES}")
        expected = COMMIT.size + count * RANGE.size
        if len(raw) != expected:
            raise ProtocolError(
                f"COMMIT of {count} ranges must be {expected} bytes, got {len(raw)}")
        ranges = tuple(RANGE.iter_unpack(raw[COMMIT.size:]))
        for off, length in ranges:
            if length == 0 or off + length > export_size:
                raise ProtocolError(
                    f"COMMIT range [{off}, {off + length}) is empty or past the end of the "
                    f"{export_size}-byte export"
                )
        return cls(req_id, ranges)


def commit_batches(ranges: Sequence[tuple[int, int]], max_message_size: int = MAX_MESSAGE_SIZE
                   ) -> list[tuple[tuple[int, int], ...]]:
    """Split a list of ranges into COMMITs of at most ``max_message_size`` bytes (what the
    target's WELCOME says it takes; never more than this side's own limit)."""
    per = (min(max_message_size, MAX_MESSAGE_SIZE) - COMMIT.size) // RANGE.size
    if per < 1:
        raise ProtocolError(f"a COMMIT of one range does not fit in {max_message_size} bytes")
    return [tuple(ranges[i:i + per]) for i in range(0, len(ranges), per)]


@dataclass(frozen=True)
class CommitReply:
    request_id: int
    status: int  # 0 or a positive errno

    def encode(self) -> bytes:
        return COMMIT_REPLY.pack(MAGIC, PROTOCOL_VERSION, MSG_COMMIT_REPLY, self.status, 0,
                                 self.request_id)

    @classmethod
    def decode(cls, raw: bytes) -> CommitReply:
        _preamble(raw, MSG_COMMIT_REPLY)
        _exact(raw, COMMIT_REPLY, "COMMIT_REPLY")
        _, _, _, status, _, req_id = COMMIT_REPLY.unpack_from(raw)
        if status < 0:
            raise ProtocolError(f"COMMIT_REPLY status {status} is negative")
        return cls(req_id, status)


# --- stream requests: READ, WRITE, ZERO and their REPLY -------------------------------------

@dataclass(frozen=True)
class IORequest:
    kind: int  # MSG_READ, MSG_WRITE, MSG_ZERO or MSG_CAS (length: its payload, CAS.size)
    tag: int
    offset: int
    length: int

    def encode(self) -> bytes:
        return IO.pack(MAGIC, PROTOCOL_VERSION, self.kind, self.tag, self.offset, self.length, 0)

    @classmethod
    def decode(cls, raw: bytes, export_size: int) -> IORequest:
        if len(raw) < PREAMBLE.size:
            raise ProtocolError(f"request truncated: {len(raw)} bytes")
        kind = PREAMBLE.unpack_from(raw)[2]
        if kind not in (MSG_READ, MSG_WRITE, MSG_ZERO, MSG_CAS):
            kind = MSG_READ  # let _preamble name the unexpected type
        _preamble(raw, kind)
        _need(raw, IO.size, _TYPE_NAMES[kind])
        _, _, _, tag, offset, length, reserved = IO.unpack_from(raw)
        if reserved:
            raise ProtocolError(f"{_TYPE_NAMES[kind]} reserved field is not zero")
        if kind == MSG_CAS:
            if length != CAS.size or offset % CAS_WORD or offset + CAS_WORD > export_size:
                raise ProtocolError(f"CAS of {length} bytes at {offset}: it takes {CAS.size} "
                                    f"bytes for an aligned 8-byte word inside the export")
            return cls(kind, tag, offset, length)
        if not 1 <= length <= MAX_IO:
            raise ProtocolError(f"{_TYPE_NAMES[kind]} length {length} is out of range 1..{MAX_IO}")
        if offset + length > export_size:
            raise ProtocolError(
                f"{_TYPE_NAMES[kind]} [{offset}, {offset + length}) is past the end of the "
                f"{export_size}-byte export"
            )
        return cls(kind, tag, offset, length)


@dataclass(frozen=True)
class Reply:
    tag: int
    status: int  # 0 or a positive errno
    length: int  # payload bytes that follow (READ data)

    def encode(self) -> bytes:
        return REPLY.pack(MAGIC, PROTOCOL_VERSION, MSG_REPLY, self.tag, self.status, self.length)

    @classmethod
    def decode(cls, raw: bytes) -> Reply:
        _preamble(raw, MSG_REPLY)
        _need(raw, REPLY.size, "REPLY")
        _, _, _, tag, status, length = REPLY.unpack_from(raw)
        if status < 0:
            raise ProtocolError(f"REPLY status {status} is negative")
        if length > MAX_IO or (status and length):
            raise ProtocolError(f"REPLY payload length {length} is invalid")
        return cls(tag, status, length)


_REQUEST_HEADERS = {MSG_HELLO: HELLO.size, MSG_AUTH: AUTH.size, MSG_COMMIT: COMMIT.size,
                    MSG_READ: IO.size, MSG_WRITE: IO.size, MSG_ZERO: IO.size, MSG_CAS: IO.size}


def request_header_size(preamble: bytes) -> int:
    """Size of the fixed part of a client-to-target frame, from its 8-byte preamble."""
    mtype = message_type(preamble)
    size = _REQUEST_HEADERS.get(mtype)
    if size is None:
        raise ProtocolError(
            f"unexpected message type {_TYPE_NAMES.get(mtype, mtype)} from a client")
    return size


def parse_request_header(header: bytes, export_size: int) -> tuple[int, IORequest | None]:
    """(total frame size, the decoded READ/WRITE/ZERO/CAS request or None) from a frame's fixed
    part, validated first: a stream reader decodes each request header once."""
    mtype = message_type(header)
    if mtype == MSG_HELLO:
        return HELLO.size, None
    if mtype == MSG_AUTH:
        return AUTH.size, None
    if mtype == MSG_COMMIT:
        _need(header, COMMIT.size, "COMMIT")
        count = int(COMMIT.unpack_from(header)[3])
        if not 1 <= count <= MAX_COMMIT_RANGES:
            raise ProtocolError(
                f"COMMIT range count {count} is out of range 1..{MAX_COMMIT_RANGES}")
        return COMMIT.size + count * RANGE.size, None
    req = IORequest.decode(header, export_size)
    return IO.size + (req.length if mtype in (MSG_WRITE, MSG_CAS) else 0), req
