//! What the fake's integration tests share: HTTP/1.1 calls on loopback over a plain socket.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 call on a fresh connection: the status and the raw body.
pub async fn raw_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let key = key.map_or(String::new(), |k| format!("x-goog-api-key: {k}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{key}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The same, with the JSON body (`Null` if none).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let (status, body) = raw_call(addr, method, path, key, body).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A response as [`exchange`] read it.
#[allow(dead_code)]
pub struct Exchanged {
    pub status: u16,
    /// The head's header lines, lowercase names.
    pub headers: Vec<(String, String)>,
    /// The body, chunked transfer coding undone.
    pub body: String,
    /// Whether the body ended as HTTP says it should (the last chunk of a chunked body);
    /// false if the connection broke off.
    pub complete: bool,
}

#[allow(dead_code)]
impl Exchanged {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 call on a fresh connection with extra header lines; reads until the server
/// closes the connection, tolerating a reset.
#[allow(dead_code)]
pub async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Exchanged {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let response = String::from_utf8(response).unwrap();
    let (head, raw) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let (body, complete) = if chunked {
        dechunk(raw)
    } else {
        (raw.to_owned(), true)
    };
    Exchanged {
        status,
        headers,
        body,
        complete,
    }
}

/// Undoes chunked transfer coding: the data, and whether the last (empty) chunk came.
fn dechunk(mut raw: &str) -> (String, bool) {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = raw.split_once("\r\n") else {
            return (out, false);
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return (out, false);
        };
        if size == 0 {
            return (out, true);
        }
        let Some(data) = rest.get(..size) else {
            out.push_str(rest);
            return (out, false);
        };
        out.push_str(data);
        raw = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
}
