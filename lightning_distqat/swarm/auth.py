"""Access tokens: an experiment whose peers share a secret admits no one else.

- DHT: every request and response between DHT nodes carries an HMAC (SHA-256) of its bytes under a key derived from
  the token, with a timestamp and a nonce (hivemind's authorizer interface, ``AuthorizerBase``): a node without the
  token can neither store, read nor answer, so it cannot find the experts or the averaging groups.
- Expert RPCs: every request carries a proof bound to the libp2p identities of caller and callee (which libp2p
  authenticates), so a proof seen once cannot be replayed by anyone else.

The token is never sent; only proofs are. Pure stdlib cryptography (hmac, hashlib).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Optional

from lightning_distqat import _hivemind  # noqa: F401  (imports hivemind quietly, before the lines below do)
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.crypto import RSAPublicKey
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

__all__ = ["AccessToken", "ACCESS_DENIED"]

ACCESS_DENIED = ("this expert serves a protected experiment and the caller did not prove that it holds its access "
                 "token (SwarmConfig.access_token / ExpertConfig.access_token)")
_CLOCK_SKEW = 60.0


class AccessToken:
    """An experiment's shared secret. ``proof(caller, callee)`` for expert RPCs, ``authorizer()`` for the DHT."""

    def __init__(self, token: str, experiment: str) -> None:
        if not token:
            raise ValueError("an access token must not be empty")
        self._key = hashlib.sha256(f"distqat:{experiment}:{token}".encode()).digest()

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, purpose + b"\0" + data, hashlib.sha256).digest()

    def proof(self, caller: str, callee: str) -> str:
        """The proof that ``caller`` sends with its requests to ``callee`` (peer ids in base58)."""
        return self._mac(b"rpc", f"{caller}->{callee}".encode()).hex()

    def check(self, proof: Any, caller: str, callee: str) -> bool:
        return isinstance(proof, str) and hmac.compare_digest(proof, self.proof(caller, callee))

    def authorizer(self) -> "SharedSecretAuthorizer":
        return SharedSecretAuthorizer(self)


class SharedSecretAuthorizer(AuthorizerBase):
    """hivemind's DHT authorizer interface over a shared secret: requests and responses are signed with an HMAC of
    their serialized bytes; requests carry a time (accepted within 60 s) and a nonce (never accepted twice)."""

    def __init__(self, token: AccessToken) -> None:
        self._token = token
        self._recent_nonces = TimedStorage()

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key: Optional[RSAPublicKey]) -> None:
        request.auth.time = get_dht_time()
        request.auth.nonce = secrets.token_bytes(16)
        request.auth.signature = b""
        request.auth.signature = self._token._mac(b"dht-request", request.SerializeToString())

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        if not hmac.compare_digest(signature, self._token._mac(b"dht-request", request.SerializeToString())):
            return False
        now = get_dht_time()
        with self._recent_nonces.freeze():
            if abs(auth.time - now) > _CLOCK_SKEW or auth.nonce in self._recent_nonces:
                return False
        self._recent_nonces.store(auth.nonce, None, now + 3 * _CLOCK_SKEW)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        response.auth.nonce = request.auth.nonce
        response.auth.signature = b""
        response.auth.signature = self._token._mac(b"dht-response", response.SerializeToString())

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        auth = response.auth
        signature, auth.signature = auth.signature, b""
        return hmac.compare_digest(signature, self._token._mac(b"dht-response", response.SerializeToString())) \
            and auth.nonce == request.auth.nonce
