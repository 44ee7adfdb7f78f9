//! Replays the fuzzers' corpus through the same checks the fuzz targets run (`fuzz/checks.rs`),
//! so `cargo test` catches a regression on any input the fuzzers found interesting, and keeps
//! every crash they found failing until it is fixed.
//!
//! For target `t` it reads every file in `fuzz/corpus/t/` (the minimised corpus; at least one
//! file is required), `fuzz/seeds/t/` (hand-written seeds) and `fuzz/artifacts/t/` (minimised
//! reproducers of crashes). See `fuzz/README.md`.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&fuzz.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ has no inputs: the corpus is missing"
    );
    let mut all = corpus;
    all.extend(files(&fuzz.join("seeds").join(target)));
    all.extend(files(&fuzz.join("artifacts").join(target)));

    let mut failed = Vec::new();
    for path in &all {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            let name = path
                .strip_prefix(&fuzz)
                .unwrap_or(path)
                .display()
                .to_string();
            eprintln!("  ^ fuzz/{name}");
            failed.push(name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of fuzz target {target} panic (messages above):\n  {}",
        failed.len(),
        all.len(),
        failed.join("\n  ")
    );
}

#[test]
fn translate_corpus() {
    replay("translate", checks::translate);
}

#[test]
fn sse_corpus() {
    replay("sse", checks::sse);
}

#[test]
fn classify_corpus() {
    replay("classify", checks::classify);
}

#[test]
fn route_corpus() {
    replay("route", checks::route);
}

#[test]
fn config_corpus() {
    replay("config", checks::config);
}
