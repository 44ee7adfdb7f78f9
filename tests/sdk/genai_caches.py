"""Cached contents through gemgate with Google's official `google-genai` SDK.

Run by tests/gateway/sdk.rs against gemgate and the fake Gemini upstream, whose keys belong to
different projects (a cache exists only for the project of the key that made it):
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... GEMGATE_OTHER_TOKEN=... python genai_caches.py
Exits non-zero when an answer is not what the SDK should get.
"""
import os
from report import check, finish

from google import genai
from google.genai import errors, types

url = os.environ["GEMGATE_URL"]
client = genai.Client(api_key=os.environ["GEMGATE_TOKEN"], http_options=types.HttpOptions(base_url=url))
other = genai.Client(api_key=os.environ["GEMGATE_OTHER_TOKEN"], http_options=types.HttpOptions(base_url=url))

cache = client.caches.create(
    model="gemini-2.5-flash",
    config=types.CreateCachedContentConfig(
        contents=[types.Content(role="user", parts=[types.Part(text="a long shared prompt " * 20)])],
        display_name="shared", ttl="300s"))
check("cache create", cache.name.startswith("cachedContents/"), cache)
for i in range(12):
    r = client.models.generate_content(
        model="gemini-2.5-flash", contents=f"question {i}",
        config=types.GenerateContentConfig(cached_content=cache.name))
    check(f"generate with the cache {i}", r.text == f"echo: question {i}", r)
    check(f"cached tokens {i}", (r.usage_metadata.cached_content_token_count or 0) > 0, r.usage_metadata)
for i in range(4):
    check(f"cache get {i}", client.caches.get(name=cache.name).name == cache.name)
updated = client.caches.update(name=cache.name, config=types.UpdateCachedContentConfig(ttl="900s"))
check("cache update", updated.expire_time > cache.expire_time, (cache.expire_time, updated.expire_time))
check("cache list", [c.name for c in client.caches.list()] == [cache.name])
check("another client's list", list(other.caches.list()) == [])
try:
    other.caches.get(name=cache.name)
    check("another client's get", False, "no error")
except errors.ClientError as err:
    check("another client's get", err.code == 404, err)
try:
    other.models.generate_content(model="gemini-2.5-flash", contents="x",
                                  config=types.GenerateContentConfig(cached_content=cache.name))
    check("another client's generate", False, "no error")
except errors.ClientError as err:
    check("another client's generate", err.code == 404, err)
client.caches.delete(name=cache.name)
try:
    client.caches.get(name=cache.name)
    check("deleted", False, "no error")
except errors.ClientError as err:
    check("deleted", err.code == 404, err)
finish()
