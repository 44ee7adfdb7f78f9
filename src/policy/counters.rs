//! The counter store behind `gemgate.counter(name)`: named counters per plugin, shared by every
//! worker thread and kept across reloads, each optionally counting in a fixed time window.

use std::collections::HashMap;
use std::sync::Mutex;

/// Counters kept per plugin, at most this many in all; past it, expired windows are dropped,
/// then new names are refused.
const MAX_COUNTERS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Cell {
    value: i64,
    /// When the current window ends (0: no window).
    window_end_ms: u64,
}

/// Plugin counters by plugin, then name (looked up by `&str`: no allocation per call).
#[derive(Debug, Default)]
pub struct Counters {
    cells: Mutex<Cells>,
}

#[derive(Debug, Default)]
struct Cells {
    by_plugin: HashMap<String, HashMap<String, Cell>>,
    count: usize,
}

impl Counters {
    /// Adds `n` to the counter and returns its new value. With a window, a counter whose window
    /// has ended starts again from zero, and its window is `window_s` from now.
    pub fn incr(
        &self,
        plugin: &str,
        name: &str,
        n: i64,
        window_s: Option<f64>,
        now_ms: u64,
    ) -> Result<i64, &'static str> {
        let mut guard = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        let cells = &mut *guard;
        let exists = cells
            .by_plugin
            .get(plugin)
            .is_some_and(|m| m.contains_key(name));
        if !exists {
            if cells.count >= MAX_COUNTERS {
                let live = |c: &Cell| c.window_end_ms == 0 || c.window_end_ms > now_ms;
                for m in cells.by_plugin.values_mut() {
                    m.retain(|_, c| live(c));
                }
                cells.count = cells.by_plugin.values().map(HashMap::len).sum();
                if cells.count >= MAX_COUNTERS {
                    return Err("too many counters");
                }
            }
            cells.count += 1;
            cells
                .by_plugin
                .entry(plugin.to_owned())
                .or_default()
                .insert(
                    name.to_owned(),
                    Cell {
                        value: 0,
                        window_end_ms: 0,
                    },
                );
        }
        let cell = cells
            .by_plugin
            .get_mut(plugin)
            .and_then(|m| m.get_mut(name))
            .expect("inserted above");
        if let Some(w) = window_s.filter(|w| w.is_finite() && *w > 0.0) {
            if cell.window_end_ms <= now_ms {
                cell.value = 0;
                cell.window_end_ms = now_ms + (w * 1000.0) as u64;
            }
        }
        cell.value = cell.value.saturating_add(n);
        Ok(cell.value)
    }

    /// The counter's value now (0 if it does not exist or its window has ended).
    pub fn get(&self, plugin: &str, name: &str, now_ms: u64) -> i64 {
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        cells
            .by_plugin
            .get(plugin)
            .and_then(|m| m.get(name))
            .filter(|c| c.window_end_ms == 0 || c.window_end_ms > now_ms)
            .map_or(0, |c| c.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_per_plugin_and_windows_restart() {
        let c = Counters::default();
        assert_eq!(c.incr("a", "x", 1, Some(1.0), 0), Ok(1));
        assert_eq!(c.incr("a", "x", 2, Some(1.0), 500), Ok(3));
        assert_eq!(c.incr("b", "x", 1, None, 500), Ok(1));
        assert_eq!(c.get("a", "x", 900), 3);
        assert_eq!(c.get("a", "x", 1000), 0);
        assert_eq!(c.incr("a", "x", 1, Some(1.0), 1000), Ok(1));
        assert_eq!(c.get("b", "x", 1_000_000), 1, "no window: never expires");
    }
}
