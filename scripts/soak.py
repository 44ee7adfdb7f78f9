#!/usr/bin/env python3
"""The load generator of scripts/soak.sh: a bounded, mixed, loopback-only load on gemgate.

Standard library only. Each kind of traffic has its own threads, and each thread keeps one
keep-alive connection (reopened only after gemgate or the network closes it), so the number of
client connections stays constant and gemgate's descriptor count measures gemgate, not us.

Every loop is bounded twice: by the deadline (--seconds) and by a request count derived from
its pace (a loop cannot exceed seconds / pause requests), so a fast gemgate cannot turn the
soak into a flood on a 2-core machine.

Every second the counters go to --stats as one line that soak.sh reads each minute:
    requests errors expected cut_streams reloads admin_edits reconnects
and at the end a summary (per kind of traffic, and the first distinct errors) is printed.

"Expected" answers are 429 and 503: gemgate passes them on when every attempt hit a cooling
(minute-…) or overloaded (flaky-…) key. A stream that ends with an error event is a "cut"
stream: the cut-… keys break streams half-way, and gemgate must then end the stream with an
error event rather than retry it. Everything else that is not a good 2xx answer is an error.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import string
import sys
import threading
import time
import urllib.parse

MODEL = "gemini-2.5-flash"
# At least 20 characters, so that the fake's answer ("echo: " + prompt) splits into the 20
# chunks x-fake-chunks asks for.
PROMPT = "soak test: stream this sentence back to me in twenty small pieces, please"
# Streams stay open a while (20 chunks, 50 ms apart: about a second each), so that reloads and
# admin edits happen while streams are in flight.
STREAM_HEADERS = {"x-fake-chunks": "20", "x-fake-delay-ms": "50"}


class Stats:
    """Counters shared by every thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_kind = {}  # kind -> {outcome: count}
        self.samples = {}  # a few distinct error descriptions -> count
        self.reloads = 0
        self.plugin_reloads = 0
        self.admin_edits = 0
        self.resets = 0
        self.resets_skipped = 0
        self.reconnects = 0

    def add(self, kind, outcome, detail=None):
        with self.lock:
            k = self.by_kind.setdefault(kind, {})
            k[outcome] = k.get(outcome, 0) + 1
            if outcome == "error" and detail is not None:
                key = f"{kind}: {detail}"[:300]
                if key in self.samples or len(self.samples) < 20:
                    self.samples[key] = self.samples.get(key, 0) + 1

    def bump(self, name, n=1):
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def totals(self):
        with self.lock:
            requests = sum(sum(k.values()) for k in self.by_kind.values())
            errors = sum(k.get("error", 0) for k in self.by_kind.values())
            expected = sum(k.get("expected", 0) for k in self.by_kind.values())
            cut = sum(k.get("cut", 0) for k in self.by_kind.values())
            return requests, errors, expected, cut, self.reloads, self.admin_edits, self.reconnects

    def write(self, path):
        """One line, replaced atomically so that soak.sh never reads half of it."""
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(" ".join(str(v) for v in self.totals()) + "\n")
        os.replace(tmp, path)


class Client:
    """One keep-alive connection to gemgate."""

    def __init__(self, port, stats):
        self.port = port
        self.stats = stats
        self.conn = None
        self.used = False  # whether self.conn has carried an answer already

    def call(self, method, path, body=None, headers=None):
        """(status, body bytes, exception): status is None when the exchange failed."""
        data = None if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.used = False
            try:
                self.conn.request(method, path, data, hdrs)
                resp = self.conn.getresponse()
                payload = resp.read()
                self.used = True
                if resp.will_close:
                    self.close()
                return resp.status, payload, None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                # A server may close a keep-alive connection that sat idle (the admin client's
                # does, between rounds) just as a request is sent on it: nothing was answered,
                # so send it again once on a new connection, as HTTP clients do.
                stale = self.used
                self.close()
                if not (stale and attempt == 1):
                    return None, b"", e
            except (http.client.HTTPException, OSError) as e:
                self.close()
                return None, b"", e
        return None, b"", None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self.stats.bump("reconnects")


def classify(kind, status, body, exc, stream):
    """(outcome, detail) for one proxied call."""
    if status is None:
        return "error", f"{type(exc).__name__}: {exc}"
    if status in (429, 503):
        return "expected", None
    if not 200 <= status < 300:
        return "error", f"HTTP {status}: {body[:160]!r}"
    if stream:
        events = [l[6:] for l in body.split(b"\n") if l.startswith(b"data: ")]
        if not events:
            return "error", f"stream without events: {body[:160]!r}"
        # The prompt never says "error": an error event is how gemgate ends a broken stream.
        if any(b'"error"' in e for e in events):
            return "cut", None
        last = events[-1].strip()
        if kind == "sse" and b'"finishReason"' in last:
            return "ok", None
        if kind == "openai-stream" and last == b"[DONE]":
            return "ok", None
        return "error", f"stream did not finish: {last[:160]!r}"
    want = b'"candidates"' if kind == "generate" else b'"choices"'
    if want not in body:
        return "error", f"2xx without {want.decode()}: {body[:160]!r}"
    return "ok", None


def load_loop(kind, port, token, deadline, pause, stats):
    """One connection's worth of one kind of traffic, until the deadline or the count bound."""
    client = Client(port, stats)
    stream = kind in ("sse", "openai-stream")
    if kind in ("generate", "sse"):
        action = "streamGenerateContent?alt=sse" if stream else "generateContent"
        path = f"/v1beta/models/{MODEL}:{action}"
        headers = {"x-goog-api-key": token}
        body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    else:
        path = "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {token}"}
        body = {"model": MODEL, "stream": stream,
                "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        headers.update(STREAM_HEADERS)
    # The count bound: even with instant answers a loop makes at most one call per pause.
    budget = int((deadline - time.monotonic()) / pause) + 1
    # Threads start spread over one pause, so that they do not march in step.
    time.sleep(random.uniform(0, pause))
    for _ in range(budget):
        if time.monotonic() >= deadline:
            break
        status, payload, exc = client.call("POST", path, body, headers)
        outcome, detail = classify(kind, status, payload, exc, stream)
        stats.add(kind, outcome, detail)
        if status is None:
            time.sleep(0.5)  # do not spin on a refused connection
        time.sleep(pause)
    client.close()
    stats.bump("reconnects", -1)  # our own close at the end is not a reconnect


class Control:
    """Reloads and admin edits, one after another in one thread: both write the config file
    (the admin API writes it too when it adds or deletes a key), so doing them in turn means
    neither ever overwrites the other's change."""

    def __init__(self, args, stats):
        self.args = args
        self.stats = stats
        self.client = Client(args.port, stats)
        self.auth = {"Authorization": f"Bearer {args.admin_token}"}
        self.max_retries = 3

    def admin(self, what, method, path, body=None):
        status, payload, exc = self.client.call(method, path, body, self.auth)
        ok = status is not None and 200 <= status < 300
        self.stats.add("admin", "ok" if ok else "error",
                       None if ok else f"{what} -> {status or exc}: {payload[:200]!r}")
        if not ok:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return {}

    @staticmethod
    def replace_file(path, text):
        """Save the way editors do: write a temporary file beside it, then rename it over."""
        tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".soak-tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def reload(self):
        """Toggles [upstream] max_retries between 3 and 4 (harmless: the pool has 9 keys) in
        the config file. The file is read and edited, not regenerated, so keys the admin API
        wrote stay."""
        path = self.args.config
        with open(path) as f:
            text = f.read()
        self.max_retries = 4 if self.max_retries == 3 else 3
        text, n = re.subn(r"(?m)^max_retries = \d+", f"max_retries = {self.max_retries}", text)
        if n != 1:
            self.stats.add("reload", "error", "max_retries not found in the config file")
            return
        self.replace_file(path, text)
        self.stats.bump("reloads")

    def plugin_reload(self):
        """Adds or removes a comment at the end of a plugin, saved the same way: a reload of
        the plugins folder (every plugin compiled again, every init run again)."""
        with open(self.args.plugin) as f:
            lua = f.read()
        marker = "\n-- soak: touched to make gemgate reload its plugins\n"
        lua = lua.replace(marker, "") if marker in lua else lua + marker
        self.replace_file(self.args.plugin, lua)
        self.stats.bump("plugin_reloads")
        self.stats.bump("reloads")

    def edit_keys(self):
        """Adds a fresh key through the admin API, finds it, deletes it again; resets a
        cooling key; reads the request log."""
        alphabet = string.ascii_letters + string.digits
        secret = "AIzaSy" + "".join(random.choice(alphabet) for _ in range(33))
        added = self.admin("add key", "POST", "/admin/api/keys", {"text": f"soak key {secret}"})
        if added is not None:
            if len(added.get("added", [])) != 1:
                self.stats.add("admin", "error", f"add key: nothing added: {added}")
            # gemgate names a key "k" + the first 12 hex digits of its SHA-256; look it up
            # by that id, and, should the naming ever change, by its masked form instead.
            kid = "k" + hashlib.sha256(secret.encode()).hexdigest()[:12]
            found = self.admin("find key", "GET", f"/admin/api/keys?q={kid}")
            ids = [k["id"] for k in (found or {}).get("keys", []) if k.get("id") == kid]
            if not ids:
                every = self.admin("list keys", "GET", "/admin/api/keys?per_page=1000") or {}
                ids = [k["id"] for k in every.get("keys", [])
                       if k.get("source") == "file" and str(k.get("key", "")).endswith(secret[-4:])]
            if ids:
                if self.admin("delete key", "DELETE",
                              f"/admin/api/keys/{urllib.parse.quote(ids[0])}") is not None:
                    self.stats.bump("admin_edits")
            else:
                self.stats.add("admin", "error", "the added key is not in the pool")
        cooling = self.admin("cooling keys", "GET", "/admin/api/keys?state=cooling")
        keys = (cooling or {}).get("keys", [])
        if keys:
            kid = random.choice(keys)["id"]
            if self.admin("reset key", "POST",
                          f"/admin/api/keys/{urllib.parse.quote(kid)}/reset") is not None:
                self.stats.bump("resets")
        else:
            self.stats.bump("resets_skipped")
        self.admin("request log", "GET", "/admin/api/logs/requests?limit=50")

    def run(self, deadline):
        start = time.monotonic()
        # Config saves at 5, 15, 25 s…, plugin saves at 10, 40, 70 s…, admin rounds at 8, 23,
        # 38 s…: apart, so that gemgate's watcher (which lets a burst of saves settle into one
        # reload) reloads for each. Bounded: one of each per period until the deadline.
        next_reload, next_plugin, next_admin = start + 5, start + 10, start + 8
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_reload:
                self.reload()
                next_reload += self.args.reload_every
            if now >= next_plugin and self.args.plugin:
                self.plugin_reload()
                next_plugin += self.args.plugin_every
            if now >= next_admin:
                self.edit_keys()
                next_admin += self.args.admin_every
            time.sleep(0.2)
        status = self.admin("reload status", "GET", "/admin/api/reload") or {}
        self.client.close()
        self.stats.bump("reconnects", -1)
        return status


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True, help="a client token (ALLOWED_TOKENS)")
    p.add_argument("--admin-token", required=True, help="AUTH_TOKEN")
    p.add_argument("--config", required=True, help="gemgate's config file, edited to reload")
    p.add_argument("--plugin", help="a plugin file, edited every --plugin-every seconds")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--stats", required=True, help="where the counters go every second")
    p.add_argument("--reload-every", type=float, default=10)
    p.add_argument("--plugin-every", type=float, default=30)
    p.add_argument("--admin-every", type=float, default=15)
    # Threads (one connection each) and the pause after each call, in seconds. The defaults
    # make 23 connections and roughly 200 calls a second, streams included.
    p.add_argument("--generate", type=int, default=6)
    p.add_argument("--sse", type=int, default=8)
    p.add_argument("--openai", type=int, default=4)
    p.add_argument("--openai-stream", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.04)
    p.add_argument("--stream-pause", type=float, default=0.1)
    args = p.parse_args()

    stats = Stats()
    deadline = time.monotonic() + args.seconds
    threads = []
    for kind, n, pause in (("generate", args.generate, args.pause),
                           ("sse", args.sse, args.stream_pause),
                           ("openai", args.openai, args.pause),
                           ("openai-stream", args.openai_stream, args.stream_pause)):
        for _ in range(n):
            t = threading.Thread(target=load_loop, daemon=True,
                                 args=(kind, args.port, args.token, deadline, pause, stats))
            t.start()
            threads.append(t)
    control = Control(args, stats)
    result = {}
    ctl = threading.Thread(target=lambda: result.update(control.run(deadline)), daemon=True)
    ctl.start()
    threads.append(ctl)

    while any(t.is_alive() for t in threads):
        stats.write(args.stats)
        time.sleep(1)
    stats.write(args.stats)

    # The summary soak.sh prints at the end.
    print("load by kind (outcome: count):")
    for kind, outcomes in sorted(stats.by_kind.items()):
        print(f"  {kind:14} " + ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items())))
    print(f"files saved to make gemgate reload: {stats.reloads} ({stats.plugin_reloads} of them plugins); "
          f"keys added and deleted: {stats.admin_edits}; cooling keys reset: {stats.resets} "
          f"(none cooling {stats.resets_skipped} times); client reconnects: {stats.reconnects}")
    reload = result.get("reload") or {}
    print(f"gemgate's generation at the end: {result.get('generation')}; last reload: "
          f"{reload.get('last_result')} {reload.get('last_error') or ''}".rstrip())
    if stats.samples:
        print("errors (first distinct ones):")
        for desc, n in stats.samples.items():
            print(f"  {n:6} x {desc}")


if __name__ == "__main__":
    sys.exit(main())
