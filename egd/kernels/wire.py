"""The Jupyter message wire formats: ZeroMQ frames on the kernel side, WebSocket frames on the client side.

The hot path is kernel -> client. A kernel's frames are already JSON; we verify the HMAC over the raw frames
and splice them into the WebSocket text without decoding ``content`` (only the small header is parsed, for the
top-level ``msg_id``/``msg_type`` copies clients expect and for routing). Client -> kernel is parsed once and
signed once. Formats:

- legacy text: one JSON object with ``header``, ``parent_header``, ``metadata``, ``content``, ``buffers``,
  ``channel`` (what Jupyter Server's gateway client speaks);
- legacy binary (messages with buffers): ``u32be nbufs | u32be offsets[nbufs] | JSON | buffers...``;
- ``v1.kernel.websocket.jupyter.org``: ``u64le n | u64le offsets[n] | channel | header | parent | metadata |
  content | buffers...`` with the JSON parts as raw bytes.
"""

from __future__ import annotations

import hmac
import itertools
import json
import struct
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

_DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
_CLIENT_CHANNELS = frozenset({"shell", "control", "stdin"})

_MAX_BUFFERS = 4096

#: A frame's bytes: ``bytes``, or a ``memoryview`` of a large ZeroMQ frame that is forwarded without a copy.
Blob = bytes | memoryview


class WireError(ValueError):
    """A message that cannot be accepted; the text says why (never echoes message content)."""


def _loads(data: Blob, what: str) -> Any:
    """Decode JSON; :class:`WireError` for anything that is not (also nesting too deep for the parser, which
    raises RecursionError, and bytes that are not UTF-8)."""
    try:
        return json.loads(data if isinstance(data, bytes) else bytes(data))
    except (ValueError, RecursionError):
        raise WireError(f"{what} is not JSON (or nested too deeply)") from None


class Signer:
    """HMAC signatures of Jupyter messages with a kernel's key (``signature_scheme`` ``hmac-<digest>``)."""

    def __init__(self, key: bytes, scheme: str = "hmac-sha256") -> None:
        if not scheme.startswith("hmac-"):
            raise WireError(f"unsupported signature scheme {scheme!r}")
        self._template = hmac.new(key, digestmod=scheme[5:]) if key else None

    def sign(self, parts: list[bytes] | list[Blob] | tuple[bytes, ...]) -> bytes:
        """The hex signature of header, parent header, metadata and content."""
        if self._template is None:
            return b""
        mac = self._template.copy()
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature: Blob, parts: list[Blob]) -> bool:
        """Whether ``signature`` is right for ``parts`` (constant-time compare)."""
        if self._template is None:
            return True
        return hmac.compare_digest(signature, self.sign(parts))


@dataclass(slots=True)
class RawMessage:
    """A Jupyter message as the four JSON frames plus buffers; ``header`` is parsed, the rest stays bytes.

    ``content`` and ``buffers`` may be memoryviews of a kernel's ZeroMQ frames (large ones are not copied).
    """

    header: bytes
    parent_header: bytes
    metadata: bytes
    content: Blob
    buffers: list[Blob] = field(default_factory=list)
    msg_id: str = ""
    msg_type: str = ""

    @property
    def size(self) -> int:
        """Bytes this message occupies (for buffer accounting)."""
        return (len(self.header) + len(self.parent_header) + len(self.metadata) + len(self.content)
                + sum(len(b) for b in self.buffers))

    def parent_msg_id(self) -> str | None:
        """The ``msg_id`` of the parent header, parsed on demand (replies are routed by it)."""
        if len(self.parent_header) <= 2:
            return None
        try:
            value = _loads(self.parent_header, "parent_header").get("msg_id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def json_content(self) -> Any:
        """Decode ``content`` (only for the few small messages egd looks into, such as ``status``);
        :class:`WireError` (a ValueError) if it is not JSON."""
        return _loads(self.content, "content")


def _parse_header(header: bytes) -> tuple[str, str]:
    """``(msg_id, msg_type)`` of a header frame; :class:`WireError` if it is not a JSON object with both."""
    parsed = _loads(header, "header")
    if not isinstance(parsed, dict):
        raise WireError("header is not a JSON object")
    msg_id, msg_type = parsed.get("msg_id"), parsed.get("msg_type")
    if not isinstance(msg_type, str) or not msg_type:
        raise WireError("header has no msg_type")
    return (msg_id if isinstance(msg_id, str) else ""), msg_type


def _small(frame: Blob) -> bytes:
    """``frame`` as bytes: for the frames egd parses or searches (a hostile kernel may make them large)."""
    return frame if isinstance(frame, bytes) else bytes(frame)


@dataclass(slots=True)
class SignedMessage:
    """A kernel's multipart message split at its delimiter, its signature not checked yet: the signature, the four
    signed parts and the buffers."""

    signature: Blob
    parts: list[Blob]
    buffers: list[Blob]

    @property
    def signed_size(self) -> int:
        """How many bytes the signature covers."""
        total = 0
        for part in self.parts:
            total += len(part)
        return total

    def verify(self, signer: Signer) -> bool:
        """Whether the kernel's key signed this message (may run in a thread: hashing releases the GIL)."""
        return signer.verify(self.signature, self.parts)

    def parse(self) -> RawMessage:
        """The message, its header parsed (:class:`WireError` if it is not a JSON object with a ``msg_type``)."""
        parts = self.parts
        header = _small(parts[0])
        msg_id, msg_type = _parse_header(header)
        return RawMessage(header, _small(parts[1]), _small(parts[2]), parts[3], self.buffers, msg_id, msg_type)

    def checked(self, signer: Signer) -> RawMessage:
        """The message once its signature is verified (:class:`WireError` otherwise), header parsed."""
        if not self.verify(signer):
            raise WireError("bad signature")
        return self.parse()


def split_zmq(frames: list[Blob]) -> SignedMessage:
    """Split a kernel's multipart message at its delimiter (nothing is checked or parsed yet)."""
    try:
        split = frames.index(_DELIMITER)
    except ValueError:
        raise WireError("no <IDS|MSG> delimiter") from None
    parts = frames[split + 2 : split + 6]
    if len(parts) < 4:
        raise WireError("too few frames")
    return SignedMessage(frames[split + 1], parts, frames[split + 6 :])


def from_zmq(frames: list[Blob], signer: Signer) -> RawMessage:
    """Split a kernel's multipart message, verify its signature, parse the header."""
    return split_zmq(frames).checked(signer)


def to_zmq(message: RawMessage, signer: Signer) -> list[Blob]:
    """The multipart frames that send ``message`` to a kernel (DEALER side: no routing identities)."""
    parts = [message.header, message.parent_header, message.metadata, message.content]
    return [_DELIMITER, signer.sign(parts), *parts, *message.buffers]


def _json_text(message: RawMessage, channel: str, with_buffers_key: bool) -> list[Blob]:
    """The pieces of the legacy JSON text of ``message``: the kernel's JSON frames spliced in, not decoded."""
    tail = b',"buffers":[],"channel":"' if with_buffers_key else b',"channel":"'
    return [
        b'{"header":', message.header,
        b',"msg_id":', json.dumps(message.msg_id).encode(),
        b',"msg_type":', json.dumps(message.msg_type).encode(),
        b',"parent_header":', message.parent_header,
        b',"metadata":', message.metadata,
        b',"content":', message.content,
        tail, channel.encode("ascii"), b'"}',
    ]


def legacy_pieces(message: RawMessage, channel: str) -> tuple[list[Blob], bool]:
    """``(pieces, is_binary)`` for a legacy-protocol client: JSON text, or the binary form with buffers.

    The payload is the concatenation of the pieces; the caller joins them once, together with its own framing,
    so that a large output is copied once between ZeroMQ and the transport.
    """
    if not message.buffers:
        return _json_text(message, channel, True), False
    text = _json_text(message, channel, False)
    sizes = [sum(len(piece) for piece in text), *(len(b) for b in message.buffers)]
    count = len(sizes)
    offsets = [4 * (count + 1)]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    return [struct.pack(f"!{count + 1}I", count, *offsets), *text, *message.buffers], True


def v1_pieces(message: RawMessage, channel: str) -> list[Blob]:
    """The pieces of the ``v1.kernel.websocket.jupyter.org`` binary frame (joined once by the caller)."""
    parts: list[Blob] = [channel.encode("ascii"), message.header, message.parent_header, message.metadata,
                         message.content, *message.buffers]
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return [struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets), *parts]


def to_legacy(message: RawMessage, channel: str) -> tuple[bytes, bool]:
    """``(payload, is_binary)`` for a legacy-protocol client, as one bytes object."""
    pieces, binary = legacy_pieces(message, channel)
    return b"".join(pieces), binary


def to_v1(message: RawMessage, channel: str) -> bytes:
    """The binary frame of the ``v1.kernel.websocket.jupyter.org`` protocol, as one bytes object."""
    return b"".join(v1_pieces(message, channel))


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _from_dict(msg: Any, buffers: list[Blob]) -> tuple[str, RawMessage]:
    if not isinstance(msg, dict):
        raise WireError("message is not a JSON object")
    channel = msg.get("channel", "shell")
    if not isinstance(channel, str) or channel not in _CLIENT_CHANNELS:
        raise WireError(f"cannot send on channel {str(channel)[:20]!r}")
    header = msg.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise WireError("header must be an object with a msg_type")
    pieces = []
    for key in ("parent_header", "metadata", "content"):
        value = msg.get(key) or {}
        if not isinstance(value, dict):
            raise WireError(f"{key} must be an object")
        pieces.append(value)
    msg_id = header.get("msg_id")
    try:
        encoded = [_dumps(header)] + [_dumps(p) for p in pieces]
    except (ValueError, RecursionError):
        raise WireError("message has values JSON cannot carry") from None
    raw = RawMessage(encoded[0], encoded[1], encoded[2], encoded[3], buffers,
                     msg_id if isinstance(msg_id, str) else "", header["msg_type"])
    return channel, raw


def from_legacy_text(payload: bytes) -> tuple[str, RawMessage]:
    """Parse a legacy JSON text frame from a client into ``(channel, message)``."""
    return _from_dict(_loads(payload, "frame"), [])


def from_legacy_binary(payload: bytes) -> tuple[str, RawMessage]:
    """Parse a legacy binary frame (JSON message plus buffers)."""
    try:
        (count,) = struct.unpack_from("!I", payload)
        if not 1 <= count <= _MAX_BUFFERS:
            raise WireError("bad buffer count")
        offsets = [*list(struct.unpack_from(f"!{count}I", payload, 4)), len(payload)]
    except struct.error:
        raise WireError("truncated binary frame") from None
    if offsets[0] < 4 * (count + 1) or any(b < a for a, b in itertools.pairwise(offsets)) or offsets[-2] > len(payload):
        raise WireError("bad offsets in binary frame")
    parts: list[Blob] = [payload[a:b] for a, b in itertools.pairwise(offsets)]
    return _from_dict(_loads(parts[0], "binary frame's message"), parts[1:])


def from_v1(payload: bytes) -> tuple[str, RawMessage]:
    """Parse a ``v1.kernel.websocket.jupyter.org`` frame; the JSON parts are forwarded as they are."""
    try:
        (count,) = struct.unpack_from("<Q", payload)
        if not 6 <= count <= _MAX_BUFFERS:
            raise WireError("bad part count")
        offsets = struct.unpack_from(f"<{count}Q", payload, 8)
    except struct.error:
        raise WireError("truncated v1 frame") from None
    ordered = all(a <= b for a, b in itertools.pairwise(offsets))
    if offsets[0] != 8 * (count + 1) or not ordered or offsets[-1] > len(payload):
        raise WireError("bad offsets in v1 frame")
    parts = [payload[a:b] for a, b in itertools.pairwise(offsets)]
    try:
        channel = parts[0].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("bad channel name") from None
    if channel not in _CLIENT_CHANNELS:
        raise WireError(f"cannot send on channel {channel[:20]!r}")
    msg_id, msg_type = _parse_header(parts[1])
    for part in parts[2:5]:
        if not part.startswith(b"{"):
            raise WireError("parent_header, metadata and content must be JSON objects")
    return channel, RawMessage(parts[1], parts[2], parts[3], parts[4], list[Blob](parts[5:]), msg_id, msg_type)


def utc_timestamp(when: datetime | None = None) -> str:
    """The Jupyter timestamp format, which Jupyter Server's gateway client parses strictly."""
    return (when or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_message(msg_type: str, content: dict[str, Any], session: str, parent: RawMessage | None = None) -> RawMessage:
    """A message egd itself originates (kernel_info probes, interrupt requests, synthesized status)."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": msg_type, "username": "egd", "session": session,
              "date": utc_timestamp(), "version": PROTOCOL_VERSION}
    return RawMessage(_dumps(header), parent.header if parent else b"{}", b"{}", _dumps(content),
                      [], msg_id, msg_type)
