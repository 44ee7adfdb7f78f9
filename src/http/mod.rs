//! Small HTTP pieces every side shares: gemgate's own error answers in each protocol's shape
//! ([`reply`]), client credentials ([`auth`]), who sent a request ([`peer`]), server-sent-event
//! framing ([`sse`]) and the gathered writer under every connection ([`wire`]).

pub mod auth;
pub mod peer;
pub mod reply;
pub mod sse;
pub mod wire;
