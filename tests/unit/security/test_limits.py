"""Connection limits reach aiohttp: oversized headers are refused, a client that never finishes
its request head is disconnected after keepalive_timeout_s, an idle keep-alive one too."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.support.auth import auth_client, config, role_keys


async def _read_all(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    data = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), within)
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk


async def test_header_limits_and_slow_clients(tmp_path: Path) -> None:
    _, entries = role_keys()
    cfg = config(tmp_path, entries, limits={"max_field_size": 2048, "max_headers": 20,
                                            "keepalive_timeout_s": 0.6})
    async with auth_client(cfg) as c:
        host, port = c.server.host, c.server.port
        assert port is not None
        r = await c.get("/health/live", headers={"X-Big": "a" * 3000})
        assert r.status == 400
        r = await c.get("/health/live", headers={f"X-H{i}": "v" for i in range(30)})
        assert r.status == 400
        assert (await c.get("/health/live", headers={"X-Big": "a" * 1500})).status == 200

        # a slow-header client: half a request head, then nothing
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        data, waited = await _read_all(reader, 5)
        assert data == b"" and 0.4 < waited < 3
        writer.close()

        # an idle keep-alive connection after one answer
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        data, waited = await _read_all(reader, 5)
        assert data.startswith(b"HTTP/1.1 200") and waited < 3
        writer.close()
