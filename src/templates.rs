//! The admin pages' Handlebars templates: read from the templates folder (or the ones built
//! into the binary), compiled whole, part of a generation like config and plugins.

use std::path::{Path, PathBuf};

use handlebars::Handlebars;

use crate::config::Config;

/// The shipped templates, compiled in: used for every page the templates folder (if any) does
/// not override.
const SHIPPED: &[(&str, &str)] = &[
    ("layout", include_str!("../templates/layout.hbs")),
    ("login", include_str!("../templates/login.hbs")),
    ("error", include_str!("../templates/error.hbs")),
    ("dashboard", include_str!("../templates/dashboard.hbs")),
    ("keys", include_str!("../templates/keys.hbs")),
    ("settings", include_str!("../templates/settings.hbs")),
    ("logs", include_str!("../templates/logs.hbs")),
    ("log", include_str!("../templates/log.hbs")),
    ("plugins", include_str!("../templates/plugins.hbs")),
];

/// The pages' style sheet and script: (name, content type, shipped text).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "admin.css",
        "text/css; charset=utf-8",
        include_str!("../templates/admin.css"),
    ),
    (
        "admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../templates/admin.js"),
    ),
];

/// A template that failed to load or compile.
#[derive(Debug, Clone, thiserror::Error)]
#[error("template {file}: {message}")]
pub struct TemplateError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// One generation's compiled templates.
pub struct Templates {
    registry: Handlebars<'static>,
    /// The folder they came from (`None`: built in).
    pub dir: Option<PathBuf>,
    /// (name, file) of every template: the file is `built-in:<name>.hbs` for a shipped one.
    pub files: Vec<(String, String)>,
    /// (name, content type, text) of the style sheet and script.
    assets: Vec<(&'static str, &'static str, String)>,
}

impl Templates {
    /// Reads and compiles every `*.hbs` of the templates folder `config` names.
    pub fn load(config: &Config) -> Result<Templates, TemplateError> {
        let dir = config.template_dir();
        let mut sources: Vec<(String, String, String)> = SHIPPED
            .iter()
            .map(|(n, t)| {
                (
                    (*n).to_owned(),
                    format!("built-in:{n}.hbs"),
                    (*t).to_owned(),
                )
            })
            .collect();
        if let Some(d) = &dir {
            for (name, file, text) in read_dir(d)? {
                sources.retain(|(n, _, _)| *n != name);
                sources.push((name, file, text));
            }
        }
        let mut registry = Handlebars::new();
        registry.set_strict_mode(true);
        let mut files = Vec::new();
        for (name, file, text) in sources {
            if let Err(e) = registry.register_template_string(&name, text) {
                return Err(TemplateError {
                    line: e.pos().map(|(line, _)| line),
                    message: e.reason().to_string(),
                    file,
                });
            }
            files.push((name, file));
        }
        let assets = ASSETS
            .iter()
            .map(|&(name, content_type, shipped)| {
                let text = dir
                    .as_ref()
                    .and_then(|d| std::fs::read_to_string(d.join(name)).ok())
                    .unwrap_or_else(|| shipped.to_owned());
                (name, content_type, text)
            })
            .collect();
        Ok(Templates {
            registry,
            dir,
            files,
            assets,
        })
    }

    /// The style sheet or script `name`: (content type, text).
    pub fn asset(&self, name: &str) -> Option<(&'static str, &str)> {
        self.assets
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, content_type, text)| (*content_type, text.as_str()))
    }

    /// Renders template `name` with `data`.
    pub fn render(&self, name: &str, data: &serde_json::Value) -> Result<String, String> {
        self.registry.render(name, data).map_err(|e| e.to_string())
    }
}

/// (name, file, text) of every `*.hbs` in `dir`, in name order.
fn read_dir(dir: &Path) -> Result<Vec<(String, String, String)>, TemplateError> {
    let found = crate::config::read_folder(dir, "hbs").map_err(|e| TemplateError {
        file: dir.display().to_string(),
        line: None,
        message: e.to_string(),
    })?;
    Ok(found
        .into_iter()
        .map(|(name, path, text)| (name, path.display().to_string(), text))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_layout_renders() {
        let config = crate::config::from_str("", "test", &Default::default()).unwrap();
        let t = Templates::load(&config).unwrap();
        let html = t
            .render(
                "layout",
                &serde_json::json!({ "title": "Keys", "body": "<p>x</p>", "version": "1", "generation": 3,
                    "csrf": "c", "session": true, "nav": "keys" }),
            )
            .unwrap();
        assert!(html.contains("<p>x</p>") && html.contains("generation 3"));
    }
}
