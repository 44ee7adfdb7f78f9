//! `POST /v1/audio/speech` → a Gemini TTS model's `generateContent`, answered as WAV.

use serde_json::{Value, json};

use super::BadRequest;

/// A translated speech request.
#[derive(Debug)]
pub struct SpeechCall {
    pub model: String,
    pub body: Value,
}

/// `default_model` and `default_voice` are `TTS_MODEL` and `TTS_VOICE_NAME`. OpenAI's voice
/// names (`alloy`, …) are not Gemini's: a voice is used only when it is a Gemini voice name
/// (capitalised, like `Kore`).
pub fn request(
    body: &Value,
    default_model: &str,
    default_voice: &str,
) -> Result<SpeechCall, BadRequest> {
    let input = body
        .get("input")
        .and_then(Value::as_str)
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| BadRequest::new("input", "`input` is required"))?;
    let model = match body.get("model").and_then(Value::as_str) {
        Some(m) if m.starts_with("gemini") && m.contains("tts") => super::model_of(body)?,
        _ => default_model.to_owned(),
    };
    if let Some(format) = body.get("response_format").and_then(Value::as_str)
        && format != "wav"
        && format != "pcm"
    {
        return Err(BadRequest::new(
            "response_format",
            format!("{format:?} is not available; gemgate answers wav or pcm"),
        ));
    }
    let voice = body
        .get("voice")
        .and_then(Value::as_str)
        .filter(|v| v.starts_with(|c: char| c.is_ascii_uppercase()))
        .unwrap_or(default_voice);
    Ok(SpeechCall {
        model,
        body: json!({
            "contents": [{ "role": "user", "parts": [{ "text": input }] }],
            "generationConfig": {
                "responseModalities": ["AUDIO"],
                "speechConfig": { "voiceConfig": { "prebuiltVoiceConfig": { "voiceName": voice } } },
            },
        }),
    })
}

/// The audio of a TTS answer: base64 PCM and its sample rate (from `audio/L16;…;rate=N`).
pub fn audio(answer: &Value) -> Option<(String, u32)> {
    let data = answer
        .pointer("/candidates/0/content/parts")?
        .as_array()?
        .iter()
        .find_map(|p| p.get("inlineData"))?;
    let mime = data.get("mimeType").and_then(Value::as_str).unwrap_or("");
    let rate = mime
        .split(';')
        .find_map(|p| p.trim().strip_prefix("rate="))
        .and_then(|r| r.parse().ok())
        .unwrap_or(24_000);
    Some((data.get("data")?.as_str()?.to_owned(), rate))
}

/// 16-bit mono PCM as a WAV file.
pub fn wav(pcm: &[u8], rate: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + pcm.len());
    let data_len = pcm.len() as u32;
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes()); // bytes per second
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(pcm);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speech_requests_and_wav_files() {
        let call = request(
            &json!({ "model": "tts-1", "input": "hello", "voice": "alloy" }),
            "gemini-2.5-flash-preview-tts",
            "Zephyr",
        )
        .unwrap();
        assert_eq!(call.model, "gemini-2.5-flash-preview-tts");
        assert_eq!(
            call.body.pointer(
                "/generationConfig/speechConfig/voiceConfig/prebuiltVoiceConfig/voiceName"
            ),
            Some(&json!("Zephyr"))
        );
        let answer = json!({ "candidates": [{ "content": { "parts": [{ "inlineData": { "mimeType": "audio/L16;codec=pcm;rate=16000", "data": "AAA=" } }] } }] });
        assert_eq!(audio(&answer), Some(("AAA=".into(), 16_000)));
        let w = wav(&[0, 0, 1, 0], 16_000);
        assert_eq!(&w[..4], b"RIFF");
        assert_eq!(w.len(), 48);
        assert_eq!(u32::from_le_bytes(w[24..28].try_into().unwrap()), 16_000);
    }
}
