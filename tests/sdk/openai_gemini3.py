"""Gemini 3 tool calls through gemgate's OpenAI API with the official `openai` SDK: each call's
thought signature reaches the client as `extra_content.google.thought_signature` (whole and
streamed), goes back with the assistant message through several turns, and a client that
drops it still works.

Run by tests/gateway/protocols.rs against gemgate and the fake Gemini upstream (which, like
Google, refuses a Gemini 3 model turn whose function call lost its signature):
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... python openai_gemini3.py
"""
import json
import os
from report import check, finish

import openai

client = openai.OpenAI(base_url=os.environ["GEMGATE_URL"] + "/v1", api_key=os.environ["GEMGATE_TOKEN"],
                       max_retries=0)
MODEL = "gemini-3-pro-preview"
tools = [{
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "look something up",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}]


def signature_of(call):
    extra = (call.model_extra or {}).get("extra_content") or {}
    return extra.get("google", {}).get("thought_signature")


messages = [{"role": "user", "content": "weather in Paris"}]
for turn in range(3):
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, reasoning_effort="low")
    message = r.choices[0].message
    calls = message.tool_calls or []
    check(f"turn {turn} tool call", len(calls) == 1, r)
    check(f"turn {turn} signature", calls and signature_of(calls[0]), calls)
    # The assistant message goes back as the SDK gave it (its extra fields included).
    messages.append(message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps({"n": turn})})
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    check(f"turn {turn} answer", (r.choices[0].message.content or "").startswith("echo:"), r)
    messages.append({"role": "assistant", "content": r.choices[0].message.content})
    messages.append({"role": "user", "content": f"and the day after, {turn}"})

stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "stream a call"}],
                                        tools=tools, stream=True)
deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
check("streamed signature", deltas and signature_of(deltas[0]), deltas)

# A client that keeps only the OpenAI fields: gemgate stands in for the lost signature.
dropped = [
    {"role": "user", "content": "weather in Rome"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"query\": \"Rome\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"sky\": \"grey\"}"},
]
r = client.chat.completions.create(model=MODEL, messages=dropped, tools=tools)
check("dropped signature still works", (r.choices[0].message.content or "").startswith("echo:"), r)
finish()
