//! The token counts of a Gemini answer: its `usageMetadata`, found in a whole body or in
//! stream events as they pass.

/// Tokens one answer used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub output: u64,
    pub thoughts: u64,
    /// Of the prompt, the tokens served from a cache (`cachedContentTokenCount`).
    pub cached: u64,
}

/// Finds `usageMetadata` in a piece of a Gemini answer (a whole body or a stream event) and
/// reads its token counts. Gemini sends cumulative counts, so the last one seen is the answer's.
///
/// NOTE: this runs on every answer, so the object is scanned in place rather than parsed: a
/// serde parse, skipping the fields it does not want, cost 2% of the request path.
pub fn tokens_in(bytes: &[u8]) -> Option<Tokens> {
    const NAME: &[u8] = b"\"usageMetadata\"";
    // The name's `M`, found from the end by memrchr: it is rare in an answer, and the counts
    // come last, so this reads a few bytes where a substring searcher hashed the whole answer.
    const M: usize = 6;
    let mut end = bytes.len();
    while let Some(m) = memchr::memrchr(b'M', &bytes[..end]) {
        if m >= M && bytes[m - M..].starts_with(NAME) {
            return counts_of(&bytes[m - M + NAME.len()..]);
        }
        end = m;
    }
    None
}

/// The counts of the object after `: ` at the start of `bytes`; `None` unless it is a whole
/// object whose counts are whole numbers.
fn counts_of(bytes: &[u8]) -> Option<Tokens> {
    let ws = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = ws(0);
    if bytes.get(i) != Some(&b':') {
        return None;
    }
    i = ws(i + 1);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    let mut tokens = Tokens::default();
    let mut depth = 0usize;
    // At depth 1, whether the next string is a member's name.
    let mut name_next = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                let start = i + 1;
                let end = start + string_len(&bytes[start..])?;
                i = end + 1;
                if depth == 1 && name_next {
                    name_next = false;
                    let count = match &bytes[start..end] {
                        b"promptTokenCount" => &mut tokens.prompt,
                        b"candidatesTokenCount" => &mut tokens.output,
                        b"thoughtsTokenCount" => &mut tokens.thoughts,
                        b"cachedContentTokenCount" => &mut tokens.cached,
                        _ => continue,
                    };
                    i = ws(i);
                    if bytes.get(i) != Some(&b':') {
                        return None;
                    }
                    i = ws(i + 1);
                    let digits = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                    *count = std::str::from_utf8(&bytes[i..i + digits])
                        .ok()?
                        .parse()
                        .ok()?;
                    i += digits;
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                name_next = depth == 1;
            }
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(tokens);
                }
            }
            b',' => name_next = depth == 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The length of the JSON string whose opening quote precedes `bytes`, up to its closing quote.
fn string_len(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        match *bytes.get(i)? {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_from_the_last_usage_metadata() {
        let chunk = br#"data: {"candidates":[],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":5,"thoughtsTokenCount":2,"totalTokenCount":10}}

"#;
        assert_eq!(
            tokens_in(chunk),
            Some(Tokens {
                prompt: 3,
                output: 5,
                thoughts: 2,
                cached: 0,
            })
        );
        assert_eq!(tokens_in(b"data: {\"candidates\":[]}"), None);
    }

    /// What a full JSON parse of the last `usageMetadata` object reads.
    fn parsed(bytes: &[u8]) -> Option<Tokens> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Counts {
            #[serde(default)]
            prompt_token_count: u64,
            #[serde(default)]
            candidates_token_count: u64,
            #[serde(default)]
            thoughts_token_count: u64,
            #[serde(default)]
            cached_content_token_count: u64,
        }
        let at = memchr::memmem::rfind(bytes, b"\"usageMetadata\"")?;
        let rest = &bytes[at + b"\"usageMetadata\"".len()..];
        let colon = memchr::memchr(b':', rest)?;
        let mut values =
            serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Counts>();
        let c = values.next()?.ok()?;
        Some(Tokens {
            prompt: c.prompt_token_count,
            output: c.candidates_token_count,
            thoughts: c.thoughts_token_count,
            cached: c.cached_content_token_count,
        })
    }

    #[test]
    fn the_scan_reads_what_a_json_parse_reads() {
        let cases: &[&str] = &[
            r#"{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":5,"totalTokenCount":8}}"#,
            r#"{"usageMetadata" : { "promptTokenCount" : 12 , "thoughtsTokenCount":4,
                "promptTokensDetails":[{"modality":"TEXT","tokenCount":12}],
                "candidatesTokensDetails":[{"modality":"TEXT","promptTokenCount":99}],
                "note":"a \"promptTokenCount\": 7, } ] {","candidatesTokenCount":6}}"#,
            r#"{"usageMetadata":{"toolUsePromptTokenCount":9,"promptTokenCount":1}}"#,
            r#"{"usageMetadata":{"promptTokenCount":40,"cachedContentTokenCount":32,"candidatesTokenCount":2}}"#,
            r#"{"usageMetadata":{}}"#,
            r#"{"usageMetadata":{"promptTokenCount":null}}"#,
            r#"{"usageMetadata":{"promptTokenCount":"3"}}"#,
            r#"{"usageMetadata":{"promptTokenCount":-3}}"#,
            r#"{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":"#,
            r#"{"usageMetadata":{"promptTokenCount":3"#,
            r#"{"usageMetadata":7}"#,
            r#"{"usageMetadata""#,
            r#"data: {"usageMetadata":{"promptTokenCount":1}}

data: {"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":18446744073709551615}}"#,
            r#"{"usageMetadata":{"candidatesTokenCount":18446744073709551616}}"#,
            // Other `M`s, before and after the name, and one too near the start to be it.
            r#"M{"text":"Mm usageMetadataM","usageMetadata":{"promptTokenCount":4},"x":"MMusage M"}"#,
            r#""usageMetadata":{"promptTokenCount":5}"#,
            "M",
        ];
        for case in cases {
            assert_eq!(
                tokens_in(case.as_bytes()),
                parsed(case.as_bytes()),
                "{case}"
            );
        }
    }
}
