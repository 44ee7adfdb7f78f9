//! The calls of the APIs gemgate proxies, as routing finds them in a path (`server::route`).

use http::Method;

/// Longest model, action or resource name in a path.
pub const MAX_NAME: usize = 128;

/// A method on one resource, named in its path after the id (`/cancel`, `:cancel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// The resource (or the collection) itself.
    None,
    Cancel,
}

/// A Gemini-native call, with the path prefix (`/v1beta` or `/gemini/v1beta`) removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NativeCall {
    /// `GET models`
    ListModels,
    /// `GET models/{model}`
    GetModel { model: String },
    /// `POST models/{model}:{action}`
    Action { model: String, action: String },
}

impl NativeCall {
    pub fn model(&self) -> &str {
        match self {
            NativeCall::ListModels => "",
            NativeCall::GetModel { model } | NativeCall::Action { model, .. } => model,
        }
    }

    /// Whether the answer is a stream of events.
    pub fn is_stream(&self) -> bool {
        matches!(self, NativeCall::Action { action, .. } if action == "streamGenerateContent")
    }

    pub fn method(&self) -> Method {
        match self {
            NativeCall::ListModels | NativeCall::GetModel { .. } => Method::GET,
            NativeCall::Action { .. } => Method::POST,
        }
    }

    /// The action's name, for logs (`models.list`, `generateContent`, …).
    pub fn action(&self) -> &str {
        match self {
            NativeCall::ListModels => "models.list",
            NativeCall::GetModel { .. } => "models.get",
            NativeCall::Action { action, .. } => action,
        }
    }
}

/// A route of Anthropic's Messages API, which gemgate translates (`/v1/messages…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnthropicCall {
    Messages,
    CountTokens,
}

impl AnthropicCall {
    pub fn action(self) -> &'static str {
        match self {
            AnthropicCall::Messages => "messages",
            AnthropicCall::CountTokens => "messages.count_tokens",
        }
    }
}

/// A route of the OpenAI-compatible API gemgate translates (`/v1`, `/hf/v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiCall {
    Chat,
    Models,
    Embeddings,
    Images,
    Speech,
}

impl OpenAiCall {
    pub fn method(self) -> Method {
        match self {
            OpenAiCall::Models => Method::GET,
            OpenAiCall::Chat | OpenAiCall::Embeddings | OpenAiCall::Images | OpenAiCall::Speech => {
                Method::POST
            }
        }
    }

    pub fn action(self) -> &'static str {
        match self {
            OpenAiCall::Chat => "chat.completions",
            OpenAiCall::Models => "models.list",
            OpenAiCall::Embeddings => "embeddings",
            OpenAiCall::Images => "images.generations",
            OpenAiCall::Speech => "audio.speech",
        }
    }
}
