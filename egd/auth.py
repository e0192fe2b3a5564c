"""Who is asking: credentials in, an :class:`Identity` out.

Three kinds of credential, all sent as ``Authorization: token <t>`` / ``Bearer <t>`` or ``?token=<t>``:

- the shared token (``auth.token``): a trusted client such as a per-user Jupyter Server or an operator's tool.
  It names the user in ``KERNEL_USERNAME`` and sees every kernel (Enterprise Gateway's model);
- per-user tokens (``auth.users``, stored as SHA-256): the identity is the user the token belongs to;
- signed JWTs (``auth.jwt``, HS256 or RS256): the identity comes from a claim, with ``exp`` and ``aud`` checked.

A user-bound identity sees and touches only its own kernels and cannot start one for another user. With no
credential configured, egd serves loopback only and every caller is the local operator.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

import jwt

from egd.config import AuthConfig

#: A user name from a JWT: checked with fullmatch (``$`` would let "alice\n" through, a line in the audit log).
_CLAIMED_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True)
class Identity:
    """The caller of one request."""

    #: The user the credential belongs to; None for a trusted client (shared token) or the local operator.
    user: str | None
    groups: frozenset[str] = frozenset()
    admin: bool = False
    #: How the caller proved it: ``none`` (no auth configured), ``token``, ``user-token`` or ``jwt``.
    method: str = "none"

    @property
    def bound(self) -> bool:
        """True when the identity is one user's (who may act only as that user)."""
        return self.user is not None

    def owns(self, username: str) -> bool:
        """Whether this caller may see and use a kernel of ``username``."""
        return not self.bound or self.admin or self.user == username

    def describe(self) -> str:
        """For logs: the user and how they authenticated."""
        return f"{self.user or 'trusted client'} ({self.method}{', admin' if self.admin else ''})"


LOCAL_OPERATOR = Identity(None, admin=True, method="none")


class AuthenticationFailed(Exception):
    """The credential is missing or not valid; the text says why, for the log (never the credential)."""


def token_digest(token: str | bytes) -> str:
    """The SHA-256 hex digest of a token, as ``auth.users.*.token_sha256`` stores it."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).hexdigest()


class Authenticator:
    """Turns a presented credential into an :class:`Identity` according to ``auth``."""

    def __init__(self, auth: AuthConfig) -> None:
        self._auth = auth
        self._shared = auth.token.encode() if auth.token else None
        self._users = {u.token_sha256: u for u in auth.users}
        self._member_of: dict[str, set[str]] = {}
        for group, members in auth.groups.items():
            for member in members:
                self._member_of.setdefault(member, set()).add(group)

    @property
    def required(self) -> bool:
        """Whether requests must carry a credential."""
        return self._auth.configured

    def _identity(self, user: str, groups: set[str], admin: bool, method: str) -> Identity:
        groups = groups | self._member_of.get(user, set())
        admin = admin or user in self._auth.admin_users or bool(groups & set(self._auth.admin_groups))
        return Identity(user, frozenset(groups), admin, method)

    def authenticate(self, presented: bytes | None) -> Identity:
        """The identity behind ``presented``; :class:`AuthenticationFailed` if there is none."""
        if not self.required:
            return LOCAL_OPERATOR
        if not presented:
            raise AuthenticationFailed("no credentials")
        if self._shared is not None and hmac.compare_digest(presented, self._shared):
            return Identity(None, admin=True, method="token")
        user = self._users.get(token_digest(presented))
        if user is not None:
            return self._identity(user.name, set(user.groups), user.admin, "user-token")
        if self._auth.jwt is not None and presented.count(b".") == 2:
            return self._from_jwt(presented.decode("ascii", "replace"))
        raise AuthenticationFailed("unknown credentials")

    def _from_jwt(self, token: str) -> Identity:
        config = self._auth.jwt
        assert config is not None
        try:
            claims: dict[str, Any] = jwt.decode(
                token, config.key, algorithms=[config.algorithm], audience=config.audience, issuer=config.issuer,
                leeway=config.leeway, options={"require": ["exp", "aud", config.user_claim]})
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("expired JWT") from None
        except jwt.InvalidTokenError as exc:
            raise AuthenticationFailed(f"invalid JWT ({type(exc).__name__})") from None
        user = claims.get(config.user_claim)
        if not isinstance(user, str) or not _CLAIMED_USER.fullmatch(user):
            raise AuthenticationFailed(f"the JWT's {config.user_claim} claim is not a user name")
        raw_groups = claims.get(config.groups_claim) or []
        groups = {g for g in raw_groups if isinstance(g, str)} if isinstance(raw_groups, list) else set()
        return self._identity(user, groups, False, "jwt")
