"""OpenAI's Responses API through gemgate with the official `openai` SDK: plain, streamed,
function tools with their output sent back through `previous_response_id`, a conversation
continued over several turns, structured output, retrieve and delete, another client's id.

Run by tests/gateway/protocols.rs against gemgate and the fake Gemini upstream:
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... GEMGATE_OTHER_TOKEN=... python openai_responses.py
"""
import json
import os
from report import check, finish

import openai

url = os.environ["GEMGATE_URL"]
MODEL = "gemini-2.5-flash"
for prefix in ("/v1", "/hf/v1"):
    client = openai.OpenAI(base_url=url + prefix, api_key=os.environ["GEMGATE_TOKEN"], max_retries=0)
    r = client.responses.create(model=MODEL, input="hello responses", instructions="be brief")
    check(f"{prefix} plain", r.output_text == "echo: hello responses", r)
    check(f"{prefix} usage", r.usage and r.usage.input_tokens > 0 and r.usage.output_tokens > 0, r.usage)

client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ["GEMGATE_TOKEN"], max_retries=0)
other = openai.OpenAI(base_url=url + "/v1", api_key=os.environ["GEMGATE_OTHER_TOKEN"], max_retries=0)

events = list(client.responses.create(model=MODEL, input="one two three", stream=True))
kinds = [e.type for e in events]
check("stream starts", kinds[:2] == ["response.created", "response.in_progress"], kinds)
check("stream ends", kinds[-1] == "response.completed", kinds)
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
check("stream text", text == "echo: one two three", text)
check("stream numbered", [e.sequence_number for e in events] == list(range(len(events))), kinds)
streamed = events[-1].response
# Continued at once: the streamed response is kept as its stream ends.
follow = client.responses.create(model=MODEL, input="right after", previous_response_id=streamed.id)
check("continue a stream at once", follow.output_text == "echo: right after", follow)

tools = [{"type": "function", "name": "lookup", "description": "look something up",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]
r = client.responses.create(model=MODEL, input="weather in Paris", tools=tools)
calls = [o for o in r.output if o.type == "function_call"]
check("function call", len(calls) == 1 and json.loads(calls[0].arguments).get("query"), r.output)
r = client.responses.create(model=MODEL, previous_response_id=r.id, tools=tools,
                            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
check("function output", r.output_text.startswith("echo:"), r)
print("conversation", r.id)
for n in range(3):
    r = client.responses.create(model=MODEL, previous_response_id=r.id, input=f"turn {n}")
    check(f"turn {n}", r.output_text == f"echo: turn {n}", r)
last = r.id
print("last", last)

schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
          "additionalProperties": False}
r = client.responses.create(model=MODEL, input="json please",
                            text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
check("structured output", r.status == "completed", r)

got = client.responses.retrieve(last)
check("retrieve", got.id == last and got.output_text == "echo: turn 2", got)
for what, call in [("retrieve", lambda: other.responses.retrieve(last)),
                   ("continue", lambda: other.responses.create(model=MODEL, input="x", previous_response_id=last))]:
    try:
        call()
        check(f"another client's {what}", False, "no error")
    except openai.NotFoundError:
        check(f"another client's {what}", True)
client.responses.delete(last)
try:
    client.responses.retrieve(last)
    check("deleted", False, "no error")
except openai.NotFoundError:
    check("deleted", True)
finish()
