//! Changes to the key set written back to the config file, keeping its comments and layout, so
//! the file stays the source of truth and the change takes the normal reload path.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, Value};

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
            let listed = entry_secret(v);
            !secrets.iter().any(|s| s == listed)
        });
        removed = before - keys.len();
        Ok(())
    })?;
    Ok((text, removed))
}

/// The key an entry of `[keys] api_keys` lists (a string, or a table's `key`), trimmed.
fn entry_secret(v: &Value) -> &str {
    match v {
        Value::String(s) => s.value().trim(),
        Value::InlineTable(t) => t
            .get("key")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim(),
        _ => "",
    }
}

/// Where a key belongs: its Cloud project and the project's quota tier (`None`: not set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPlace {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

impl KeyPlace {
    /// The place an entry of `[keys] api_keys` gives (an empty name is none, as the config
    /// reads it).
    fn of_entry(v: &Value) -> KeyPlace {
        let field = |name: &str| match v {
            Value::InlineTable(t) => t
                .get(name)
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            _ => None,
        };
        KeyPlace {
            project: field("project"),
            tier: field("tier"),
        }
    }
}

/// The place of key `secret` in `[keys] api_keys`, or `None` when the list does not have it.
pub fn key_place(text: &str, secret: &str) -> Result<Option<KeyPlace>, String> {
    Ok(listed_places(&parse_table(text)?).remove(secret))
}

/// `text` with each key of `places` put in its place in `[keys] api_keys` (`project` and
/// `tier` set, or removed when `None`), and how many entries changed. A plain entry becomes a
/// table; a table keeps its label, tags and weight. Keys the list does not have are skipped.
pub fn set_key_places(
    text: &str,
    places: &BTreeMap<String, KeyPlace>,
) -> Result<(String, usize), String> {
    let mut changed = 0;
    let new_text = edit_keys(text, |keys| {
        for entry in keys.iter_mut() {
            let secret = entry_secret(entry).to_owned();
            if let Some(place) = places.get(&secret)
                && KeyPlace::of_entry(entry) != *place
            {
                put_place(entry, &secret, place);
                changed += 1;
            }
        }
        Ok(())
    })?;
    // Nothing changed: the text stays exactly as it was.
    Ok((
        if changed == 0 {
            text.to_owned()
        } else {
            new_text
        },
        changed,
    ))
}

/// Sets `place` on one entry of `[keys] api_keys` (the key `secret`), keeping its comments.
fn put_place(entry: &mut Value, secret: &str, place: &KeyPlace) {
    let plain = matches!(entry, Value::String(_));
    if plain {
        let mut table = InlineTable::new();
        table.insert("key", Value::from(secret));
        let decor = entry.decor().clone();
        *entry = Value::InlineTable(table);
        *entry.decor_mut() = decor;
    }
    let Value::InlineTable(table) = entry else {
        return;
    };
    // The space before `}` is the last value's: whichever value is last afterwards takes it.
    let trailing = table.iter_mut().last().and_then(|(_, v)| {
        let suffix = v.decor().suffix().cloned();
        v.decor_mut().set_suffix("");
        suffix
    });
    for (field, value) in [("project", &place.project), ("tier", &place.tier)] {
        match value {
            Some(v) => {
                table.insert(field, Value::from(v.as_str()));
            }
            None => {
                table.remove(field);
            }
        }
    }
    if let Some((_, last)) = table.iter_mut().last() {
        last.decor_mut()
            .set_suffix(trailing.unwrap_or_else(|| " ".into()));
    }
    if plain {
        table.fmt();
    }
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
    /// Keys given a project or tier (or had theirs removed), by key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub key_places: BTreeMap<String, KeyPlace>,
    /// Counts the edits made: of two copies, the higher version is the newer.
    #[serde(default)]
    pub version: u64,
}

/// Sections a fleet never shares: each instance's own membership.
const INSTANCE_ONLY: &[&str] = &["cluster"];

impl FleetEdits {
    pub fn is_empty(&self) -> bool {
        self.settings.is_empty()
            && self.keys_added.is_empty()
            && self.keys_removed.is_empty()
            && self.key_places.is_empty()
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
        if !self.key_places.is_empty() {
            text = set_key_places(&text, &self.key_places)?.0;
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
            self.key_places.remove(k);
            if !self.keys_removed.contains(k) {
                self.keys_removed.push(k.clone());
            }
        }
        self.record_places(&old, &new);
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

    /// Records the keys whose project or tier an edit changed (`old` to `new`).
    fn record_places(&mut self, old: &toml::Table, new: &toml::Table) {
        let before = listed_places(old);
        for (secret, place) in listed_places(new) {
            let changed = match before.get(&secret) {
                Some(was) => *was != place,
                None => place != KeyPlace::default(),
            };
            if changed {
                self.key_places.insert(secret, place);
            }
        }
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

/// The place of every key `[keys] api_keys` lists, by key.
fn listed_places(tree: &toml::Table) -> BTreeMap<String, KeyPlace> {
    let Some(list) = tree
        .get("keys")
        .and_then(|k| k.get("api_keys"))
        .and_then(toml::Value::as_array)
    else {
        return BTreeMap::new();
    };
    let name = |t: &toml::Table, field: &str| {
        t.get(field)
            .and_then(toml::Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    list.iter()
        .filter_map(|v| match v {
            toml::Value::String(s) => Some((s.trim().to_owned(), KeyPlace::default())),
            toml::Value::Table(t) => t.get("key").and_then(toml::Value::as_str).map(|k| {
                let place = KeyPlace {
                    project: name(t, "project"),
                    tier: name(t, "tier"),
                };
                (k.trim().to_owned(), place)
            }),
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
    fn a_keys_place_is_set_and_removed_keeping_its_entry_and_the_comments() {
        let text = "# mine\n[keys]\napi_keys = [\n  # the first\n  \"k1\",\n  { key = \"k2\", label = \"two\", tags = [\"a\"], weight = 3, tier = \"free\" },\n  { key = \"k3\", weight = 2 },\n]\n";
        let place = |p: Option<&str>, t: Option<&str>| KeyPlace {
            project: p.map(str::to_owned),
            tier: t.map(str::to_owned),
        };
        let places = BTreeMap::from([
            ("k1".to_owned(), place(Some("p1"), Some("tier1"))),
            ("k2".to_owned(), place(Some("p1"), None)),
            ("k3".to_owned(), place(None, Some("free"))),
            ("absent".to_owned(), place(Some("p9"), None)),
        ]);
        let (new, changed) = set_key_places(text, &places).unwrap();
        assert_eq!(changed, 3);
        assert!(
            new.contains(r#"{ key = "k3", weight = 2, tier = "free" }"#),
            "{new}"
        );
        assert!(
            new.starts_with("# mine") && new.contains("# the first"),
            "{new}"
        );
        assert_eq!(
            key_place(&new, "k1").unwrap(),
            Some(place(Some("p1"), Some("tier1")))
        );
        assert_eq!(
            key_place(&new, "k2").unwrap(),
            Some(place(Some("p1"), None))
        );
        assert_eq!(key_place(&new, "absent").unwrap(), None);
        let tree: toml::Table = toml::from_str(&new).unwrap();
        let k2 = &tree["keys"]["api_keys"][1];
        assert_eq!(k2["label"].as_str(), Some("two"));
        assert_eq!(k2["weight"].as_integer(), Some(3));
        assert!(
            new.contains(r#"{ key = "k1", project = "p1", tier = "tier1" }"#),
            "{new}"
        );
        // The same places again change nothing, not even the layout.
        assert_eq!(set_key_places(&new, &places).unwrap(), (new.clone(), 0));
        let none = BTreeMap::from([("k2".to_owned(), KeyPlace::default())]);
        let (cleared, _) = set_key_places(&new, &none).unwrap();
        assert_eq!(
            key_place(&cleared, "k2").unwrap(),
            Some(KeyPlace::default())
        );
        assert!(
            cleared.contains(r#"{ key = "k2", label = "two", tags = ["a"], weight = 3 }"#),
            "{cleared}"
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

    #[test]
    fn fleet_edits_carry_a_keys_project_and_tier() {
        let base = "[keys]\napi_keys = [\"k-one\", { key = \"k-two\", project = \"old\" }]\n";
        let place = KeyPlace {
            project: Some("p1".into()),
            tier: Some("free".into()),
        };
        let after = set_key_places(
            base,
            &BTreeMap::from([
                ("k-one".to_owned(), place.clone()),
                ("k-two".to_owned(), KeyPlace::default()),
            ]),
        )
        .unwrap()
        .0;
        let mut edits = FleetEdits::default();
        edits.record(base, &after).unwrap();
        assert!(edits.keys_added.is_empty() && edits.settings.is_empty());
        assert_eq!(edits.key_places.len(), 2);
        // Another instance's file with the same keys gets the same places.
        let other = "# other\n[keys]\napi_keys = [\"k-two\", \"k-one\"]\n";
        let laid = edits.apply(other).unwrap();
        assert_eq!(key_place(&laid, "k-one").unwrap(), Some(place));
        assert_eq!(
            key_place(&laid, "k-two").unwrap(),
            Some(KeyPlace::default())
        );
        assert_eq!(edits.apply(&laid).unwrap(), laid);
        // A key removed later takes its place with it.
        let removed = remove_keys(&laid, &["k-one".to_owned()]).unwrap().0;
        edits.record(&laid, &removed).unwrap();
        assert!(!edits.key_places.contains_key("k-one"));
        // Edits saved by an instance that knew no places still read.
        let old: FleetEdits = serde_json::from_str(
            r#"{"settings":{},"keys_added":["k"],"keys_removed":[],"version":3}"#,
        )
        .unwrap();
        assert!(old.key_places.is_empty() && old.version == 3);
    }
}
