//! The Batch API, file downloads and their ownership by Cloud projects, through HTTP on
//! loopback.

use std::net::SocketAddr;

use gemgate_fake_upstream::{FakeConfig, FakeUpstream};
use serde_json::{Value, json};

mod common;
use common::{call, exchange, raw_call};

const CREATE: &str = "/v1beta/models/gemini-2.5-flash:batchGenerateContent";

fn denied() -> Value {
    json!({ "error": {
        "code": 403,
        "message": "Batch not found (or permission denied)",
        "status": "PERMISSION_DENIED",
    } })
}

fn request(text: &str) -> Value {
    json!({ "contents": [{ "role": "user", "parts": [{ "text": text }] }] })
}

/// Uploads `bytes` with the Files API's resumable protocol, as the SDK does: the file's name.
async fn upload(addr: SocketAddr, key: &str, bytes: &[u8]) -> String {
    let start = exchange(
        addr,
        "POST",
        "/upload/v1beta/files",
        &[
            ("x-goog-api-key", key),
            ("x-goog-upload-protocol", "resumable"),
            ("x-goog-upload-command", "start"),
            ("x-goog-upload-header-content-type", "application/jsonl"),
        ],
        br#"{"file":{"display_name":"requests"}}"#,
    )
    .await;
    assert_eq!(start.status, 200);
    let url = start.header("x-goog-upload-url").unwrap();
    let path = &url[url.find("/upload/").unwrap()..];
    // In two chunks.
    let (first, last) = bytes.split_at(bytes.len() / 2);
    let chunk = exchange(
        addr,
        "POST",
        path,
        &[("x-goog-api-key", key), ("x-goog-upload-command", "upload")],
        first,
    )
    .await;
    assert_eq!(chunk.header("x-goog-upload-status"), Some("active"));
    let done = exchange(
        addr,
        "POST",
        path,
        &[
            ("x-goog-api-key", key),
            ("x-goog-upload-command", "upload, finalize"),
        ],
        last,
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.body);
    let file = &done.json()["file"];
    assert_eq!(file["sizeBytes"], bytes.len().to_string().as_str());
    file["name"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn inline_batches_belong_to_their_project() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let quota = json!({ "projects": { "p1": { "keys": ["k1", "k2"] }, "p2": { "keys": ["k4"] } } });
    assert_eq!(
        call(addr, "POST", "/_fake/quota", None, &quota.to_string())
            .await
            .0,
        200
    );
    let body = json!({ "batch": {
        "displayName": "inline",
        "inputConfig": { "requests": { "requests": [
            { "request": request("inline 0"), "metadata": { "key": "a" } },
            { "request": request("inline 1") },
            { "request": {} },
        ] } },
    } });
    let (status, op) = call(addr, "POST", CREATE, Some("k1"), &body.to_string()).await;
    assert_eq!(status, 200, "{op}");
    let name = op["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("batches/"));
    let meta = &op["metadata"];
    assert_eq!(
        meta["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch"
    );
    assert_eq!(meta["model"], "models/gemini-2.5-flash");
    assert_eq!(meta["displayName"], "inline");
    assert_eq!(meta["state"], "BATCH_STATE_PENDING");
    assert_eq!(meta["createTime"], meta["updateTime"]);
    assert!(op.get("done").is_none());
    assert_eq!(fake.state.batch_owner(&name).as_deref(), Some("k1"));

    // Another project's key, or a key in none, is refused, without ErrorInfo.
    let path = format!("/v1beta/{name}");
    for key in ["k3", "k4"] {
        let (status, body) = raw_call(addr, "GET", &path, Some(key), "").await;
        assert_eq!(status, 403);
        assert!(!body.contains("ErrorInfo"), "{body}");
        for (method, p) in [
            ("GET", path.clone()),
            ("POST", format!("{path}:cancel")),
            ("DELETE", path.clone()),
        ] {
            assert_eq!(call(addr, method, &p, Some(key), "").await, (403, denied()));
        }
        let (status, list) = call(addr, "GET", "/v1beta/batches", Some(key), "").await;
        assert_eq!((status, list), (200, json!({})));
    }
    assert_eq!(
        call(addr, "GET", "/v1beta/batches/nosuchbatch", Some("k1"), "").await,
        (403, denied())
    );

    // The first get finishes it; the project's other key sees it.
    let (status, done) = call(addr, "GET", &path, Some("k2"), "").await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["done"], true);
    let meta = &done["metadata"];
    assert_eq!(meta["state"], "BATCH_STATE_SUCCEEDED");
    assert!(meta["endTime"].as_str().unwrap().ends_with('Z'));
    let responses = meta["output"]["inlinedResponses"]["inlinedResponses"]
        .as_array()
        .unwrap();
    assert_eq!(responses.len(), 3);
    let text = |r: &Value| {
        r["response"]["candidates"][0]["content"]["parts"][0]["text"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(text(&responses[0]).as_deref(), Some("echo: inline 0"));
    assert_eq!(responses[0]["metadata"], json!({ "key": "a" }));
    assert_eq!(
        responses[0]["response"]["candidates"][0]["finishReason"],
        "STOP"
    );
    assert_eq!(
        responses[0]["response"]["usageMetadata"]["promptTokenCount"],
        2
    );
    assert_eq!(text(&responses[1]).as_deref(), Some("echo: inline 1"));
    assert!(responses[1].get("metadata").is_none());
    assert_eq!(responses[2]["error"]["code"], 400);
    assert_eq!(meta["batchStats"]["successfulRequestCount"], "2");
    assert_eq!(meta["batchStats"]["failedRequestCount"], "1");
    assert_eq!(
        done["response"]["@type"],
        "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput"
    );
    // Cancelling a finished batch changes nothing.
    assert_eq!(
        call(addr, "POST", &format!("{path}:cancel"), Some("k1"), "").await,
        (200, json!({}))
    );
    let (_, again) = call(addr, "GET", &path, Some("k1"), "").await;
    assert_eq!(again, done);

    // A pending batch is cancelled; lists page through the project's batches.
    let small = json!({ "batch": { "inputConfig": { "requests": { "requests": [{ "request": request("later") }] } } } });
    let (_, second) = call(addr, "POST", CREATE, Some("k2"), &small.to_string()).await;
    let (_, third) = call(addr, "POST", CREATE, Some("k1"), &small.to_string()).await;
    let (_, foreign) = call(addr, "POST", CREATE, Some("k4"), &small.to_string()).await;
    let second = second["name"].as_str().unwrap().to_owned();
    let cancel = format!("/v1beta/{second}:cancel");
    assert_eq!(
        call(addr, "POST", &cancel, Some("k1"), "").await,
        (200, json!({}))
    );
    let (_, cancelled) = call(addr, "GET", &format!("/v1beta/{second}"), Some("k1"), "").await;
    assert_eq!(cancelled["metadata"]["state"], "BATCH_STATE_CANCELLED");
    assert_eq!(cancelled["done"], true);
    assert!(cancelled["metadata"].get("output").is_none());

    let names = |list: &Value| -> Vec<String> {
        list["operations"]
            .as_array()
            .map(|ops| {
                ops.iter()
                    .map(|o| o["name"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (_, page) = call(addr, "GET", "/v1beta/batches?pageSize=2", Some("k2"), "").await;
    assert_eq!(names(&page), [name.as_str(), second.as_str()]);
    let token = page["nextPageToken"].as_str().unwrap();
    let (_, page) = call(
        addr,
        "GET",
        &format!("/v1beta/batches?pageSize=2&pageToken={token}"),
        Some("k1"),
        "",
    )
    .await;
    assert_eq!(names(&page), [third["name"].as_str().unwrap()]);
    assert!(page.get("nextPageToken").is_none());
    let (_, page) = call(addr, "GET", "/v1beta/batches", Some("k4"), "").await;
    assert_eq!(names(&page), [foreign["name"].as_str().unwrap()]);
    let (status, _) = call(addr, "GET", "/v1beta/batches?pageSize=-1", Some("k1"), "").await;
    assert_eq!(status, 400);

    // Delete.
    assert_eq!(
        call(addr, "DELETE", &path, Some("k2"), "").await,
        (200, json!({}))
    );
    assert_eq!(
        call(addr, "GET", &path, Some("k1"), "").await,
        (403, denied())
    );
    assert_eq!(fake.state.batch_owner(&name).as_deref(), Some("k1"));
    fake.state.reset();
    assert!(fake.state.batch_owner(&name).is_none());
    assert!(fake.state.batch_owner(&second).is_none());
}

#[tokio::test]
async fn file_batches_write_a_results_file() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    let quota = json!({ "projects": { "p1": { "keys": ["k1", "k2"] } } });
    call(addr, "POST", "/_fake/quota", None, &quota.to_string()).await;
    let lines: String = (0..4)
        .map(|n| {
            json!({ "key": format!("k{n}"), "request": request(&format!("file {n}")) }).to_string()
                + "\n"
        })
        .collect::<String>()
        + "\nnot json\n";
    let file = upload(addr, "k1", lines.as_bytes()).await;

    // The uploaded bytes come back, by both download paths, to the project's keys.
    let id = file.strip_prefix("files/").unwrap();
    for path in [
        format!("/download/v1beta/files/{id}:download?alt=media"),
        format!("/v1beta/files/{id}:download?alt=media"),
    ] {
        let got = exchange(addr, "GET", &path, &[("x-goog-api-key", "k2")], b"").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, lines);
        let (status, body) = raw_call(addr, "GET", &path, Some("k3"), "").await;
        assert_eq!(status, 403);
        assert!(!body.contains("ErrorInfo"), "{body}");
    }

    // A batch of a file another project's key uploaded is refused.
    let by_file =
        |name: &str| json!({ "batch": { "inputConfig": { "fileName": name } } }).to_string();
    let (status, body) = raw_call(addr, "POST", CREATE, Some("k3"), &by_file(&file)).await;
    assert_eq!(status, 403);
    assert!(!body.contains("ErrorInfo"), "{body}");
    let (status, _) = call(addr, "POST", CREATE, Some("k1"), &by_file("files/nope")).await;
    assert_eq!(status, 403);

    let (status, op) = call(addr, "POST", CREATE, Some("k2"), &by_file(&file)).await;
    assert_eq!(status, 200, "{op}");
    let name = op["name"].as_str().unwrap();
    let batch_id = name.strip_prefix("batches/").unwrap();
    let (status, done) = call(addr, "GET", &format!("/v1beta/{name}"), Some("k1"), "").await;
    assert_eq!(status, 200);
    assert_eq!(done["metadata"]["state"], "BATCH_STATE_SUCCEEDED");
    let out = format!("files/batch-{batch_id}-out");
    assert_eq!(done["metadata"]["output"]["responsesFile"], out.as_str());

    let path = format!("/v1beta/{out}:download?alt=media");
    let got = exchange(addr, "GET", &path, &[("x-goog-api-key", "k1")], b"").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/jsonl"));
    let results: Vec<Value> = got
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 5);
    for (n, r) in results.iter().take(4).enumerate() {
        assert_eq!(r["key"], format!("k{n}").as_str());
        assert_eq!(
            r["response"]["candidates"][0]["content"]["parts"][0]["text"],
            format!("echo: file {n}").as_str()
        );
    }
    assert_eq!(results[4]["error"]["code"], 400);
    let (status, _) = call(addr, "GET", &path, Some("k3"), "").await;
    assert_eq!(status, 403);
    // The results file is one of the creating key's files.
    let (status, meta) = call(addr, "GET", &format!("/v1beta/{out}"), Some("k2"), "").await;
    assert_eq!(status, 200);
    assert_eq!(meta["mimeType"], "application/jsonl");

    // A deleted file is gone.
    let (status, _) = call(addr, "DELETE", &format!("/v1beta/{file}"), Some("k1"), "").await;
    assert_eq!(status, 200);
    let path = format!("/v1beta/{file}:download?alt=media");
    let (status, _) = call(addr, "GET", &path, Some("k1"), "").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn bad_batches_are_refused() {
    let fake = FakeUpstream::start(FakeConfig::default()).await.unwrap();
    let addr = fake.addr;
    for body in [
        "not json",
        "[]",
        "{}",
        r#"{"batch":{}}"#,
        r#"{"batch":{"inputConfig":{}}}"#,
        r#"{"batch":{"inputConfig":{"requests":{"requests":[]}}}}"#,
        r#"{"batch":{"inputConfig":{"requests":{"requests":[1]}}}}"#,
        r#"{"batch":{"inputConfig":{"fileName":7}}}"#,
        r#"{"batch":{"displayName":1,"inputConfig":{"fileName":"files/x"}}}"#,
    ] {
        let (status, error) = call(addr, "POST", CREATE, Some("k"), body).await;
        assert_eq!(status, 400, "{body}: {error}");
    }
    let ok = json!({ "batch": { "inputConfig": { "requests": { "requests": [{ "request": request("x") }] } } } }).to_string();
    let path = "/v1beta/models/no-such-model:batchGenerateContent";
    assert_eq!(call(addr, "POST", path, Some("k"), &ok).await.0, 404);
    // Keys behave as their prefix says, and x-fake-error applies.
    let (status, error) = call(addr, "POST", CREATE, Some("invalid-k"), &ok).await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let refused = exchange(
        addr,
        "POST",
        CREATE,
        &[
            ("x-goog-api-key", "k"),
            ("x-fake-error", "403 SERVICE_DISABLED"),
        ],
        ok.as_bytes(),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        refused.json()["error"]["details"][0]["reason"],
        "SERVICE_DISABLED"
    );
    let odd = exchange(
        addr,
        "POST",
        CREATE,
        &[("x-goog-api-key", "k"), ("x-fake-error", "70000 X")],
        ok.as_bytes(),
    )
    .await;
    assert_eq!(odd.status, 400);
    assert_eq!(
        call(addr, "PUT", "/v1beta/batches/x", Some("k"), "")
            .await
            .0,
        405
    );
}
