//! The fuzz checks, one function per fuzz target.
//!
//! This file is shared: each fuzz target in `fuzz/fuzz_targets/` and the regression test
//! `tests/fuzz_corpus.rs` include it with `#[path]`, so the corpus is replayed by `cargo test`
//! through exactly the code the fuzzer ran. It may use only `gemgate`, `serde_json` and `bytes`
//! (the dependencies both builds have).
//!
//! Every check must never panic on any input; the `assert!`s below are invariants read from the
//! code under test.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::Value;

use gemgate::keys::taxonomy::ErrorClass;
use gemgate::translate::openai::chat::{self, ChatStream, Options, Pacing};

/// OpenAI → Gemini (`chat::request`), and Gemini → OpenAI (`chat::response`, `ChatStream`).
pub fn translate(data: &[u8]) {
    let all_options = Options {
        show_thinking: true,
        show_search_link: true,
    };
    if let Ok(value) = serde_json::from_slice::<Value>(data) {
        if let Ok(mut call) = chat::request(&value) {
            assert!(!call.model.is_empty(), "an accepted request names a model");
            let contents = call.body.get("contents").and_then(Value::as_array);
            assert!(
                contents.is_some_and(|c| !c.is_empty()),
                "an accepted request has contents: {}",
                call.body
            );
            let remote = chat::remote_files(&call.body);
            let fetched = remote
                .iter()
                .map(|_| ("image/png".to_owned(), "AAAA".to_owned()))
                .collect();
            chat::inline_files(&mut call.body, fetched);
            assert!(chat::remote_files(&call.body).is_empty());
        }
        let _ = chat::response(&value, "m", "id", 0, Options::default());
        let _ = chat::response(&value, "m", "id", 0, all_options);

        // The same JSON as one SSE event, so stream translation sees every mutation of it.
        let mut stream = ChatStream::new("m", "id", 0, true, all_options);
        let event = format!("data: {value}\n\n");
        check_events(&stream.push(event.as_bytes()));
        check_stream_end(&stream.finish());

        let pacing = Pacing {
            min_delay: std::time::Duration::ZERO,
            max_delay: std::time::Duration::from_millis(3),
            short_text: 3,
            long_text: 12,
            chunk_size: 5,
        };
        let mut paced =
            ChatStream::new("m", "id", 0, false, Options::default()).paced(Some(pacing));
        for piece in paced.push_paced(event.as_bytes()) {
            check_events(&piece.event);
        }
        check_stream_end(&paced.finish());
    }

    // The raw bytes as an upstream SSE stream.
    let mut stream = ChatStream::new("m", "id", 0, true, Options::default());
    check_events(&stream.push(data));
    check_stream_end(&stream.finish());
}

/// Translated stream output is whole `data: <JSON>` events.
fn check_events(out: &str) {
    for event in out.split_terminator("\n\n") {
        let json = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
        if json != "[DONE]" {
            assert!(
                serde_json::from_str::<Value>(json).is_ok(),
                "event is not JSON: {json:?}"
            );
        }
    }
    assert!(out.is_empty() || out.ends_with("\n\n"), "{out:?}");
}

fn check_stream_end(out: &str) {
    check_events(out);
    assert!(out.ends_with("data: [DONE]\n\n"), "{out:?}");
}

/// `EventFramer`: the input is cut into chunks at points the fuzzer chooses.
///
/// Layout: byte 0 is the number of cuts (mod 16); the next that many bytes are the lengths of
/// the first chunks; the rest is the stream, and its remainder is the last chunk.
pub fn sse(data: &[u8]) {
    use gemgate::http::sse::EventFramer;

    let (cuts, rest) = match data.split_first() {
        Some((&n, rest)) => {
            let n = usize::from(n % 16).min(rest.len());
            rest.split_at(n)
        }
        None => (&[][..], data),
    };
    let stream = rest;
    let mut chunks = Vec::new();
    let mut at = 0;
    for &len in cuts {
        let end = (at + usize::from(len)).min(stream.len());
        chunks.push(&stream[at..end]);
        at = end;
    }
    chunks.push(&stream[at..]);

    let mut framer = EventFramer::default();
    let mut out = Vec::with_capacity(stream.len());
    for chunk in chunks {
        let ready = framer.push(Bytes::copy_from_slice(chunk));
        // A blank line ends an event: `\n\n`, `\r\n\r\n`, and also `\n\r\n` (a line ended by LF,
        // then an empty line ended by CRLF), which the SSE grammar allows and the framer takes.
        assert!(
            ready.is_empty() || ready.ends_with(b"\n\n") || ready.ends_with(b"\n\r\n"),
            "push returned bytes that do not end an event: {:?}",
            String::from_utf8_lossy(&ready)
        );
        out.extend_from_slice(&ready);
    }
    out.extend_from_slice(&framer.finish());
    assert!(out == stream, "the framer lost, added or reordered bytes");
}

/// `taxonomy::classify`: bytes 0–1 are the status (big-endian), the rest is the body.
pub fn classify(data: &[u8]) {
    use gemgate::keys::taxonomy;

    let (status, body) = match data {
        [a, b, body @ ..] => (u16::from_be_bytes([*a, *b]), body),
        _ => (0, data),
    };
    for status in [status, 400, 403, 429, 500] {
        let class = taxonomy::classify(status, body);
        let _ = (class.as_str(), class.retryable(), class.verdict());
        if let ErrorClass::RateLimited { retry_after } = class {
            assert!(
                retry_after <= std::time::Duration::from_secs(86_400),
                "a retry delay is capped at a day: {retry_after:?}"
            );
        }
        if status >= 500 {
            assert_eq!(class, ErrorClass::Upstream, "status {status}");
        }
    }
}

/// Paths, query strings and timestamps: `route`, `parse_row`, `credential`, `query_param`,
/// `parse_rfc3339`, all on the same string.
pub fn route(data: &[u8]) {
    use gemgate::clock;
    use gemgate::{http::auth, server::route};

    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for flag in [false, true] {
        if let route::Route::Native(call) = route::route(s, flag) {
            let _ = (call.model(), call.is_stream(), call.method(), call.action());
        }
    }
    let _ = gemgate::admin::parse_row(s);
    let key = auth::query_param(s, "key");
    assert_eq!(auth::credential(Some(s), None, None), key);
    let _ = auth::query_param(s, "alt");
    if let Some(ms) = clock::parse_rfc3339(s) {
        let shown = clock::rfc3339(ms);
        assert_eq!(
            clock::parse_rfc3339(&shown),
            Some(ms),
            "{s:?} → {ms} → {shown:?}"
        );
    }
}

/// Environment variables the config check can set, chosen by a byte. The first seven are the
/// ones that convert strings to numbers, lists and JSON.
const CONFIG_VARS: &[&str] = &[
    "MAX_RETRIES",
    "TIME_OUT",
    "API_KEYS",
    "STREAM_MIN_DELAY",
    "CHECK_INTERVAL_HOURS",
    "THINKING_BUDGET_MAP",
    "CUSTOM_HEADERS",
    "ALLOWED_TOKENS",
    "BASE_URL",
    "PROXIES",
    "LOG_LEVEL",
    "GEMGATE_LISTEN",
    "SAFETY_SETTINGS",
    "GEMGATE_MAX_BODY_BYTES",
    "FAKE_STREAM_EMPTY_DATA_INTERVAL_SECONDS",
];

/// `config::from_str`: the input up to the first NUL is the TOML text; each NUL-separated
/// piece after it sets one variable: its first byte picks the name from [`CONFIG_VARS`], the
/// rest is the value.
pub fn config(data: &[u8]) {
    let mut pieces = data.split(|&b| b == 0);
    let text = String::from_utf8_lossy(pieces.next().unwrap_or_default());
    let mut vars = BTreeMap::new();
    for piece in pieces {
        if let Some((&pick, value)) = piece.split_first() {
            let name = CONFIG_VARS[usize::from(pick) % CONFIG_VARS.len()];
            vars.insert(name.to_owned(), String::from_utf8_lossy(value).into_owned());
        }
    }
    if let Ok(config) = gemgate::config::from_str(&text, "fuzz", &vars) {
        assert!(config.max_retries >= 1);
        assert!(config.max_failures >= 1);
        let _ = format!("{config:?}");
    }
}
