"""JWT verification against a local JWKS server (aiohttp on a free port) with keys generated
here: RS256/ES256, key rotation, rate-limited refetch, an unreachable provider, and every
token the issue says must be refused."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from citadeld.security.config import JWTConfig
from citadeld.security.jwt_auth import JWTVerifier, TokenRejected

ISS = "https://idp.test"
AUD = "citadel"


class IdP:
    """A JWKS endpoint whose key set the test changes; counts fetches, can fail or stall."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key
        self.published: list[str] = []
        self.fetches = 0
        self.fail = False
        self.delay = 0.0
        self.body: bytes | None = None  # serve this instead of the key set
        self.server: TestServer | None = None

    def add(self, kid: str, kind: str = "rsa", publish: bool = True) -> Any:
        key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
               else ec.generate_private_key(ec.SECP256R1()))
        self.keys[kid] = key
        if publish:
            self.published.append(kid)
        return key

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in self.published:
            pub = self.keys[kid].public_key()
            algo = RSAAlgorithm if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm
            jwk = algo.to_jwk(pub, as_dict=True)
            jwk.update(kid=kid, use="sig")
            out.append(jwk)
        return {"keys": out}

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            return web.Response(status=503)
        if self.body is not None:
            return web.Response(body=self.body, content_type="application/json")
        return web.json_response(self.jwks())

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/.well-known/jwks.json"))

    def token(self, kid: str, alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": "user_1", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 120,
                "role": "user", **claims}
        return jwt.encode({k: v for k, v in body.items() if v is not None}, self.keys[kid],
                          algorithm=alg, headers={"kid": kid})


@pytest.fixture
async def idp() -> AsyncIterator[IdP]:
    p = IdP()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", p.handle)
    p.server = TestServer(app)
    await p.server.start_server()
    yield p
    await p.server.close()


def verifier(idp: IdP, **kw: Any) -> JWTVerifier:
    cfg = {"jwks_url": idp.url, "issuer": ISS, "audience": [AUD], "jwks_min_refresh_s": 0.2,
           "leeway_s": 30, **kw}
    return JWTVerifier(JWTConfig.model_validate(cfg))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any], alg: str = "none") -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "k1"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


async def rejected(v: JWTVerifier, token: str, reason: str) -> None:
    with pytest.raises(TokenRejected) as info:
        await v.verify(token)
    assert reason in str(info.value), str(info.value)


async def test_rs256_and_es256_from_the_jwks(idp: IdP) -> None:
    idp.add("k1")
    idp.add("e1", "ec")
    v = verifier(idp)
    p = await v.verify(idp.token("k1", role="developer"))
    assert (p.name, p.role, p.kind, p.authenticated) == ("user_1", "developer", "jwt", True)
    assert (await v.verify(idp.token("e1", "ES256", role="admin"))).role == "admin"
    assert idp.fetches == 1  # one fetch served both kids
    await v.close()


async def test_refused_tokens(idp: IdP) -> None:
    k1 = idp.add("k1")
    idp.add("e1", "ec")
    v = verifier(idp)
    now = int(time.time())
    good = {"sub": "u", "iss": ISS, "aud": AUD, "exp": now + 60, "role": "user"}
    await rejected(v, unsigned(good), "alg none")
    await rejected(v, unsigned(good, "None"), "alg none")
    # algorithm confusion: HS256 signed with the provider's public key
    pem = k1.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    await rejected(v, _hs256_with(pem, good), "HS256 tokens are not accepted")
    # an RS256 header pointing at an EC key
    await rejected(v, _forged_alg(idp.token("e1", "ES256"), "RS256"), "RS256 token for a EC key")
    await rejected(v, idp.token("k1", exp=now - 120), "expired")
    await rejected(v, idp.token("k1", nbf=now + 120), "not yet valid")
    await rejected(v, idp.token("k1", iss="https://evil.test"), "wrong issuer")
    await rejected(v, idp.token("k1", aud="other"), "wrong audience")
    await rejected(v, idp.token("k1", aud=None), "missing claim aud")
    await rejected(v, idp.token("k1", exp=None), "missing claim exp")
    await rejected(v, idp.token("k1", sub=None), "missing claim sub")
    await rejected(v, idp.token("k1", alg="RS512"), "not allowed")
    tampered = idp.token("k1")
    head, _body, sig = tampered.split(".")
    forged_body = _b64(json.dumps({**good, "role": "admin"}).encode())
    await rejected(v, f"{head}.{forged_body}.{sig}", "bad signature")
    for garbage in ("a.b.c", "..", "eyJhbGciOiJSUzI1NiJ9.e30", "x" * 20000,
                    f"{_b64(b'[1,2]')}.e30.sig", f"{_b64(b'not json')}.e30.sig"):
        with pytest.raises(TokenRejected):
            await v.verify(garbage)
    # within the leeway: accepted; the leeway is bounded by the config
    assert (await v.verify(idp.token("k1", exp=now - 10))).role == "user"
    with pytest.raises(ValueError):
        JWTConfig(leeway_s=3600)
    await v.close()


def _hs256_with(secret: bytes, claims: dict[str, Any]) -> str:
    """HS256 by hand (PyJWT refuses PEM-looking HMAC keys, which is the point)."""
    import hashlib
    import hmac
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _forged_alg(token: str, alg: str) -> str:
    head, body, sig = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    header["alg"] = alg
    return f"{_b64(json.dumps(header).encode())}.{body}.{sig}"


async def test_confusion_also_refused_when_hs256_is_configured(idp: IdP) -> None:
    k1 = idp.add("k1")
    v = verifier(idp, hs256_secret="s" * 40)
    pem = k1.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    claims = {"sub": "u", "iss": ISS, "aud": AUD, "exp": now + 60, "role": "admin"}
    await rejected(v, _hs256_with(pem, claims), "bad signature")
    ok = jwt.encode(claims, "s" * 40, algorithm="HS256")
    assert (await v.verify(ok)).role == "admin"
    await v.close()


async def test_kid_rotation_and_rate_limited_refetch(idp: IdP) -> None:
    idp.add("k1")
    v = verifier(idp, jwks_min_refresh_s=0.5)
    await v.verify(idp.token("k1"))
    assert idp.fetches == 1
    idp.add("k2", publish=False)
    # an unknown kid refetches once; a second try inside the interval does not refetch
    await asyncio.sleep(0.6)
    await rejected(v, idp.token("k2"), "unknown kid")
    await rejected(v, idp.token("k2"), "unknown kid")
    assert idp.fetches == 2
    # the provider rotates: k2 published, k1 retired
    idp.published = ["k2"]
    await asyncio.sleep(0.6)
    many = await asyncio.gather(*(v.verify(idp.token("k2", sub=f"u{i}")) for i in range(20)))
    assert {p.name for p in many} == {f"u{i}" for i in range(20)}
    assert idp.fetches == 3  # twenty callers, one fetch
    await v.close()


async def test_provider_outage_keeps_known_keys_and_never_blocks_the_loop(idp: IdP) -> None:
    idp.add("k1")
    idp.add("k2", publish=False)
    v = verifier(idp, jwks_min_refresh_s=0.1, jwks_timeout_s=1.0)
    await v.verify(idp.token("k1"))
    idp.fail = True
    await asyncio.sleep(0.15)
    assert (await v.verify(idp.token("k1", sub="again"))).name == "again"  # cached key
    await rejected(v, idp.token("k2"), "unknown kid")
    assert v.jwks is not None and "HTTP 503" in (v.jwks.last_error or "")
    # a stalled provider: other work on the loop keeps running while a fetch waits
    idp.fail, idp.delay = False, 0.5
    idp.published.append("k2")
    await asyncio.sleep(0.15)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.get_running_loop().create_task(ticker())
    assert (await v.verify(idp.token("k2"))).role == "user"
    t.cancel()
    assert ticks >= 20  # ~50 expected in 0.5 s; a blocking fetch would give ~0
    await v.close()


async def test_role_claims(idp: IdP) -> None:
    idp.add("k1")
    v = verifier(idp, role_claim="public_metadata.role", role_values={"org:admin": "admin"})
    tok = idp.token("k1", role=None, public_metadata={"role": "org:admin"})
    assert (await v.verify(tok)).role == "admin"
    tok = idp.token("k1", role=None, public_metadata={"role": ["user", "developer"]})
    assert (await v.verify(tok)).role == "developer"
    tok = idp.token("k1", role="admin")  # the top-level claim is not the configured one
    assert (await v.verify(tok)).role == "none"
    v2 = verifier(idp, default_role="user")
    assert (await v2.verify(idp.token("k1", role="superuser"))).role == "user"
    await v.close()
    await v2.close()


async def test_bad_jwks_documents_keep_the_known_keys(idp: IdP) -> None:
    from citadeld.security.jwt_auth import parse_jwks
    k1 = idp.add("k1")
    v = verifier(idp, jwks_min_refresh_s=0.05, jwks_cache_s=10)
    await v.verify(idp.token("k1"))
    bodies: list[bytes] = [b"not json", b"[]", b'{"keys": "x"}', b"{" + b" " * (2 << 20) + b"}"]
    for body in bodies:
        idp.body = body
        await asyncio.sleep(0.06)
        assert v.jwks is not None
        await rejected(v, _with_kid(idp, "zz"), "unknown kid")
        assert v.jwks.last_error is not None
        assert (await v.verify(idp.token("k1", sub="still"))).name == "still"
    # what a key set may not contain: private keys, encryption keys, other key types
    pub = RSAAlgorithm.to_jwk(k1.public_key(), as_dict=True)
    private = RSAAlgorithm.to_jwk(k1, as_dict=True)
    doc = {"keys": [{**private, "kid": "priv"}, {**pub, "kid": "enc", "use": "enc"},
                    {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                    {**pub, "kid": "wrong-alg", "alg": "HS256"}, {"kid": "broken"},
                    {**pub, "kid": "ok"}]}
    assert list(parse_jwks(doc, ("RS256", "ES256"))) == ["ok"]
    await v.close()


def _with_kid(idp: IdP, kid: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "u", "iss": ISS, "aud": AUD, "exp": now + 60}, idp.keys["k1"],
                      algorithm="RS256", headers={"kid": kid})


async def test_jwks_tokens_through_the_app(idp: IdP, tmp_path: Any) -> None:
    """The config wiring: jwks_url, issuer, audience, role claim; the key set is fetched at
    start-up (warm), rotation works through the middleware, the session closes with the app."""
    from tests.support.auth import auth_client, config, role_keys

    idp.add("k1")
    _, entries = role_keys()
    cfg = config(tmp_path, entries, auth={"jwt": {
        "jwks_url": idp.url, "issuer": ISS, "audience": [AUD], "jwks_min_refresh_s": 0.1,
        "role_claim": "org.role", "role_values": {"org:admin": "admin"}}})
    async with auth_client(cfg) as c:
        for _ in range(50):
            if idp.fetches:
                break
            await asyncio.sleep(0.02)
        assert idp.fetches == 1  # fetched at start-up, before any token
        tok = idp.token("k1", role=None, org={"role": "org:admin"})
        r = await c.get("/health/detailed", headers={"Authorization": f"Bearer {tok}"})
        assert r.status == 200
        idp.add("k2")
        await asyncio.sleep(0.15)
        tok = idp.token("k2", role=None, org={"role": "user"})
        assert (await c.get("/api/tags", headers={"Authorization": f"Bearer {tok}"})).status \
            == 200
        r = await c.get("/health/detailed", headers={"Authorization": f"Bearer {tok}"})
        assert r.status == 403
        assert idp.fetches == 2
