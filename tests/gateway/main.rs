//! Integration tests over real sockets: gemgate (a child process, started as a user starts it)
//! in front of the fake Gemini upstream (in-process), both on loopback.

mod admin;
mod authoring;
mod browser;
mod caches;
mod common;
mod egress;
mod files;
mod first_run;
mod fleet;
mod hardening;
mod http2;
mod keys;
mod metrics;
mod openai;
mod pages;
mod plugins;
mod protocols;
mod proxying;
mod quota;
mod reload;
mod sdk;
mod simulation;
mod state;
mod streaming;
mod surfaces;
