//! Changes to the key set written back to the config file, keeping its comments and layout, so
//! the file stays the source of truth and the change takes the normal reload path.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml_edit::{Array, DocumentMut, Item, Table, Value};

/// Finds API keys in free text: `AIzaSy` + 33 characters, and the newer `AQ.` keys; each once,
/// in order.
pub fn find_keys(text: &str) -> Vec<String> {
    let pattern = regex::Regex::new(r"AIzaSy[A-Za-z0-9_\-]{33}|AQ\.[A-Za-z0-9_\-]{20,}")
        .expect("a valid pattern");
    let mut out: Vec<String> = Vec::new();
    for m in pattern.find_iter(text) {
        if !out.iter().any(|k| k == m.as_str()) {
            out.push(m.as_str().to_owned());
        }
    }
    out
}

/// `text` with `secrets` appended to `[keys] api_keys`.
pub fn add_keys(text: &str, secrets: &[String]) -> Result<String, String> {
    edit_keys(text, |keys| {
        for s in secrets {
            keys.push(s.as_str());
        }
        Ok(())
    })
}

/// `text` without `secrets` in `[keys] api_keys`, and how many it listed.
pub fn remove_keys(text: &str, secrets: &[String]) -> Result<(String, usize), String> {
    let mut removed = 0;
    let text = edit_keys(text, |keys| {
        let before = keys.len();
        keys.retain(|v| {
            let listed = match v {
                Value::String(s) => s.value().trim(),
                Value::InlineTable(t) => t
                    .get("key")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .trim(),
                _ => "",
            };
            !secrets.iter().any(|s| s == listed)
        });
        removed = before - keys.len();
        Ok(())
    })?;
    Ok((text, removed))
}

/// Admin edits made in a fleet: kept in Redis and laid over every instance's own config file,
/// which stays its base (a fleet's instances may differ in what the fleet does not set).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetEdits {
    /// `section.field` set (`Some`) or reset to its default (`None`).
    pub settings: BTreeMap<String, Option<toml::Value>>,
    /// Keys added, in order.
    pub keys_added: Vec<String>,
    pub keys_removed: Vec<String>,
    /// Counts the edits made: of two copies, the higher version is the newer.
    #[serde(default)]
    pub version: u64,
}

/// Sections a fleet never shares: each instance's own membership.
const INSTANCE_ONLY: &[&str] = &["cluster"];

impl FleetEdits {
    pub fn is_empty(&self) -> bool {
        self.settings.is_empty() && self.keys_added.is_empty() && self.keys_removed.is_empty()
    }

    /// `text` with these edits made.
    pub fn apply(&self, text: &str) -> Result<String, String> {
        if self.is_empty() {
            return Ok(text.to_owned());
        }
        let mut text = remove_keys(text, &self.keys_removed)?.0;
        let listed = listed_keys(&parse_table(&text)?);
        let missing: Vec<String> = self
            .keys_added
            .iter()
            .filter(|k| !listed.contains(k))
            .cloned()
            .collect();
        if !missing.is_empty() {
            text = add_keys(&text, &missing)?;
        }
        for (path, value) in &self.settings {
            text = set_setting(&text, path, value.as_ref())?;
        }
        Ok(text)
    }

    /// Records what one edit did: it was given `before` and made `after`.
    pub fn record(&mut self, before: &str, after: &str) -> Result<(), String> {
        let (old, new) = (parse_table(before)?, parse_table(after)?);
        let (old_keys, new_keys) = (listed_keys(&old), listed_keys(&new));
        for k in new_keys.iter().filter(|k| !old_keys.contains(k)) {
            self.keys_removed.retain(|r| r != k);
            if !self.keys_added.contains(k) {
                self.keys_added.push(k.clone());
            }
        }
        for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
            self.keys_added.retain(|a| a != k);
            if !self.keys_removed.contains(k) {
                self.keys_removed.push(k.clone());
            }
        }
        let sections = old
            .keys()
            .chain(new.keys())
            .collect::<std::collections::BTreeSet<_>>();
        for section in sections {
            if INSTANCE_ONLY.contains(&section.as_str()) {
                continue;
            }
            let table = |t: &toml::Table| t.get(section).and_then(toml::Value::as_table).cloned();
            let (a, b) = (
                table(&old).unwrap_or_default(),
                table(&new).unwrap_or_default(),
            );
            let fields = a
                .keys()
                .chain(b.keys())
                .collect::<std::collections::BTreeSet<_>>();
            for field in fields {
                if section == "keys" && field == "api_keys" {
                    continue;
                }
                if a.get(field) != b.get(field) {
                    self.settings
                        .insert(format!("{section}.{field}"), b.get(field).cloned());
                }
            }
        }
        Ok(())
    }
}

fn parse_table(text: &str) -> Result<toml::Table, String> {
    toml::from_str(text).map_err(|e| format!("cannot read the config: {e}"))
}

/// The secrets `[keys] api_keys` lists (plain strings or `{ key = … }` tables).
fn listed_keys(tree: &toml::Table) -> Vec<String> {
    let Some(list) = tree
        .get("keys")
        .and_then(|k| k.get("api_keys"))
        .and_then(toml::Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|v| match v {
            toml::Value::String(s) => Some(s.trim().to_owned()),
            toml::Value::Table(t) => t
                .get("key")
                .and_then(toml::Value::as_str)
                .map(|s| s.trim().to_owned()),
            _ => None,
        })
        .collect()
}

/// The text of the config file at `path`, or the shipped defaults when there is none yet.
pub fn read_or_defaults(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(super::EMBEDDED_DEFAULTS.to_owned())
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Sets (`Some`) or removes (`None`: back to the default) `section.field` in config `text`,
/// keeping its comments and layout.
pub fn set_setting(text: &str, path: &str, value: Option<&toml::Value>) -> Result<String, String> {
    let (section, field) = path.split_once('.').ok_or("a setting is section.field")?;
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| format!("cannot edit the config: {e}"))?;
    let table = doc
        .entry(section)
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_like_mut()
        .ok_or_else(|| format!("[{section}] is not a table"))?;
    match value {
        None => {
            table.remove(field);
        }
        Some(v) => {
            let parsed: Value = v
                .to_string()
                .parse()
                .map_err(|e| format!("{path}: cannot write this value: {e}"))?;
            table.insert(field, Item::Value(parsed));
        }
    }
    Ok(doc.to_string())
}

/// `text` with `change` made to its `[keys] api_keys` list (made when missing); comments and
/// the other entries stay as they are.
fn edit_keys(
    text: &str,
    change: impl FnOnce(&mut Array) -> Result<(), String>,
) -> Result<String, String> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| format!("cannot edit the config file: {e}"))?;
    let keys = doc
        .entry("keys")
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_like_mut()
        .ok_or("[keys] is not a table")?;
    let list = keys
        .entry("api_keys")
        .or_insert(Item::Value(Value::Array(Array::new())))
        .as_array_mut()
        .ok_or("keys.api_keys is not a list")?;
    change(list)?;
    list.set_trailing_comma(true);
    Ok(doc.to_string())
}

/// Replaces the file at `path` with `text` so that readers (and the reload watcher) never see
/// half a file and a crash never leaves one: written to a new temporary file beside it (created
/// exclusively, with the old file's mode, or 0600 for a new one: it holds keys and tokens),
/// flushed to disk, renamed over `path`, and the folder flushed so the rename lasts.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mode = file_mode(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tmp, mut file) = (0..8)
        .find_map(|_| {
            let mut random = [0u8; 8];
            getrandom::getrandom(&mut random).ok()?;
            let tag: String = random.iter().map(|b| format!("{b:02x}")).collect();
            let tmp = dir.join(format!(".{name}.{tag}.tmp"));
            let file = exclusive(&tmp, mode).ok()?;
            Some((tmp, file))
        })
        .ok_or_else(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot replace {}: {e}", path.display()));
    }
    // The rename is in the folder: flush it too. (A folder cannot be opened to sync on every
    // system; the file is in place either way.)
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The mode of the file at `path`, or 0600 for a new file.
fn file_mode(path: &Path) -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            return meta.permissions().mode() & 0o7777;
        }
    }
    let _ = path;
    0o600
}

/// A new file at `path` with `mode`; an error if anything is there already.
fn exclusive(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(mode);
        let file = options.open(path)?;
        // The umask may have taken bits away: the mode is the old file's, exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        options.open(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_in_free_text() {
        let a = format!("AIzaSy{}", "A".repeat(33));
        let b = format!("AQ.{}", "b".repeat(30));
        let text = format!("first {a}, then\n{b} and {a} again; AIzaSyshort");
        assert_eq!(find_keys(&text), vec![a, b]);
    }

    #[test]
    #[cfg(unix)]
    fn rewrites_keep_the_files_mode_and_new_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let new = dir.path().join("conf/new.toml");
        write_atomic(&new, "a = 1\n").unwrap();
        assert_eq!(mode(&new), 0o600);
        let shared = dir.path().join("shared.toml");
        std::fs::write(&shared, "a = 1\n").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&shared, "a = 2\n").unwrap();
        assert_eq!(mode(&shared), 0o640);
        assert_eq!(std::fs::read_to_string(&shared).unwrap(), "a = 2\n");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "no temporary file is left: {left:?}");
    }

    #[test]
    fn edits_keep_comments_and_other_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gemgate.toml");
        std::fs::write(
            &path,
            "# my gateway\n[keys]\n# the keys\napi_keys = [\"k1\", { key = \"k2\", label = \"two\" }]\nmax_failures = 5\n",
        )
        .unwrap();
        let text = read_or_defaults(&path).unwrap();
        let text = add_keys(&text, &["k3".into()]).unwrap();
        let (text, removed) = remove_keys(&text, &["k2".to_owned()]).unwrap();
        assert_eq!(removed, 1);
        let (text, removed) = remove_keys(&text, &["nope".to_owned()]).unwrap();
        assert_eq!(removed, 0);
        assert!(
            text.contains("# my gateway") && text.contains("# the keys"),
            "{text}"
        );
        assert!(text.contains("max_failures = 5"));
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed["keys"]["api_keys"],
            toml::Value::Array(vec!["k1".into(), "k3".into()])
        );
    }

    #[test]
    fn fleet_edits_record_what_an_edit_did_and_lay_it_over_another_file() {
        let a = "[keys]\napi_keys = [\"k-one\", \"k-two\"]\n[upstream]\nmax_retries = 3\n[cluster]\nname = \"a\"\n";
        let mut edits = FleetEdits::default();
        let after = add_keys(a, &["k-new".to_owned()]).unwrap();
        let after = remove_keys(&after, &["k-one".to_owned()]).unwrap().0;
        let after = set_setting(
            &after,
            "upstream.max_retries",
            Some(&toml::Value::Integer(7)),
        )
        .unwrap();
        let after =
            set_setting(&after, "upstream.timeout_s", Some(&toml::Value::Integer(9))).unwrap();
        let after = set_setting(&after, "cluster.name", Some(&"b".into())).unwrap();
        edits.record(a, &after).unwrap();
        assert_eq!(edits.keys_added, ["k-new"]);
        assert_eq!(edits.keys_removed, ["k-one"]);
        assert_eq!(
            edits.settings.keys().collect::<Vec<_>>(),
            ["upstream.max_retries", "upstream.timeout_s"],
            "an instance's own membership is never the fleet's"
        );
        // Another instance's file, with its own comments and keys.
        let other = "# mine\n[keys]\napi_keys = [\"k-one\", \"k-mine\"]\n";
        let laid = edits.apply(other).unwrap();
        assert!(laid.starts_with("# mine"), "{laid}");
        let tree: toml::Table = toml::from_str(&laid).unwrap();
        assert_eq!(listed_keys(&tree), ["k-mine", "k-new"]);
        assert_eq!(tree["upstream"]["max_retries"].as_integer(), Some(7));
        // Applying twice changes nothing more; undoing an edit records the undo.
        assert_eq!(edits.apply(&laid).unwrap(), laid);
        let undone = remove_keys(&laid, &["k-new".to_owned()]).unwrap().0;
        let undone = set_setting(&undone, "upstream.timeout_s", None).unwrap();
        edits.record(&laid, &undone).unwrap();
        assert!(edits.keys_added.is_empty());
        assert_eq!(edits.keys_removed, ["k-one", "k-new"]);
        assert_eq!(edits.settings["upstream.timeout_s"], None);
        assert!(
            !FleetEdits::default()
                .apply(other)
                .unwrap()
                .contains("k-new")
        );
    }
}
