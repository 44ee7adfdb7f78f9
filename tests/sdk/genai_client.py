"""Drives gemgate's native Gemini API with Google's official `google-genai` SDK.

Run by tests/gateway/sdk.rs against gemgate and the fake Gemini upstream:
    GEMGATE_URL=http://127.0.0.1:PORT GEMGATE_TOKEN=... python genai_client.py
Exits non-zero, saying what differed, when an answer is not what the SDK should get.
"""
import io
import os
from report import check, finish

from google import genai
from google.genai import errors, types

url = os.environ["GEMGATE_URL"]
token = os.environ["GEMGATE_TOKEN"]


for version in ("v1beta", "v1"):
    client = genai.Client(api_key=token, http_options=types.HttpOptions(base_url=url, api_version=version))
    r = client.models.generate_content(model="gemini-2.5-flash", contents="hello genai")
    check(f"{version} generate", r.text == "echo: hello genai", r)
    text = "".join(c.text or "" for c in client.models.generate_content_stream(
        model="gemini-2.5-flash", contents="one two three"))
    check(f"{version} stream", text == "echo: one two three", text)

client = genai.Client(api_key=token, http_options=types.HttpOptions(base_url=url))
check("count tokens", client.models.count_tokens(model="gemini-2.5-flash", contents="a b c").total_tokens == 3)
e = client.models.embed_content(model="text-embedding-004", contents=["a", "b"])
check("embed", len(e.embeddings) == 2, e)
names = [m.name for m in client.models.list()]
check("models", "models/gemini-2.5-flash" in names and "models/gemini-2.5-flash-search" in names, names)
check("get model", client.models.get(model="gemini-2.5-pro").name == "models/gemini-2.5-pro")
r = client.models.generate_content(
    model="gemini-2.5-flash", contents="weather?",
    config=types.GenerateContentConfig(tools=[types.Tool(function_declarations=[
        types.FunctionDeclaration(name="lookup", parameters={"type": "object", "properties": {"query": {"type": "string"}}})])]))
check("function call", r.function_calls and r.function_calls[0].name == "lookup", r)

uploaded = client.files.upload(file=io.BytesIO(b"some notes"), config=types.UploadFileConfig(mime_type="text/plain"))
check("file upload", uploaded.name.startswith("files/"), uploaded)
for _ in range(3):
    r = client.models.generate_content(model="gemini-2.5-flash", contents=[uploaded, "summarise"])
    check("generate with the file", r.text == "echo: summarise", r.text)
check("file get", client.files.get(name=uploaded.name).name == uploaded.name)
client.files.delete(name=uploaded.name)

try:
    client.models.generate_content(model="no-such-model", contents="x")
    check("unknown model", False, "no error")
except errors.ClientError as err:
    check("unknown model", err.code == 404, err)

bad = genai.Client(api_key="wrong", http_options=types.HttpOptions(base_url=url))
try:
    bad.models.generate_content(model="gemini-2.5-flash", contents="x")
    check("wrong token", False, "no error")
except errors.ClientError as err:
    check("wrong token", err.code == 401, err)

finish()
