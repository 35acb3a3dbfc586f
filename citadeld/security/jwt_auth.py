"""JSON Web Tokens: RS256/ES256 against an identity provider's JWKS, HS256 with a local secret.

What is refused: ``alg: none`` and any algorithm outside the allow-list; algorithm confusion
(an HS256 token is only ever checked against ``hs256_secret``, never against a public key, and
a JWKS key is used only for an algorithm of its own key type); expired and not-yet-valid tokens
(with a bounded leeway); a wrong issuer or audience; missing required claims; malformed tokens.

The JWKS is fetched with aiohttp on the daemon's loop (an async client: the loop never blocks),
cached for ``jwks_cache_s``, refetched when a token names an unknown ``kid`` (key rotation) - at
most once per ``jwks_min_refresh_s``, and concurrent requests share one fetch. Verified tokens
are remembered until they expire (at most a minute), so a client reusing its token pays the
signature check once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import jwt
import orjson
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from citadeld.security.config import JWTConfig
from citadeld.security.principal import Principal
from citadeld.security.roles import RANK

log = logging.getLogger("citadeld.security")

_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_CACHE_MAX = 4096
_CACHE_TTL_S = 60.0
_MAX_TOKEN = 16384
_MAX_JWKS = 1 << 20  # a key set is a few KB; refuse to buffer an endless answer


class TokenRejected(Exception):
    """Why a token is not accepted (for the security log; the client gets a generic 401)."""


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


class JWKS:
    """The provider's signing keys by kid, fetched and refreshed asynchronously."""

    def __init__(self, cfg: JWTConfig) -> None:
        assert cfg.jwks_url is not None
        self.cfg = cfg
        self.url = cfg.jwks_url
        self.keys: dict[str, tuple[str, Any]] = {}  # kid -> (kty, key object)
        self.fetched_at = 0.0  # monotonic; 0: never
        self.attempted_at = -1e9
        self.last_error: str | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(BaseException):
                await self._inflight
        if self._session is not None:
            await self._session.close()

    def _known(self, kid: str | None) -> tuple[str, Any] | None:
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    async def key(self, kid: str | None) -> tuple[str, Any]:
        found = self._known(kid)
        now = time.monotonic()
        may_fetch = now - self.attempted_at >= self.cfg.jwks_min_refresh_s
        if found is not None:
            if now - self.fetched_at > self.cfg.jwks_cache_s and may_fetch:
                self.start_fetch()  # stale: refresh behind this request, use what we have
            return found
        fetching = self._inflight is not None and not self._inflight.done()
        if may_fetch or fetching:  # an unknown kid: the provider may have rotated
            await self.refresh()  # joins a fetch already in flight
            found = self._known(kid)
        if found is None:
            raise TokenRejected("token names no kid and the JWKS has several keys"
                                if kid is None else f"unknown kid {kid[:64]!r}")
        return found

    def start_fetch(self) -> asyncio.Task[None]:
        if self._inflight is None or self._inflight.done():
            self.attempted_at = time.monotonic()
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
            self._inflight.add_done_callback(_retrieve)
        return self._inflight

    async def refresh(self) -> None:
        """One fetch at a time; callers arriving meanwhile wait for the same one."""
        with contextlib.suppress(Exception):
            await asyncio.shield(self.start_fetch())

    async def _fetch(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.jwks_timeout_s))
        try:
            async with self._session.get(self.url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                raw = await resp.content.read(_MAX_JWKS + 1)
            if len(raw) > _MAX_JWKS:
                raise ValueError(f"JWKS larger than {_MAX_JWKS} bytes")
            data = orjson.loads(raw)
            keys = parse_jwks(data, self.cfg.algorithms)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot fetch the JWKS; keeping the keys we have", extra={
                "event": "jwks_error", "url": self.url, "error": self.last_error})
            raise
        if keys.keys() != self.keys.keys():
            log.info("JWKS loaded", extra={"event": "jwks_loaded", "kids": sorted(keys)})
        self.keys, self.fetched_at, self.last_error = keys, time.monotonic(), None


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # logged in _fetch; keeps asyncio from reporting it again


def parse_jwks(data: Any, algorithms: tuple[str, ...]) -> dict[str, tuple[str, Any]]:
    """kid -> (kty, public key) for the keys usable with the allowed algorithms."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS document (no keys list)")
    families = {_FAMILY[a[:2]] for a in algorithms}
    out: dict[str, tuple[str, Any]] = {}
    for i, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kty = jwk.get("kty")
        if kty not in families:
            continue
        alg = jwk.get("alg")
        if alg is not None and alg not in algorithms:
            continue
        try:
            key = (RSAAlgorithm if kty == "RSA" else ECAlgorithm).from_jwk(jwk)
        except Exception:
            log.warning("skipping an unusable JWKS key", extra={"kid": jwk.get("kid"),
                                                                "index": i})
            continue
        if hasattr(key, "private_numbers"):  # a provider must never publish a private key
            continue
        out[str(jwk.get("kid", f"#{i}"))] = (str(kty), key)
    return out


class JWTVerifier:
    def __init__(self, cfg: JWTConfig) -> None:
        self.cfg = cfg
        self.jwks = JWKS(cfg) if cfg.jwks_url else None
        self._path = cfg.role_claim.split(".")
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._options: Any = {"require": list(cfg.require), "verify_aud": bool(cfg.audience)}

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    async def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        if hit is not None:
            if hit[0] > time.time():
                return hit[1]
            self._cache.pop(token, None)
        if len(token) > _MAX_TOKEN:
            raise TokenRejected("token too long")
        if not token.isascii():  # header bytes that are not UTF-8 arrive as surrogates
            raise TokenRejected("malformed token: not ASCII")
        try:
            header = jwt.get_unverified_header(token)
        except Exception as exc:  # PyJWTError, and whatever odd input makes the decoder raise
            raise TokenRejected(f"malformed token: {type(exc).__name__}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise TokenRejected("unsigned token (alg none)")
        if alg == "HS256":
            if not self.cfg.hs256_secret:
                raise TokenRejected("HS256 tokens are not accepted (no hs256_secret)")
            key: Any = self.cfg.hs256_secret
        elif alg in self.cfg.algorithms and self.jwks is not None:
            kid = header.get("kid")
            kty, key = await self.jwks.key(kid if isinstance(kid, str) else None)
            if _FAMILY.get(alg[:2]) != kty:
                raise TokenRejected(f"{alg} token for a {kty} key")
        else:
            raise TokenRejected(f"algorithm {alg[:16]!r} is not allowed")
        claims = self._decode(token, key, alg)
        principal = self._principal(claims)
        exp = claims.get("exp")
        until = min(float(exp) if isinstance(exp, (int, float)) else 0.0,
                    time.time() + _CACHE_TTL_S)
        if until > time.time():
            self._cache[token] = (until, principal)
            if len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        return principal

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg],
                audience=list(self.cfg.audience) or None,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_s, options=self._options)
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired token") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(f"missing claim {exc.claim}") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad signature") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"invalid token: {type(exc).__name__}") from None
        except Exception as exc:  # a key/token pair the crypto layer refuses
            raise TokenRejected(f"invalid token: {type(exc).__name__}") from None
        if not isinstance(claims, dict):
            raise TokenRejected("claims are not an object")
        return claims

    def role_of(self, claims: dict[str, Any]) -> str | None:
        node: Any = claims
        for part in self._path:
            node = node.get(part) if isinstance(node, dict) else None
        values = node if isinstance(node, list) else [node]
        best: str | None = None
        for v in values:
            if not isinstance(v, str):
                continue
            role = self.cfg.role_values.get(v, v)
            if role in RANK and (best is None or RANK[role] > RANK[best]):
                best = role
        return best or self.cfg.default_role

    def _principal(self, claims: dict[str, Any]) -> Principal:
        sub = claims.get("sub")
        name = str(sub)[:256] if sub is not None else "jwt"
        return Principal(name=name, role=self.role_of(claims) or "none", kind="jwt")
