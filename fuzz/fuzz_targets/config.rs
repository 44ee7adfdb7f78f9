#![no_main]

// The check itself lives in ../checks.rs, shared with the regression test tests/fuzz_corpus.rs.
#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config(data));
