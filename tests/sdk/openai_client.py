"""Drives gemgate's OpenAI-compatible API with the official `openai` SDK.

Run by tests/gateway/sdk.rs against gemgate and the fake Gemini upstream:
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... python openai_client.py
Exits non-zero, saying what differed, when an answer is not what the SDK should get.
"""
import json
import os
from report import check, finish

import openai

url = os.environ["GEMGATE_URL"]
token = os.environ["GEMGATE_TOKEN"]


for prefix in ("/v1", "/hf/v1"):
    client = openai.OpenAI(base_url=url + prefix, api_key=token, max_retries=0)

    r = client.chat.completions.create(
        model="gemini-2.5-flash",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello sdk"}],
        temperature=0.3,
    )
    check(f"{prefix} chat", r.choices[0].message.content == "echo: hello sdk", r)
    check(f"{prefix} chat usage", r.usage is not None and r.usage.total_tokens > 0, r.usage)

    stream = client.chat.completions.create(
        model="gemini-2.5-flash",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(f"{prefix} stream text", text == "echo: one two three", text)
    check(f"{prefix} stream one id", len({c.id for c in chunks}) == 1)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(f"{prefix} stream finish", finishes == ["stop"], finishes)
    check(f"{prefix} stream usage", chunks[-1].usage is not None and not chunks[-1].choices, chunks[-1])

tools = [{
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "look something up",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"], "additionalProperties": False},
    },
}]
client = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
messages = [{"role": "user", "content": "weather in Paris"}]
r = client.chat.completions.create(model="gemini-2.5-flash", messages=messages, tools=tools)
calls = r.choices[0].message.tool_calls or []
check("tool call", r.choices[0].finish_reason == "tool_calls" and len(calls) == 1, r)
if calls:
    call = calls[0]
    check("tool call arguments", json.loads(call.function.arguments) == {"query": "weather in Paris"},
          call.function.arguments)
    messages.append(r.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear"})})
    r = client.chat.completions.create(model="gemini-2.5-flash", messages=messages, tools=tools)
    check("tool result", r.choices[0].message.content == 'echo: lookup returned {"sky":"clear"}',
          r.choices[0].message.content)

stream = client.chat.completions.create(model="gemini-2.5-flash", stream=True, tools=tools,
                                        messages=[{"role": "user", "content": "x"}])
deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
check("streamed tool call", len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "lookup",
      deltas)

r = client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": [
    {"type": "text", "text": "what is this"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
]}])
check("vision", r.choices[0].message.content == "echo: what is this", r)

e = client.embeddings.create(model="text-embedding-004", input=["a", "b"], dimensions=8)
check("embeddings", len(e.data) == 2 and len(e.data[0].embedding) == 8, e)
e = client.embeddings.create(model="text-embedding-004", input="a", encoding_format="base64")
check("embeddings base64", len(e.data) == 1, e)

img = client.images.generate(model="imagen-3.0-generate-002", prompt="a red square", n=2,
                             size="1024x1024", response_format="b64_json")
check("images", len(img.data) == 2 and img.data[0].b64_json.startswith("iVBOR"), img)

speech = client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
check("speech", speech.content[:4] == b"RIFF", speech.content[:16])

ids = [m.id for m in client.models.list()]
check("models", "gemini-2.5-flash" in ids and "gemini-2.5-flash-search" in ids, ids)

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check("unknown model", False, "no error")
except openai.NotFoundError as err:
    check("unknown model", "no-such-model" in str(err), err)

try:
    client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "robot", "content": "x"}])
    check("bad request", False, "no error")
except openai.BadRequestError as err:
    check("bad request", err.body.get("param") == "messages[0].role", err.body)

bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
try:
    bad.models.list()
    check("wrong token", False, "no error")
except openai.AuthenticationError:
    check("wrong token", True)

google = openai.OpenAI(base_url=url + "/openai/v1", api_key=token, max_retries=0)
r = google.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}])
check("google's openai api", r.choices[0].message.content == "echo: hi", r)

finish()
