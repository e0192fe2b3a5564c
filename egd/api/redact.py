"""What of a request may be logged: URIs with every ``token`` parameter masked, header values made printable.

A client that sends its token slightly wrong (``?TOKEN=``, ``;token=``, ``tok%65n=``, a double-encoded
``%26token=`` inside another parameter) is refused, but its token must not land in the log all the same. The
URI is logged as it came (still percent-encoded, so a decoded control character cannot forge a log line);
only the pieces that carry a token, however encoded, are masked.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

#: Where a URI is cut into pieces: the query separators and the path-parameter separator.
_SEPARATORS = re.compile(r"([?&;#])")
#: A piece carries a token when, fully decoded, a parameter named ``token`` starts in it (any case, blanks and
#: control characters around the name, as sloppy clients and hostile ones produce).
_TOKEN_PARAMETER = re.compile(r"(?:^|[^a-z0-9_.~-])token[\s\x00-\x1f]*=", re.IGNORECASE)
#: Percent-encoding nested deeper than this is masked outright (nobody encodes a URI ten times by mistake).
_MAX_DECODING_ROUNDS = 10
MASK = "***"


def _decoded(piece: str) -> str | None:
    """``piece`` percent-decoded until nothing changes (None: still changing after the last round)."""
    for _ in range(_MAX_DECODING_ROUNDS):
        decoded = unquote_plus(piece, errors="replace")
        if decoded == piece:
            return decoded
        piece = decoded
    return None


def _masked(piece: str) -> str:
    """``piece`` (a path or one parameter) with its value masked if it carries a token."""
    decoded = _decoded(piece)
    if decoded is not None and not _TOKEN_PARAMETER.search(decoded):
        return piece
    name, equals, _ = piece.partition("=")
    decoded_name = _decoded(name)
    if equals and decoded_name is not None and "=" not in decoded_name:
        # The name cannot hide a value: keep it ("TOKEN", "tok%65n", or "x" whose value hides "&token=").
        return f"{name}={MASK}"
    return MASK  # "token%3D..." without a raw "=", or a name that hides one: the whole piece is masked


def loggable(uri: bytes | str) -> str:
    """``uri`` for a log line: every piece that carries a ``token`` parameter masked, non-printable characters
    escaped."""
    text = uri.decode("utf-8", "replace") if isinstance(uri, bytes) else uri
    pieces = _SEPARATORS.split(text)
    # Even indexes are the pieces, odd ones the separators between them.
    return printable("".join(part if index % 2 else _masked(part) for index, part in enumerate(pieces)), limit=4096)


def printable(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters with control characters escaped (a header value for a log line:
    it cannot start a line of its own)."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)
