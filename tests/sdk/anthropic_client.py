"""Drives gemgate's Anthropic Messages API with the official `anthropic` SDK, as Claude Code
and other Anthropic clients do: plain, streamed, tools through two turns (a Gemini 3 model's
thought signature carried by the SDK's own content blocks), count_tokens, a wrong token.

Run by tests/gateway/protocols.rs against gemgate and the fake Gemini upstream:
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... python anthropic_client.py
"""
import os
from report import check, finish

import anthropic

url = os.environ["GEMGATE_URL"]
client = anthropic.Anthropic(base_url=url, api_key=os.environ["GEMGATE_TOKEN"], max_retries=0)
MODEL = "gemini-2.5-flash"

m = client.messages.create(model=MODEL, max_tokens=100, system="be brief",
                           messages=[{"role": "user", "content": "hello claude"}])
check("plain", m.content[0].type == "text" and m.content[0].text == "echo: hello claude", m)
check("plain stop", m.stop_reason == "end_turn", m.stop_reason)
check("plain usage", m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m.usage)

with client.messages.stream(model=MODEL, max_tokens=100,
                            messages=[{"role": "user", "content": "one two three"}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
check("stream text", text == "echo: one two three", text)
check("stream final", final.stop_reason == "end_turn" and final.usage.output_tokens > 0, final)

tools = [{"name": "lookup", "description": "look something up",
          "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]
for model in (MODEL, "gemini-3-pro-preview"):
    messages = [{"role": "user", "content": "weather in Paris"}]
    for turn in range(2):
        m = client.messages.create(model=model, max_tokens=200, tools=tools, messages=messages)
        uses = [b for b in m.content if b.type == "tool_use"]
        check(f"{model} turn {turn} tool use", m.stop_reason == "tool_use" and len(uses) == 1, m)
        if not uses:
            break
        check(f"{model} turn {turn} input", uses[0].input.get("query"), uses[0].input)
        # The assistant's content goes back as the SDK gave it: thinking blocks included.
        messages.append({"role": "assistant", "content": m.content})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": uses[0].id, "content": f"sunny, turn {turn}"}]})
        m = client.messages.create(model=model, max_tokens=200, tools=tools, messages=messages)
        check(f"{model} turn {turn} answer", m.content and m.content[0].type == "text"
              and m.content[0].text.startswith("echo:"), m)
        messages.append({"role": "assistant", "content": m.content})
        messages.append({"role": "user", "content": f"and tomorrow, {turn}"})

with client.messages.stream(model=MODEL, max_tokens=100, tools=tools,
                            messages=[{"role": "user", "content": "stream a lookup"}]) as stream:
    final = stream.get_final_message()
uses = [b for b in final.content if b.type == "tool_use"]
check("streamed tool use", final.stop_reason == "tool_use" and len(uses) == 1 and uses[0].input.get("query"), final)

counted = client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "count these four words"}])
check("count tokens", counted.input_tokens > 0, counted)

try:
    anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    check("wrong token", False, "no error")
except anthropic.AuthenticationError as err:
    check("wrong token", err.status_code == 401 and err.body["error"]["type"] == "authentication_error", err.body)
finish()
