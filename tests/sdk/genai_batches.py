"""The Batch API through gemgate with Google's official `google-genai` SDK: inline requests and a
file of requests, get, list, cancel, delete, and the results file's download.

Run by tests/gateway/surfaces.rs against gemgate and the fake Gemini upstream, whose keys belong
to different projects (a batch exists only for the project of the key that made it):
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... GEMGATE_OTHER_TOKEN=... python genai_batches.py
Prints the batches it made (`made batches/…`). Exits non-zero when an answer is wrong.
"""
import io
import json
import os
from report import check, finish

from google import genai
from google.genai import errors, types

url = os.environ["GEMGATE_URL"]
client = genai.Client(api_key=os.environ["GEMGATE_TOKEN"], http_options=types.HttpOptions(base_url=url))
other = genai.Client(api_key=os.environ["GEMGATE_OTHER_TOKEN"], http_options=types.HttpOptions(base_url=url))
MODEL = "gemini-2.5-flash"
DONE = types.JobState.JOB_STATE_SUCCEEDED

inline = client.batches.create(
    model=MODEL,
    src=[{"contents": [{"parts": [{"text": f"inline {n}"}], "role": "user"}]} for n in range(3)],
    config={"display_name": "inline"})
check("inline create", inline.name.startswith("batches/"), inline)
print("made", inline.name)
for n in range(5):
    got = client.batches.get(name=inline.name)
    check(f"inline get {n}", got.state == DONE, got.state)
responses = got.dest.inlined_responses
check("inline results", [r.response.text for r in responses] == [f"echo: inline {n}" for n in range(3)],
      [r.response.text for r in responses])

lines = "".join(json.dumps({"key": f"k{n}", "request": {"contents": [{"parts": [{"text": f"file {n}"}]}]}}) + "\n"
                for n in range(4))
uploaded = client.files.upload(file=io.BytesIO(lines.encode()),
                               config=types.UploadFileConfig(mime_type="application/jsonl", display_name="requests"))
from_file = client.batches.create(model=MODEL, src=uploaded.name)
check("file create", from_file.name.startswith("batches/"), from_file)
print("made", from_file.name)
done = client.batches.get(name=from_file.name)
check("file batch done", done.state == DONE and done.dest.file_name, done)
for n in range(3):
    results = client.files.download(file=done.dest.file_name).decode()
    keys = [json.loads(l)["key"] for l in results.splitlines() if l.strip()]
    check(f"results file {n}", keys == [f"k{i}" for i in range(4)], results[:200])

listed = sorted(b.name for b in client.batches.list())
check("list", listed == sorted([inline.name, from_file.name]), listed)
check("another client's list", list(other.batches.list()) == [])
for what, call in [
    ("get", lambda: other.batches.get(name=inline.name)),
    ("cancel", lambda: other.batches.cancel(name=inline.name)),
    ("download", lambda: other.files.download(file=done.dest.file_name)),
]:
    try:
        call()
        check(f"another client's {what}", False, "no error")
    except errors.ClientError as err:
        check(f"another client's {what}", err.code == 404, err)

pending = client.batches.create(model=MODEL, src=[{"contents": [{"parts": [{"text": "later"}]}]}])
print("made", pending.name)
client.batches.cancel(name=pending.name)
check("cancelled", client.batches.get(name=pending.name).state == types.JobState.JOB_STATE_CANCELLED)
client.batches.delete(name=pending.name)
try:
    client.batches.get(name=pending.name)
    check("deleted", False, "no error")
except errors.ClientError as err:
    check("deleted", err.code == 404, err)
finish()
