//! The shipped plugins, compiled into the binary: used when there is no plugins folder, so
//! gemgate behaves the same on its embedded defaults as from a checkout.

use std::path::PathBuf;

use super::PluginSource;

macro_rules! shipped {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../plugins/", $name, ".lua")))),*]
    };
}

/// (name, code) of every plugin in `plugins/`.
const SHIPPED: &[(&str, &str)] = shipped!(
    "least_loaded",
    "model_alias",
    "model_allowlist",
    "model_filter",
    "model_suffixes",
    "rate_limit",
    "round_robin",
    "sticky_key",
    "thinking_budget",
    "weighted_tags",
);

pub fn sources() -> Vec<PluginSource> {
    SHIPPED
        .iter()
        .map(|(name, code)| PluginSource {
            name: (*name).to_owned(),
            path: PathBuf::from(format!("built-in:{name}.lua")),
            code: (*code).to_owned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// Every file in `plugins/` is compiled in, and nothing else.
    #[test]
    fn every_shipped_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
        let on_disk: Vec<String> = super::super::read_dir(&dir)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let embedded: Vec<&str> = super::SHIPPED.iter().map(|(n, _)| *n).collect();
        assert_eq!(on_disk, embedded);
    }
}
