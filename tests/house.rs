//! The crate keeps its shape: no import cycle between top-level modules of `src/`.
//!
//! Modules follow the data flow (see README.md, "Architecture"): `server` over `proxy` and
//! `admin`, over `app`, over `policy`, `upstream`, `store`, `keys`, `config`, `translate` and
//! the small shared pieces. A cycle between two of them means a seam was cut in the wrong
//! place; this test names the files that make it.
//!
//! It reads the source as text, as `crate::` and `super::` paths (in `use` lines and in code),
//! leaving out comments and `#[cfg(test)]` modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text without comments, string literals' contents and `#[cfg(test)] mod … { … }`.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at..];
        let Some(open) = rest.find('{') else { break };
        if !rest[..open].contains("mod ") {
            // `#[cfg(test)]` on something else: keep it, and look past it.
            out.replace_range(at..at + "#[cfg(test)]".len(), "");
            continue;
        }
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(at..at + end, "");
    }
    out
}

/// The top-level modules a file's code names: `crate::x`, `crate::{x, y}`, and `super::x`
/// where `super` is the crate root.
fn named_modules(code: &str, depth: usize) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    let mut roots = vec!["crate::".to_owned()];
    // From a file `depth` folders below `src/` (a `mod.rs` counts as its folder), this many
    // `super::` reach the crate root.
    if depth > 0 {
        roots.push("super::".repeat(depth));
    }
    for root in &roots {
        let mut rest = code;
        while let Some(at) = rest.find(root.as_str()) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + root.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d::{e}}`: the first name of each item at the top level.
                let mut level = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => level += 1,
                        '}' if level == 0 => break,
                        '}' => level -= 1,
                        ',' if level == 0 => item_start = true,
                        c if item_start && !c.is_whitespace() => {
                            names.insert(ident(&group[i..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                names.insert(ident(rest));
            }
        }
    }
    names.remove("");
    names
}

/// A cycle through `start` in `edges`, as the path that closes it.
fn cycle_from(
    start: &str,
    edges: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let here = path.last().unwrap().clone();
    for next in edges.get(&here).into_iter().flatten() {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_owned());
            return Some(cycle);
        }
        if !path.contains(next) {
            path.push(next.clone());
            if let Some(cycle) = cycle_from(start, edges, path) {
                return Some(cycle);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Which file makes each edge, for the failure message.
    let mut why: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let top_level: BTreeSet<String> = files
        .iter()
        .map(|f| f.strip_prefix(&src).unwrap())
        .map(|rel| {
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            first.trim_end_matches(".rs").to_owned()
        })
        .collect();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let module = parts[0].trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let is_mod_rs = parts.last().is_some_and(|p| p == "mod.rs");
        let depth = parts.len() - usize::from(is_mod_rs);
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for named in named_modules(&code, depth) {
            if named != module && top_level.contains(&named) {
                edges
                    .entry(module.clone())
                    .or_default()
                    .insert(named.clone());
                why.entry((module.clone(), named))
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    assert!(
        edges.len() > 5,
        "the import graph was not read (only {edges:?}): the test itself is broken"
    );
    for start in edges.keys() {
        if let Some(cycle) = cycle_from(start, &edges, &mut vec![start.clone()]) {
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let files = &why[&(w[0].clone(), w[1].clone())];
                    format!(
                        "{} -> {} ({})",
                        w[0],
                        w[1],
                        files.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                })
                .collect();
            panic!(
                "top-level modules import each other in a cycle:\n  {}",
                steps.join("\n  ")
            );
        }
    }
}

/// The reader must see a cycle where there is one, or the test above could never fail.
#[test]
fn the_reader_sees_crate_and_super_paths() {
    let code = code_of(
        "use crate::{app::State, keys};\n// crate::commented\nfn f() { super::super::proxy::x(); }\n\
         #[cfg(test)]\nmod tests { use crate::hidden; }\n",
    );
    assert_eq!(
        named_modules(&code, 2),
        BTreeSet::from(["app".to_owned(), "keys".to_owned(), "proxy".to_owned()])
    );
    let edges = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert!(cycle_from("a", &edges, &mut vec!["a".to_owned()]).is_some());
}
