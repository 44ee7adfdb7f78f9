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
