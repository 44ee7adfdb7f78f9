"""The Interactions API through gemgate with Google's official `google-genai` SDK.

Run by tests/gateway/surfaces.rs against gemgate and the fake Gemini upstream, whose keys belong
to different projects (an interaction exists only for the project of the key that made it):
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... GEMGATE_OTHER_TOKEN=... python genai_interactions.py
Prints the ids it made (`made <id>`), for the test to ask the fake which key holds each.
Exits non-zero when an answer is not what the SDK should get.
"""
import os
from report import check, finish

from google import genai
from google.genai import types

url = os.environ["GEMGATE_URL"]
client = genai.Client(api_key=os.environ["GEMGATE_TOKEN"], http_options=types.HttpOptions(base_url=url))
other = genai.Client(api_key=os.environ["GEMGATE_OTHER_TOKEN"], http_options=types.HttpOptions(base_url=url))
MODEL = "gemini-2.5-flash"


def status_of(err):
    return getattr(err, "status_code", None) or getattr(getattr(err, "raw_response", None), "status_code", None)


first = client.interactions.create(model=MODEL, input="hello there")
check("create", first.id and first.status == "completed", first)
check("output", "echo: hello there" in (first.output_text or ""), first)
print("made", first.id)

# A conversation: each turn follows the one before, on the key that holds it.
previous = first.id
for n in range(8):
    turn = client.interactions.create(model=MODEL, input=f"turn {n}", previous_interaction_id=previous)
    check(f"follow-up {n}", turn.status == "completed" and f"turn {n}" in (turn.output_text or ""), turn)
    previous = turn.id
    print("made", turn.id)
for n in range(4):
    got = client.interactions.get(id=previous)
    check(f"get {n}", got.id == previous, got)

# A stream, whole.
events = list(client.interactions.create(model=MODEL, input="stream me along", stream=True))
kinds = [e.event_type for e in events]
check("stream starts", kinds[:1] == ["interaction.created"], kinds)
check("stream ends", kinds[-1:] == ["interaction.completed"], kinds)
streamed = events[0].interaction.id
print("made", streamed)

# A stream that breaks is resumed after its last event, on its own key.
broken = []
try:
    for event in client.interactions.create(model=MODEL, input="[break] keep going please", stream=True):
        broken.append(event)
except Exception as err:  # the connection broke: expected
    print("stream broke:", type(err).__name__)
check("broken stream began", broken and broken[0].event_type == "interaction.created", broken)
check("broken stream broke", broken and broken[-1].event_type != "interaction.completed", broken)
resumed_id = broken[0].interaction.id
print("made", resumed_id)
for n in range(3):
    rest = list(client.interactions.get(id=resumed_id, stream=True, last_event_id=broken[-1].event_id))
    check(f"resumed {n}", rest and rest[-1].event_type == "interaction.completed", rest)
    check(f"resumed after {n}", all(e.event_id != broken[-1].event_id for e in rest), rest)

# Background work, cancelled.
background = client.interactions.create(model=MODEL, input="a long job", background=True)
check("background", background.status == "in_progress", background)
print("made", background.id)
cancelled = client.interactions.cancel(id=background.id)
check("cancel", cancelled.status == "cancelled", cancelled)

# Another client sees none of it.
for what, call in [
    ("get", lambda: other.interactions.get(id=previous)),
    ("follow-up", lambda: other.interactions.create(model=MODEL, input="x", previous_interaction_id=previous)),
    ("cancel", lambda: other.interactions.cancel(id=background.id)),
]:
    try:
        call()
        check(f"another client's {what}", False, "no error")
    except Exception as err:
        check(f"another client's {what}", status_of(err) == 404, repr(err))

client.interactions.delete(id=first.id)
try:
    client.interactions.get(id=first.id)
    check("deleted", False, "no error")
except Exception as err:
    check("deleted", status_of(err) == 404, repr(err))
finish()
