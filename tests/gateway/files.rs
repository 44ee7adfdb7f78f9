//! The Files API: an uploaded file belongs to the key that uploaded it, and every request about
//! it, or naming it, goes with that key.

use crate::common::*;

#[tokio::test]
async fn uploads_and_the_requests_naming_them_use_one_key() {
    let fake = fake().await;
    let mut gate = gate()
        .upstream(&fake, &["good-1", "good-2", "good-3"])
        .start()
        .await;
    let content = b"some notes to read";
    let resp = client()
        .post(gate.url("/upload/v1beta/files"))
        .header("x-goog-api-key", TOKEN)
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header(
            "x-goog-upload-header-content-length",
            content.len().to_string(),
        )
        .header("x-goog-upload-header-content-type", "text/plain")
        .json(&json!({ "file": { "display_name": "notes" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let upload_url = resp.headers()["x-goog-upload-url"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        upload_url.starts_with(&gate.url("/upload/v1beta/files?upload_id=")),
        "{upload_url}"
    );

    let resp = client()
        .post(&upload_url)
        .header("x-goog-api-key", TOKEN)
        .header("x-goog-upload-command", "upload, finalize")
        .header("x-goog-upload-offset", "0")
        .body(content.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    let name = file["file"]["name"].as_str().unwrap().to_owned();
    let uri = file["file"]["uri"].as_str().unwrap().to_owned();
    let owner = fake.state.last_received().unwrap().key.unwrap();
    // A finished upload's URL opens nothing any more.
    let resp = client()
        .post(&upload_url)
        .header("x-goog-upload-command", "upload, finalize")
        .body("again")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // Round-robin would spread these over three keys; the file pins them to its owner.
    for _ in 0..4 {
        let body = json!({ "contents": [{ "role": "user", "parts": [
            { "fileData": { "fileUri": uri, "mimeType": "text/plain" } },
            { "text": "summarise" }
        ] }] });
        let (status, _, v) = post(&gate, GENERATE, &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            fake.state.last_received().unwrap().key.as_deref(),
            Some(owner.as_str())
        );
    }

    // Remembered across a restart.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    gate.restart("TERM").await;
    for _ in 0..3 {
        let body = json!({ "contents": [{ "role": "user", "parts": [
            { "fileData": { "fileUri": uri, "mimeType": "text/plain" } }
        ] }] });
        assert_eq!(post(&gate, GENERATE, &body).await.0, 200);
        assert_eq!(
            fake.state.last_received().unwrap().key.as_deref(),
            Some(owner.as_str())
        );
    }

    let id = name.trim_start_matches("files/");
    let (status, v) = get(&gate, &format!("/v1beta/files/{id}")).await;
    assert_eq!((status, v["name"].as_str()), (200, Some(name.as_str())));
    let (status, v) = get(&gate, "/v1beta/files").await;
    assert_eq!(status, 200);
    assert_eq!(v["files"][0]["name"], name);
    let resp = client()
        .delete(gate.url(&format!("/v1beta/files/{id}")))
        .header("x-goog-api-key", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _) = get(&gate, &format!("/v1beta/files/{id}")).await;
    assert_eq!(status, 404);
}

/// Uploads `content` as `token`'s client (start, then upload and finalize): the file's name
/// and URI.
async fn upload(gate: &Gate, token: &str, content: &[u8]) -> (String, String) {
    let resp = client()
        .post(gate.url("/upload/v1beta/files"))
        .header("x-goog-api-key", token)
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("x-goog-upload-header-content-type", "text/plain")
        .json(&json!({ "file": { "display_name": "notes" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let url = resp.headers()["x-goog-upload-url"]
        .to_str()
        .unwrap()
        .to_owned();
    let resp = client()
        .post(&url)
        .header("x-goog-upload-command", "upload, finalize")
        .header("x-goog-upload-offset", "0")
        .body(content.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    (
        file["file"]["name"].as_str().unwrap().to_owned(),
        file["file"]["uri"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_client_sees_and_uses_only_its_own_files() {
    let fake = fake().await;
    let gate = gate()
        .upstream(&fake, &["good-1", "good-2"])
        .env("ALLOWED_TOKENS", r#"["sk-alice", "sk-bob"]"#)
        .admin()
        .start()
        .await;
    let (alices, alices_uri) = upload(&gate, "sk-alice", b"alice's notes").await;
    let (bobs, _) = upload(&gate, "sk-bob", b"bob's notes").await;
    let alices_id = alices.trim_start_matches("files/");

    let (status, v) = get_as(&gate, "sk-bob", "/v1beta/files").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [bobs.as_str()], "bob lists only his file");

    // Bob cannot read, use or delete Alice's file; Google is not even asked.
    let before = fake.state.total_requests();
    let (status, _) = get_as(&gate, "sk-bob", &format!("/v1beta/files/{alices_id}")).await;
    assert_eq!(status, 404);
    let resp = client()
        .delete(gate.url(&format!("/v1beta/files/{alices_id}")))
        .header("x-goog-api-key", "sk-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let use_it = json!({ "contents": [{ "role": "user", "parts": [
        { "fileData": { "fileUri": alices_uri, "mimeType": "text/plain" } }
    ] }] });
    let (status, ..) = post_as(&gate, "sk-bob", GENERATE, &use_it).await;
    assert_eq!(status, 404);
    // Named elsewhere in a request, or by its short name, it is still Alice's.
    let counted = json!({ "generateContentRequest": use_it });
    let count = "/v1beta/models/gemini-2.5-flash:countTokens";
    assert_eq!(post_as(&gate, "sk-bob", count, &counted).await.0, 404);
    let short = json!({ "contents": [{ "role": "user", "parts": [
        { "fileData": { "fileUri": alices, "mimeType": "text/plain" } }
    ] }] });
    assert_eq!(post_as(&gate, "sk-bob", GENERATE, &short).await.0, 404);
    let resp = client()
        .post(gate.url("/v1/chat/completions"))
        .bearer_auth("sk-bob")
        .json(
            &json!({ "model": "gemini-2.5-flash", "messages": [{ "role": "user", "content": [
            { "type": "image_url", "image_url": {
                "url": format!("https://generativelanguage.googleapis.com/v1beta/{alices}") } }
        ] }] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(fake.state.total_requests(), before, "no upstream call");

    // Alice can, on the key that holds it.
    let (status, ..) = post_as(&gate, "sk-alice", GENERATE, &use_it).await;
    assert_eq!(status, 200);
    let (status, _) = get_as(&gate, "sk-alice", &format!("/v1beta/files/{alices_id}")).await;
    assert_eq!(status, 200);

    // The admin sees both, with their owners (named by a hash of the token, never the token).
    let (status, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/resources?kind=files",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let owners: Vec<&str> = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["client"].as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 2);
    assert!(owners.iter().all(|o| o.starts_with("token-")), "{v}");
    assert!(!v.to_string().contains("sk-alice"), "{v}");
}

#[tokio::test]
async fn upload_urls_point_at_this_gateway_whatever_host_a_client_claims() {
    let fake = fake().await;
    let start = |gate: &Gate, host: &'static str, proto: Option<&'static str>| {
        let mut req = client()
            .post(gate.url("/upload/v1beta/files"))
            .header("x-goog-api-key", TOKEN)
            .header("host", host)
            .header("x-goog-upload-protocol", "resumable")
            .header("x-goog-upload-command", "start");
        if let Some(p) = proto {
            req = req.header("x-forwarded-proto", p);
        }
        req.json(&json!({ "file": {} })).send()
    };
    let url_of = |resp: reqwest::Response| {
        resp.headers()["x-goog-upload-url"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let direct = gate().upstream(&fake, &["good-1"]).start().await;
    let url = url_of(start(&direct, "evil.example", Some("https")).await.unwrap());
    assert!(
        url.starts_with(&format!("http://{}/upload/v1beta/files?", direct.addr)),
        "a forged Host and an untrusted X-Forwarded-Proto are ignored: {url}"
    );

    let public = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_PUBLIC_URL", "https://gemini.example.com/gw")
        .start()
        .await;
    let url = url_of(start(&public, "evil.example", None).await.unwrap());
    assert!(
        url.starts_with("https://gemini.example.com/gw/upload/v1beta/files?upload_id="),
        "{url}"
    );

    let proxied = gate()
        .upstream(&fake, &["good-1"])
        .env("GEMGATE_TRUSTED_PROXIES", "127.0.0.0/8")
        .start()
        .await;
    let url = url_of(start(&proxied, "localhost", Some("https")).await.unwrap());
    assert!(url.starts_with("https://localhost/upload/"), "{url}");
}

#[tokio::test]
async fn files_recorded_before_owners_were_kept_are_the_admins_alone() {
    let fake = fake().await;
    let mut gate = gate().upstream(&fake, &["good-1"]).admin().start().await;
    let (name, uri) = upload(&gate, TOKEN, b"notes").await;
    let id = name.trim_start_matches("files/").to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    gate.signal("TERM");
    gate.wait_exit(std::time::Duration::from_secs(10)).await;
    // Rewrite the record as an older gemgate wrote it: key and expiry, no client.
    {
        use redb::ReadableTable;
        let db = redb::Database::open(gate.dir.path().join("data/gemgate.redb")).unwrap();
        let files: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("files");
        let tx = db.begin_write().unwrap();
        {
            let mut table = tx.open_table(files).unwrap();
            let old = table.get(id.as_str()).unwrap().unwrap().value().to_owned();
            let mut parts = old.split('|');
            let legacy = format!("{}|{}", parts.next().unwrap(), parts.next().unwrap());
            table.insert(id.as_str(), legacy.as_str()).unwrap();
        }
        tx.commit().unwrap();
    }
    gate.start_again().await;
    let (status, _) = get(&gate, &format!("/v1beta/files/{id}")).await;
    assert_eq!(status, 404, "no client owns it");
    let (_, v) = get(&gate, "/v1beta/files").await;
    assert_eq!(v["files"], json!([]));
    let body = json!({ "contents": [{ "role": "user", "parts": [
        { "fileData": { "fileUri": uri, "mimeType": "text/plain" } }
    ] }] });
    assert_eq!(post(&gate, GENERATE, &body).await.0, 404);
    let (_, v) = admin(
        reqwest::Method::GET,
        &gate,
        "/admin/api/resources?kind=files",
        None,
    )
    .await;
    assert_eq!(v["resources"][0]["id"], name.as_str());
    assert_eq!(v["resources"][0]["client"], Value::Null);
}
