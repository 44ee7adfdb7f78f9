//! `[quota]`: the limits Google sets each project, per model, that gemgate keeps to before
//! Google has to say so.
//!
//! ```toml
//! [quota.limits."gemini-2.5-flash"]          # every project
//! rpm = 10
//!
//! [quota.tiers.free.limits."gemini-2.5-pro"]  # only projects whose keys say tier = "free"
//! rpm = 5
//! ```
//!
//! gemgate ships Google's published limits of the tiers `free` and `tier1`
//! ([`SHIPPED_TIERS`]); a `[quota.tiers.<tier>.limits.<model>]` table replaces the shipped
//! figures of that tier and model. When both a tier and `[quota.limits]` limit a model, the
//! lower figure of each kind holds.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Google's published rate limits of the free tier and tier 1 (ai.google.dev/gemini-api/docs/
/// rate-limits, as of late 2025). Google changes them; an operator overrides any of them in
/// `[quota.tiers]`.
pub const SHIPPED_TIERS: &str = include_str!("quota-tiers.toml");

/// One model's limits for one project; an absent figure is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// Input tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests per day (the day ends at midnight Pacific time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u32>,
}

impl Limit {
    /// The lower figure of each kind.
    pub fn stricter(self, other: Limit) -> Limit {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Limit {
            rpm: min(self.rpm, other.rpm),
            tpm: min(self.tpm, other.tpm),
            rpd: min(self.rpd, other.rpd),
        }
    }

    /// One of `n` equal shares of this limit (at least 1 of each figure).
    pub fn share(self, n: u32) -> Limit {
        let n = n.max(1);
        Limit {
            rpm: self.rpm.map(|v| (v / n).max(1)),
            tpm: self.tpm.map(|v| (v / u64::from(n)).max(1)),
            rpd: self.rpd.map(|v| (v / n).max(1)),
        }
    }

    pub fn is_none(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.rpd.is_none()
    }
}

/// `[quota.tiers.<name>]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierSection {
    pub limits: BTreeMap<String, Limit>,
}

/// `[quota]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaSection {
    /// Limits of every project, by model.
    pub limits: BTreeMap<String, Limit>,
    /// Limits of the projects of one tier, by model.
    pub tiers: BTreeMap<String, TierSection>,
}

/// `[quota]` resolved: the shipped tiers under the operator's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaLimits {
    every: HashMap<String, Limit>,
    tiers: HashMap<String, HashMap<String, Limit>>,
}

impl QuotaLimits {
    /// The shipped tiers with `section` over them; every figure must be above 0.
    pub fn resolve(section: &QuotaSection) -> Result<QuotaLimits, String> {
        let shipped: BTreeMap<String, TierSection> =
            toml::from_str(SHIPPED_TIERS).expect("the shipped tiers parse");
        let mut tiers: HashMap<String, HashMap<String, Limit>> = shipped
            .into_iter()
            .map(|(name, tier)| (name, tier.limits.into_iter().collect()))
            .collect();
        for (name, tier) in &section.tiers {
            check_name(name, "a tier")?;
            let limits = tiers.entry(name.clone()).or_default();
            for (model, limit) in &tier.limits {
                check(model, limit).map_err(|m| format!("tiers.{name}.limits.{model}: {m}"))?;
                limits.insert(model.clone(), *limit);
            }
        }
        let mut every = HashMap::new();
        for (model, limit) in &section.limits {
            check(model, limit).map_err(|m| format!("limits.{model}: {m}"))?;
            every.insert(model.clone(), *limit);
        }
        Ok(QuotaLimits { every, tiers })
    }

    /// Whether tier `name` is defined (shipped or configured).
    pub fn knows_tier(&self, name: &str) -> bool {
        self.tiers.contains_key(name)
    }

    /// The tiers' names, sorted.
    pub fn tier_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The limit of `model` for a project of `tier`; `None` when nothing limits it.
    pub fn limit(&self, tier: Option<&str>, model: &str) -> Option<Limit> {
        let of_tier = tier
            .and_then(|t| self.tiers.get(t))
            .and_then(|t| t.get(model));
        match (self.every.get(model), of_tier) {
            (Some(a), Some(b)) => Some(a.stricter(*b)),
            (a, b) => a.or(b).copied(),
        }
        .filter(|l| !l.is_none())
    }

    /// The models some project of one of `tiers` (or of none) is limited for.
    pub fn limited_models<'a>(
        &self,
        tiers: impl IntoIterator<Item = &'a str>,
    ) -> std::collections::HashSet<String> {
        let mut models: std::collections::HashSet<String> = self.every.keys().cloned().collect();
        for tier in tiers {
            if let Some(t) = self.tiers.get(tier) {
                models.extend(t.keys().cloned());
            }
        }
        models
    }
}

fn check_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
        return Err(format!("{name:?} is not a valid name for {what}"));
    }
    Ok(())
}

fn check(model: &str, limit: &Limit) -> Result<(), String> {
    check_name(model, "a model")?;
    if limit.rpm == Some(0) || limit.tpm == Some(0) || limit.rpd == Some(0) {
        return Err("a limit must be above 0 (leave it out for none)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> QuotaSection {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn tiers_apply_only_to_their_keys_and_the_lower_figure_holds() {
        let q = QuotaLimits::resolve(&section(
            r#"
            [limits."gemini-2.5-flash"]
            rpm = 8
            tpm = 1000000
            [tiers.free.limits."gemini-2.5-pro"]
            rpm = 2
            [tiers.mine.limits."m"]
            rpd = 3
            "#,
        ))
        .unwrap();
        let flash_free = q.limit(Some("free"), "gemini-2.5-flash").unwrap();
        assert_eq!(flash_free.rpm, Some(8), "8 is below the free tier's 10");
        assert_eq!(flash_free.tpm, Some(250_000), "the free tier's is lower");
        assert_eq!(q.limit(None, "gemini-2.5-flash").unwrap().rpm, Some(8));
        assert_eq!(
            q.limit(Some("free"), "gemini-2.5-pro").unwrap().rpm,
            Some(2)
        );
        assert_eq!(q.limit(None, "gemini-2.5-pro"), None, "no tier, no limit");
        assert_eq!(
            q.limit(Some("tier1"), "gemini-2.5-pro").unwrap().rpm,
            Some(150)
        );
        assert_eq!(q.limit(Some("mine"), "m").unwrap().rpd, Some(3));
        let models = q.limited_models(["mine"]);
        assert!(models.contains("m") && models.contains("gemini-2.5-flash"));
        assert!(
            !models.contains("gemini-2.5-pro"),
            "only the free tier limits it"
        );
        assert!(q.knows_tier("mine") && q.knows_tier("free") && !q.knows_tier("fre"));
    }

    #[test]
    fn a_zero_limit_is_refused() {
        let e = QuotaLimits::resolve(&section("[limits.m]\nrpm = 0")).unwrap_err();
        assert!(e.contains("limits.m"), "{e}");
    }
}
