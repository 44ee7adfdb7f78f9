"""The Live API through gemgate with Google's official `google-genai` SDK: sessions opened with
gemgate's client token, and with an ephemeral token minted through gemgate.

The SDK reaches the Live API only over TLS: gemgate listens with HTTPS, and SSL_CERT_FILE names
its test certificate. Run by tests/gateway/surfaces.rs against gemgate and the fake upstream:
    GEMGATE_URL=https://127.0.0.1:PORT GEMGATE_TOKEN=... SSL_CERT_FILE=cert.pem python genai_live.py
Exits non-zero when an answer is not what the SDK should get.
"""
import asyncio
import datetime
import os
from report import check, finish

from google import genai
from google.genai import types

url = os.environ["GEMGATE_URL"]
SESSIONS = int(os.environ.get("GEMGATE_LIVE_SESSIONS", "6"))
MODEL = "gemini-live-2.5-flash-preview"


async def session(client, label, turns):
    async with client.aio.live.connect(model=MODEL, config={"response_modalities": ["TEXT"]}) as s:
        check(f"{label} setup", s.setup_complete is not None, s.setup_complete)
        for n in range(turns):
            await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text=f"{label} turn {n}")]))
            text = ""
            async for message in s.receive():
                text += message.text or ""
            check(f"{label} echo {n}", text == f"echo: {label} turn {n}", text)


async def main():
    client = genai.Client(api_key=os.environ["GEMGATE_TOKEN"], http_options={"base_url": url})
    await asyncio.gather(*(session(client, f"s{n}", 3) for n in range(SESSIONS)))

    minter = genai.Client(api_key=os.environ["GEMGATE_TOKEN"],
                          http_options={"base_url": url, "api_version": "v1alpha"})
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    token = minter.auth_tokens.create(config={
        "uses": 1,
        "expire_time": now + datetime.timedelta(minutes=30),
        "new_session_expire_time": now + datetime.timedelta(minutes=1),
    })
    check("token minted", token.name.startswith("auth_tokens/"), token)
    print("token", token.name)
    browser = genai.Client(api_key=token.name, http_options={"base_url": url, "api_version": "v1alpha"})
    await session(browser, "ephemeral", 2)

    forged = genai.Client(api_key="auth_tokens/not-one-of-ours", http_options={"base_url": url, "api_version": "v1alpha"})
    try:
        await session(forged, "forged", 1)
        check("forged token refused", False, "connected")
    except Exception as err:
        check("forged token refused", True, err)


asyncio.run(main())
finish()
