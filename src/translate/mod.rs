//! Other protocols to and from Gemini's, as pure functions over request and answer bodies:
//! no I/O, no state.

pub mod anthropic;
pub mod openai;
pub mod parts;
pub mod usage;
