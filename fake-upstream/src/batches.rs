//! Google's Batch API (`models/{model}:batchGenerateContent`, `/v1beta/batches…`), the bytes
//! the Files API keeps, and file downloads.
//!
//! A batch belongs to the Cloud project of the key that created it (its quota-model project,
//! else the key alone); a call about another project's batch, or an unknown one, answers
//! Google's 403 with no `ErrorInfo`. A batch is created `BATCH_STATE_PENDING` and finishes
//! (`BATCH_STATE_SUCCEEDED`) at its first get, each request answered `echo: <its last user
//! text>` as `generateContent` answers. A file's bytes (up to [`MAX_FILE_BYTES`], within
//! [`MAX_KEPT_BYTES`] in all, the oldest forgotten first) are kept for batch inputs and
//! downloads; a file may be used or downloaded by any key of its uploader's project.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::{Value, json};

use super::cache::{Owner, field, invalid, now_ns, rfc3339};
use super::store::{Owned, Store, lower_alnum, random_id};
use super::{
    Body, FakeState, Usage, content_response, full, google_error, json_response, last_text,
    query_value, words,
};

/// The most batches the fake keeps.
pub const MAX_BATCHES: usize = 10_000;
/// The largest file whose bytes the fake keeps.
pub const MAX_FILE_BYTES: usize = 8 << 20;
/// The most file bytes the fake keeps in all.
pub const MAX_KEPT_BYTES: usize = 256 << 20;
/// The most uploads in progress whose bytes the fake gathers.
const MAX_PENDING_UPLOADS: usize = 64;
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
const BATCH_TYPE: &str =
    "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch";
const OUTPUT_TYPE: &str =
    "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput";

#[derive(Debug)]
enum Input {
    /// `inputConfig.requests.requests`: `{"request": …, "metadata": …}` each.
    Inline(Vec<Value>),
    /// The bytes of `inputConfig.fileName`, JSON lines of `{"key": …, "request": …}`.
    File(Bytes),
}

#[derive(Debug)]
pub(crate) struct Batch {
    key: String,
    owner: Owner,
    /// The bare model name.
    model: String,
    display_name: Option<String>,
    state: &'static str,
    create: i128,
    update: i128,
    end: Option<i128>,
    input: Input,
    requests: usize,
    succeeded: usize,
    /// `metadata.output`, once it succeeded.
    output: Option<Value>,
}

impl Owned for Batch {
    fn owner(&self) -> &Owner {
        &self.owner
    }
}

impl Batch {
    /// The batch as a long-running operation.
    fn json(&self, id: &str) -> Value {
        let name = format!("batches/{id}");
        let pending = if self.end.is_some() { 0 } else { self.requests };
        let mut meta = json!({
            "@type": BATCH_TYPE,
            "name": name,
            "model": format!("models/{}", self.model),
            "state": self.state,
            "createTime": rfc3339(self.create),
            "updateTime": rfc3339(self.update),
            "batchStats": {
                "requestCount": self.requests.to_string(),
                "successfulRequestCount": self.succeeded.to_string(),
                "failedRequestCount": (self.requests - self.succeeded - pending).to_string(),
                "pendingRequestCount": pending.to_string(),
            },
        });
        if let Some(n) = &self.display_name {
            meta["displayName"] = json!(n);
        }
        if let Some(end) = self.end {
            meta["endTime"] = json!(rfc3339(end));
        }
        let mut op = json!({ "name": name, "metadata": meta });
        if let Some(output) = &self.output {
            op["metadata"]["output"] = output.clone();
            let mut response = output.clone();
            response["@type"] = json!(OUTPUT_TYPE);
            op["response"] = response;
        }
        if self.end.is_some() {
            op["done"] = json!(true);
        }
        op
    }
}

pub(crate) type Batches = Store<Batch, MAX_BATCHES>;

/// Google's answer about a batch that is unknown or another project's.
fn denied() -> Response<Body> {
    google_error(
        403,
        "PERMISSION_DENIED",
        "Batch not found (or permission denied)",
        Value::Null,
    )
}

/// Google's answer about a file that is unknown or another project's.
fn file_denied(id: &str) -> Response<Body> {
    google_error(
        403,
        "PERMISSION_DENIED",
        &format!("You do not have permission to access the File {id} or it may not exist."),
        Value::Null,
    )
}

/// The bytes of files, and of uploads in progress.
#[derive(Debug, Default)]
pub(crate) struct FileBytes {
    kept: HashMap<String, Bytes>,
    /// File ids, oldest first.
    order: VecDeque<String>,
    total: usize,
    /// Upload id → (bytes received, the bytes while at most `MAX_FILE_BYTES`).
    pending: HashMap<String, (usize, Option<Vec<u8>>)>,
}

impl FileBytes {
    /// Adds a chunk to upload `upload`.
    pub(crate) fn append(&mut self, upload: &str, chunk: &[u8]) {
        if !self.pending.contains_key(upload) && self.pending.len() >= MAX_PENDING_UPLOADS {
            let evict = self.pending.keys().next().cloned();
            if let Some(evict) = evict {
                self.pending.remove(&evict);
            }
        }
        let (len, data) = self
            .pending
            .entry(upload.to_owned())
            .or_insert_with(|| (0, Some(Vec::new())));
        *len += chunk.len();
        if *len > MAX_FILE_BYTES {
            *data = None;
        } else if let Some(data) = data {
            data.extend_from_slice(chunk);
        }
    }

    /// Ends upload `upload` with its last chunk: its size, and its bytes unless too many.
    pub(crate) fn finish(&mut self, upload: &str, chunk: &[u8]) -> (usize, Option<Bytes>) {
        self.append(upload, chunk);
        let (len, data) = self.pending.remove(upload).unwrap_or((0, None));
        (len, data.map(Bytes::from))
    }

    /// Keeps the bytes of file `id`, forgetting the oldest files' bytes if need be.
    pub(crate) fn keep(&mut self, id: &str, bytes: Bytes) {
        if bytes.len() > MAX_FILE_BYTES {
            return;
        }
        self.forget(id);
        while self.total + bytes.len() > MAX_KEPT_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.kept.remove(&oldest) {
                self.total -= b.len();
            }
        }
        self.total += bytes.len();
        self.order.push_back(id.to_owned());
        self.kept.insert(id.to_owned(), bytes);
    }

    pub(crate) fn get(&self, id: &str) -> Option<Bytes> {
        self.kept.get(id).cloned()
    }

    pub(crate) fn forget(&mut self, id: &str) {
        if let Some(b) = self.kept.remove(id) {
            self.total -= b.len();
            self.order.retain(|f| f != id);
        }
    }
}

/// The metadata and bytes of file `id` if `owner` may see it (its uploader is `owner`'s), or
/// Google's 403.
fn owned_file(
    state: &FakeState,
    owner: &Owner,
    id: &str,
) -> Result<(Value, Option<Bytes>), Box<Response<Body>>> {
    let found = state.files.lock().unwrap().get(id).cloned();
    let Some((uploader, meta)) = found else {
        return Err(Box::new(file_denied(id)));
    };
    if state.owner_of(&uploader) != *owner {
        return Err(Box::new(file_denied(id)));
    }
    Ok((meta, state.file_bytes.lock().unwrap().get(id)))
}

/// `GET /download/v1beta/files/{id}:download` or `GET /v1beta/files/{id}:download`: the bytes.
pub(crate) fn download(state: &FakeState, key: &str, id: &str) -> Response<Body> {
    let owner = state.owner_of(key);
    let (meta, bytes) = match owned_file(state, &owner, id) {
        Ok(f) => f,
        Err(refused) => return *refused,
    };
    let Some(bytes) = bytes else {
        return google_error(
            404,
            "NOT_FOUND",
            &format!("The content of File {id} is not available."),
            Value::Null,
        );
    };
    let content_type = match meta["mimeType"].as_str() {
        Some("application/jsonl") => "application/jsonl",
        _ => "application/octet-stream",
    };
    full(StatusCode::OK, content_type, bytes)
}

/// `POST models/{model}:batchGenerateContent`, the body parsed.
pub(crate) fn create(state: &FakeState, key: &str, model: &str, request: &Value) -> Response<Body> {
    if !request.is_object() {
        return invalid("Invalid JSON payload received. Expected an object.");
    }
    let owner = state.owner_of(key);
    let batch = field(request, "batch").unwrap_or(request);
    let display_name = match field(batch, "displayName") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return invalid("Invalid JSON payload received. displayName is not a string."),
    };
    let Some(config) = field(batch, "inputConfig") else {
        return invalid(
            "* BatchGenerateContentRequest.batch.input_config: input_config is not specified\n",
        );
    };
    let input = match (field(config, "requests"), field(config, "fileName")) {
        (Some(requests), None) => {
            let Some(items) = field(requests, "requests").and_then(Value::as_array) else {
                return invalid("* inputConfig.requests.requests: requests is not a list\n");
            };
            if items.is_empty() {
                return invalid("* inputConfig.requests.requests: requests must not be empty\n");
            }
            if !items.iter().all(Value::is_object) {
                return invalid("Invalid JSON payload received. A request is not an object.");
            }
            Input::Inline(items.clone())
        }
        (None, Some(Value::String(name))) => {
            let id = name.strip_prefix("files/").unwrap_or(name.as_str());
            match owned_file(state, &owner, id) {
                Ok((_, Some(bytes))) => Input::File(bytes),
                Ok((_, None)) => {
                    return invalid(&format!("The content of File {id} is not available."));
                }
                Err(refused) => return *refused,
            }
        }
        (None, Some(_)) => {
            return invalid("Invalid JSON payload received. fileName is not a string.");
        }
        _ => return invalid("inputConfig must set exactly one of requests and fileName."),
    };
    let requests = match &input {
        Input::Inline(items) => items.len(),
        Input::File(bytes) => jsonl_lines(bytes).count(),
    };
    let now = now_ns();
    let batch = Batch {
        key: key.to_owned(),
        owner,
        model: model.to_owned(),
        display_name,
        state: "BATCH_STATE_PENDING",
        create: now,
        update: now,
        end: None,
        input,
        requests,
        succeeded: 0,
        output: None,
    };
    let mut batches = state.batches.lock().unwrap();
    let id = loop {
        let id = random_id(20, lower_alnum);
        if !batches.contains(&id) {
            break id;
        }
    };
    let answer = batch.json(&id);
    batches.insert(id.clone(), batch);
    drop(batches);
    state.created(format!("batches/{id}"), key);
    json_response(StatusCode::OK, &answer)
}

/// The non-blank lines of a JSON-lines file.
fn jsonl_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
}

/// `generateContent`'s answer to one request of a batch, or the error it met.
fn answer(model: &str, request: Option<&Value>) -> Result<Value, Value> {
    let contents = request
        .and_then(|r| r.get("contents"))
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            json!({ "code": 400, "message": "* GenerateContentRequest.contents: contents is not specified\n", "status": "INVALID_ARGUMENT" })
        })?;
    let prompt = last_text(contents);
    let text = format!("echo: {prompt}");
    let usage = Usage {
        prompt: words(&prompt),
        cached: 0,
    };
    Ok(content_response(model, &text, true, usage, words(&text)))
}

/// Finishes batch `id`: answers each of its requests.
fn finish(state: &FakeState, id: &str, batch: &mut Batch) {
    let now = now_ns();
    let mut succeeded = 0;
    let output = match &batch.input {
        Input::Inline(items) => {
            let responses: Vec<Value> = items
                .iter()
                .map(|item| {
                    let mut out = match answer(&batch.model, item.get("request")) {
                        Ok(r) => {
                            succeeded += 1;
                            json!({ "response": r })
                        }
                        Err(e) => json!({ "error": e }),
                    };
                    if let Some(meta) = field(item, "metadata") {
                        out["metadata"] = meta.clone();
                    }
                    out
                })
                .collect();
            json!({ "inlinedResponses": { "inlinedResponses": responses } })
        }
        Input::File(bytes) => {
            let mut out = Vec::new();
            for line in jsonl_lines(bytes) {
                let parsed = serde_json::from_slice::<Value>(line).ok();
                let mut result =
                    match answer(&batch.model, parsed.as_ref().and_then(|l| l.get("request"))) {
                        Ok(r) => {
                            succeeded += 1;
                            json!({ "response": r })
                        }
                        Err(e) => json!({ "error": e }),
                    };
                if let Some(k) = parsed.as_ref().and_then(|l| field(l, "key")) {
                    result["key"] = k.clone();
                }
                out.extend_from_slice(result.to_string().as_bytes());
                out.push(b'\n');
            }
            let file_id = format!("batch-{id}-out");
            let meta = json!({
                "name": format!("files/{file_id}"),
                "displayName": format!("batches/{id} output"),
                "mimeType": "application/jsonl",
                "sizeBytes": out.len().to_string(),
                "state": "ACTIVE",
                "source": "GENERATED",
                "expirationTime": "2099-01-01T00:00:00Z",
            });
            state
                .files
                .lock()
                .unwrap()
                .insert(file_id.clone(), (batch.key.clone(), meta));
            state
                .file_bytes
                .lock()
                .unwrap()
                .keep(&file_id, Bytes::from(out));
            json!({ "responsesFile": format!("files/{file_id}") })
        }
    };
    batch.state = "BATCH_STATE_SUCCEEDED";
    batch.succeeded = succeeded;
    batch.update = now;
    batch.end = Some(now);
    batch.output = Some(output);
}

/// Every call on `/{version}/batches[/{id}[:cancel]]` (`rest` empty for the collection).
pub(crate) fn call(
    state: &FakeState,
    key: &str,
    method: &Method,
    rest: &str,
    query: &str,
) -> Response<Body> {
    let owner = state.owner_of(key);
    let (id, cancel) = match rest.strip_suffix(":cancel") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    if id.contains(['/', ':']) {
        return google_error(
            404,
            "NOT_FOUND",
            &format!("batches/{rest} is not found"),
            Value::Null,
        );
    }
    match (id.is_empty(), cancel, method) {
        (true, false, &Method::GET) => list(state, &owner, query),
        (false, false, &Method::GET) => {
            let mut batches = state.batches.lock().unwrap();
            let Some(batch) = batches.owned(id, &owner) else {
                return denied();
            };
            if batch.state == "BATCH_STATE_PENDING" {
                finish(state, id, batch);
            }
            json_response(StatusCode::OK, &batch.json(id))
        }
        (false, true, &Method::POST) => {
            let mut batches = state.batches.lock().unwrap();
            let Some(batch) = batches.owned(id, &owner) else {
                return denied();
            };
            if batch.end.is_none() {
                let now = now_ns();
                batch.state = "BATCH_STATE_CANCELLED";
                batch.update = now;
                batch.end = Some(now);
            }
            json_response(StatusCode::OK, &json!({}))
        }
        (false, false, &Method::DELETE) => {
            let mut batches = state.batches.lock().unwrap();
            if batches.owned(id, &owner).is_none() {
                return denied();
            }
            batches.remove(id);
            json_response(StatusCode::OK, &json!({}))
        }
        _ => google_error(405, "UNIMPLEMENTED", "Method not allowed", Value::Null),
    }
}

fn list(state: &FakeState, owner: &Owner, query: &str) -> Response<Body> {
    let size = match query_value(query, "pageSize").map(str::parse::<i64>) {
        None | Some(Ok(0)) => DEFAULT_PAGE_SIZE,
        Some(Ok(n)) if n > 0 => (n as usize).min(MAX_PAGE_SIZE),
        Some(_) => return invalid("pageSize must be a non-negative number."),
    };
    let start = match query_value(query, "pageToken").filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => match token.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return invalid("Invalid page token."),
        },
    };
    let batches = state.batches.lock().unwrap();
    let mut page: Vec<(u64, Value)> = batches
        .since(start)
        .filter(|(_, _, b)| b.owner == *owner)
        .map(|(seq, id, b)| (seq, b.json(id)))
        .take(size + 1)
        .collect();
    let mut body = json!({});
    if page.len() > size {
        let (next, _) = page.pop().expect("more than size");
        body["nextPageToken"] = json!(next.to_string());
    }
    if !page.is_empty() {
        body["operations"] = page.into_iter().map(|(_, v)| v).collect();
    }
    json_response(StatusCode::OK, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_bytes_are_bounded() {
        let mut files = FileBytes::default();
        files.append("u", b"ab");
        let (len, data) = files.finish("u", b"cd");
        assert_eq!((len, data.as_deref()), (4, Some(&b"abcd"[..])));
        let big = vec![0u8; MAX_FILE_BYTES];
        files.append("v", &big);
        let (len, data) = files.finish("v", b"x");
        assert_eq!((len, data), (MAX_FILE_BYTES + 1, None));
        for i in 0..(MAX_KEPT_BYTES / MAX_FILE_BYTES + 1) {
            files.keep(&format!("f{i}"), Bytes::from(big.clone()));
        }
        assert!(files.total <= MAX_KEPT_BYTES);
        assert!(files.get("f0").is_none());
        assert!(files.get("f1").is_some());
        files.forget("f1");
        assert!(files.get("f1").is_none());
        assert_eq!(files.order.len(), files.kept.len());
    }
}
