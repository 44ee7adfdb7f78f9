//! The shipped plugins, compiled into the binary: used when there is no plugins folder, so
//! gemgate behaves the same on its embedded defaults as from a checkout.

use std::path::PathBuf;

use super::PluginSource;

/// The shipped plugins and their tests, by name: `SHIPPED` and `SHIPPED_TESTS`, (name, code)
/// of every `plugins/<name>.lua` and `plugins/<name>_test.lua` (each shipped plugin has one).
macro_rules! shipped {
    ($($name:literal),* $(,)?) => {
        const SHIPPED: &[(&str, &str)] =
            &[$(($name, include_str!(concat!("../../plugins/", $name, ".lua")))),*];
        const SHIPPED_TESTS: &[(&str, &str)] = &[$((
            concat!($name, "_test"),
            include_str!(concat!("../../plugins/", $name, "_test.lua")),
        )),*];
    };
}

shipped!(
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
    built_in(SHIPPED)
}

/// The shipped plugins' tests.
pub fn tests() -> Vec<PluginSource> {
    built_in(SHIPPED_TESTS)
}

fn built_in(files: &[(&str, &str)]) -> Vec<PluginSource> {
    files
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
        let tests: Vec<String> = crate::policy::testing::test_sources(Some(&dir))
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let embedded: Vec<&str> = super::SHIPPED_TESTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(tests, embedded);
    }
}
