//! `POST /v1/images/generations` → Imagen `:predict`, and the image hosts that turn generated
//! images into URLs.

use serde_json::{Value, json};

use super::BadRequest;

/// A translated image request.
#[derive(Debug)]
pub struct ImageCall {
    pub model: String,
    pub body: Value,
    /// `response_format: "url"`: upload the images and answer with their URLs.
    pub want_url: bool,
}

/// `default_model` is `CREATE_IMAGE_MODEL`; a request may name another Imagen model.
pub fn request(body: &Value, default_model: &str) -> Result<ImageCall, BadRequest> {
    let prompt = body
        .get("prompt")
        .and_then(Value::as_str)
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| BadRequest::new("prompt", "`prompt` is required"))?;
    let model = match body.get("model").and_then(Value::as_str) {
        Some(m) if m.starts_with("imagen") => super::model_of(body)?,
        _ => default_model.to_owned(),
    };
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=4).contains(n))
            .ok_or_else(|| BadRequest::new("n", "must be an integer from 1 to 4"))?,
    };
    let aspect = match body.get("size").and_then(Value::as_str) {
        None | Some("1024x1024") => "1:1",
        Some("1792x1024") => "16:9",
        Some("1024x1792") => "9:16",
        Some(other) => {
            return Err(BadRequest::new(
                "size",
                format!("{other:?} is not one of 1024x1024, 1792x1024, 1024x1792"),
            ));
        }
    };
    let want_url = match body.get("response_format").and_then(Value::as_str) {
        None | Some("url") => true,
        Some("b64_json") => false,
        Some(other) => {
            return Err(BadRequest::new(
                "response_format",
                format!("{other:?} is not url or b64_json"),
            ));
        }
    };
    Ok(ImageCall {
        model,
        want_url,
        body: json!({
            "instances": [{ "prompt": prompt }],
            "parameters": { "sampleCount": n, "aspectRatio": aspect },
        }),
    })
}

/// The base64 images of an Imagen answer.
pub fn images(answer: &Value) -> Vec<String> {
    answer
        .get("predictions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("bytesBase64Encoded")?.as_str().map(str::to_owned))
        .collect()
}

/// OpenAI's answer: `data` entries are `{"b64_json": …}` or `{"url": …}`.
pub fn response(created: u64, data: Vec<Value>) -> Value {
    json!({ "created": created, "data": data })
}

/// Where generated images are uploaded (`UPLOAD_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    Smms,
    Picgo,
    CloudflareImgbed,
}

impl Host {
    pub fn parse(name: &str) -> Option<Host> {
        match name.trim().to_ascii_lowercase().as_str() {
            "smms" | "sm.ms" => Some(Host::Smms),
            "picgo" => Some(Host::Picgo),
            "cloudflare_imgbed" | "cloudflare-imgbed" => Some(Host::CloudflareImgbed),
            _ => None,
        }
    }

    /// The form field the host expects the file in.
    pub fn field(self) -> &'static str {
        match self {
            Host::Smms => "smfile",
            Host::Picgo => "source",
            Host::CloudflareImgbed => "file",
        }
    }

    /// The image's URL from the host's answer; `base` is the host's upload URL.
    pub fn url(self, answer: &Value, base: &str) -> Option<String> {
        match self {
            Host::Smms => answer
                .pointer("/data/url")
                .or_else(|| answer.get("images"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            Host::Picgo => answer
                .pointer("/image/url")
                .and_then(Value::as_str)
                .map(str::to_owned),
            Host::CloudflareImgbed => {
                let src = answer.pointer("/0/src")?.as_str()?;
                if src.starts_with("http://") || src.starts_with("https://") {
                    return Some(src.to_owned());
                }
                // `src` is a path on the host's origin.
                let scheme_end = base.find("://")? + 3;
                let origin_end = base[scheme_end..]
                    .find('/')
                    .map_or(base.len(), |i| scheme_end + i);
                Some(format!("{}{src}", &base[..origin_end]))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts() {
        let call = request(
            &json!({ "prompt": "a cat", "n": 2, "size": "1792x1024", "response_format": "b64_json" }),
            "imagen-3.0-generate-002",
        )
        .unwrap();
        assert_eq!(call.model, "imagen-3.0-generate-002");
        assert_eq!(
            call.body["parameters"],
            json!({ "sampleCount": 2, "aspectRatio": "16:9" })
        );
        assert!(!call.want_url);
        let e = request(&json!({ "prompt": "x", "size": "10x10" }), "m").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("size"));
    }

    #[test]
    fn hosts_answer_in_their_own_shapes() {
        assert_eq!(
            Host::Smms.url(&json!({ "data": { "url": "https://i/x.png" } }), ""),
            Some("https://i/x.png".into())
        );
        assert_eq!(
            Host::CloudflareImgbed.url(
                &json!([{ "src": "/file/a.png" }]),
                "https://img.example/upload?x=1"
            ),
            Some("https://img.example/file/a.png".into())
        );
    }
}
