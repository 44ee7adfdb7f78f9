#!/usr/bin/env python3
"""Open streams: N SSE streams held open through a proxy, and what they cost it.

The fake upstream holds each answer (`x-fake-hold: NAME`) until `POST /_fake/release/NAME`:
the script opens N streams through the proxy at PORT, waits until every head has arrived,
reads the proxy's resident memory (the sum over PIDS), times 20 new requests made one after
another meanwhile, releases the streams and checks that each one ends whole. Prints one line:
streams, RSS before and held, KiB per stream, the new requests' median and slowest latency,
the streams completed. Loopback only; bounded (every wait has a deadline).

usage: held_streams.py N PORT FAKE_PORT KEY NAME PID...
"""

import asyncio
import sys
import time

DEADLINE = 120  # seconds for every phase together


def rss_kb(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS"):
                    total += int(line.split()[1])
    return total


def request(path, key, extra=b"", body=b'{"contents":[{"parts":[{"text":"hi"}]}]}'):
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nx-goog-api-key: %s\r\n"
        b"content-type: application/json\r\n%scontent-length: %d\r\n\r\n"
        % (path, key, extra, len(body))
    ) + body


async def stream(port, ask, opened):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(ask)
        await writer.drain()
        data = b""
        while b"\r\n\r\n" not in data:
            more = await reader.read(4096)
            if not more:
                return data
            data += more
        opened.append(1)
        while not data.endswith(b"0\r\n\r\n"):
            more = await reader.read(65536)
            if not more:
                break
            data += more
        return data
    finally:
        writer.close()


async def one_request(port, key):
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(b"/v1beta/models/gemini-2.5-flash:generateContent", key))
    await writer.drain()
    head = await reader.read(4096)
    writer.close()
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"a request meanwhile failed: {head[:80]!r}")
    return (time.monotonic() - started) * 1000


async def main():
    n, port, fake_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    key, name = sys.argv[4].encode(), sys.argv[5].encode()
    pids = [int(p) for p in sys.argv[6:]]
    ask = request(
        b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        key,
        b"x-fake-hold: %s\r\nx-fake-chunks: 3\r\n" % name,
    )
    before = rss_kb(pids)
    opened = []
    tasks = [asyncio.create_task(stream(port, ask, opened)) for _ in range(n)]
    deadline = time.monotonic() + DEADLINE
    while len(opened) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(2)
    held = rss_kb(pids)
    latencies = sorted([await one_request(port, key) for _ in range(20)])
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_port)
    writer.write(b"POST /_fake/release/%s HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n" % name)
    await writer.drain()
    await reader.read(1024)
    writer.close()
    left = max(1, deadline - time.monotonic())
    done, pending = await asyncio.wait(tasks, timeout=left)
    for task in pending:
        task.cancel()
    whole = sum(
        1
        for t in done
        if not t.exception() and t.result().count(b"data:") == 3 and t.result().endswith(b"0\r\n\r\n")
    )
    print(
        f"{len(opened)} open, RSS {before / 1024:.0f} -> {held / 1024:.0f} MiB, "
        f"{(held - before) / max(1, len(opened)):.1f} KiB per stream; a new request meanwhile "
        f"{latencies[10]:.2f} ms (median of 20), slowest {latencies[-1]:.2f} ms; "
        f"{whole}/{n} completed whole"
    )
    if whole < n:
        sys.exit(1)


asyncio.run(main())
