//! The counter store behind `gemgate.counter(name)`: named counters per plugin, shared by every
//! worker thread and kept across reloads, each optionally counting in a fixed time window.
//!
//! [`CounterStore`] and [`CounterSlot`] are what plugins count through; [`Counters`] keeps them
//! in this process. The shared state (`app::shared`) hands the policy its store; in a fleet each
//! instance keeps its own counters (a limit the fleet must hold is declared in `limits`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Counters kept per plugin, at most this many in all; past it, expired windows are dropped,
/// then new names are refused.
const MAX_COUNTERS: usize = 100_000;

#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    value: i64,
    /// When the current window ends (0: no window).
    window_end_ms: u64,
}

impl Cell {
    /// Whether its window (if any) is still open at `now_ms`.
    fn live(&self, now_ms: u64) -> bool {
        self.window_end_ms == 0 || self.window_end_ms > now_ms
    }
}

/// Where plugin counters live.
pub trait CounterStore: Send + Sync {
    /// The counter `name` of `plugin`, made on first use; refused when the store is full.
    fn slot(
        &self,
        plugin: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<Arc<dyn CounterSlot>, &'static str>;

    /// The counter's value now (0 if it does not exist or its window has ended).
    fn get(&self, plugin: &str, name: &str, now_ms: u64) -> i64;

    /// The counter's value and the end of its window (0: none), if it exists and its window
    /// is open.
    fn peek(&self, plugin: &str, name: &str, now_ms: u64) -> Option<(i64, u64)> {
        let value = self.get(plugin, name, now_ms);
        (value != 0).then_some((value, 0))
    }
}

/// One counter. A plugin's handle keeps it, so counting takes no lookup by name.
pub trait CounterSlot: Send + Sync {
    /// Adds `n` and returns the new value. With a window, a counter whose window has ended
    /// starts again from zero, and its window is `window_s` from `now_ms()`.
    fn incr(&self, n: i64, window_s: Option<f64>, now_ms: &dyn Fn() -> u64) -> i64;

    /// Sets the value to `f(value)` in one step (no other counting in between). The window,
    /// if any, is left as it is.
    fn advance(&self, f: &mut dyn FnMut(i64) -> i64);

    /// The value now (0 once its window has ended).
    fn get(&self, now_ms: u64) -> i64;

    /// Dropped from its store: a handle that kept it must look its name up again.
    fn is_dropped(&self) -> bool;
}

/// One counter kept in this process.
#[derive(Debug, Default)]
pub struct Slot {
    cell: Mutex<Cell>,
    /// Dropped from the store (its window had ended and the store was full): a handle that
    /// kept it must look its name up again.
    dropped: AtomicBool,
}

impl CounterSlot for Slot {
    fn incr(&self, n: i64, window_s: Option<f64>, now_ms: &dyn Fn() -> u64) -> i64 {
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = window_s.filter(|w| w.is_finite() && *w > 0.0) {
            let now = now_ms();
            if cell.window_end_ms <= now {
                cell.value = 0;
                cell.window_end_ms = now + (w * 1000.0) as u64;
            }
        }
        cell.value = cell.value.saturating_add(n);
        cell.value
    }

    fn advance(&self, f: &mut dyn FnMut(i64) -> i64) {
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        cell.value = f(cell.value);
    }

    fn get(&self, now_ms: u64) -> i64 {
        let cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if cell.live(now_ms) { cell.value } else { 0 }
    }

    fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Slot {
    fn live(&self, now_ms: u64) -> bool {
        self.cell
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live(now_ms)
    }
}

/// Plugin counters by plugin, then name (looked up by `&str`: no allocation per call).
#[derive(Debug, Default)]
pub struct Counters {
    cells: Mutex<Cells>,
}

#[derive(Debug, Default)]
struct Cells {
    by_plugin: HashMap<String, HashMap<String, Arc<Slot>>>,
    count: usize,
}

impl CounterStore for Counters {
    fn slot(
        &self,
        plugin: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<Arc<dyn CounterSlot>, &'static str> {
        let mut guard = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        let cells = &mut *guard;
        if let Some(slot) = cells.by_plugin.get(plugin).and_then(|m| m.get(name)) {
            return Ok(slot.clone());
        }
        if cells.count >= MAX_COUNTERS {
            for m in cells.by_plugin.values_mut() {
                m.retain(|_, slot| {
                    let live = slot.live(now_ms);
                    if !live {
                        slot.dropped.store(true, Ordering::Relaxed);
                    }
                    live
                });
            }
            cells.count = cells.by_plugin.values().map(HashMap::len).sum();
            if cells.count >= MAX_COUNTERS {
                return Err("too many counters");
            }
        }
        cells.count += 1;
        let slot = Arc::new(Slot::default());
        cells
            .by_plugin
            .entry(plugin.to_owned())
            .or_default()
            .insert(name.to_owned(), slot.clone());
        Ok(slot)
    }

    fn get(&self, plugin: &str, name: &str, now_ms: u64) -> i64 {
        self.peek(plugin, name, now_ms)
            .map_or(0, |(value, _)| value)
    }

    fn peek(&self, plugin: &str, name: &str, now_ms: u64) -> Option<(i64, u64)> {
        let cell = *self
            .find(plugin, name)?
            .cell
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        cell.live(now_ms)
            .then_some((cell.value, cell.window_end_ms))
    }
}

impl Counters {
    /// The counter `name` of `plugin`, if it was made.
    fn find(&self, plugin: &str, name: &str) -> Option<Arc<Slot>> {
        let cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        cells.by_plugin.get(plugin)?.get(name).cloned()
    }
}

/// Counters that start as copies of another store's and keep their changes to themselves: a
/// dry run sees what the live counters hold, and changes none of them.
pub struct Shadow {
    live: Arc<dyn CounterStore>,
    own: Counters,
}

impl Shadow {
    pub fn over(live: Arc<dyn CounterStore>) -> Shadow {
        Shadow {
            live,
            own: Counters::default(),
        }
    }
}

impl CounterStore for Shadow {
    fn slot(
        &self,
        plugin: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<Arc<dyn CounterSlot>, &'static str> {
        let fresh = self.own.find(plugin, name).is_none();
        let slot = self.own.slot(plugin, name, now_ms)?;
        if fresh
            && let Some((value, window_end_ms)) = self.live.peek(plugin, name, now_ms)
            && let Some(own) = self.own.find(plugin, name)
        {
            *own.cell.lock().unwrap_or_else(|e| e.into_inner()) = Cell {
                value,
                window_end_ms,
            };
        }
        Ok(slot)
    }

    fn get(&self, plugin: &str, name: &str, now_ms: u64) -> i64 {
        match self.own.peek(plugin, name, now_ms) {
            Some((value, _)) => value,
            None => self.live.get(plugin, name, now_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Counters {
        /// Adds `n` to the counter and returns its new value.
        fn incr(
            &self,
            plugin: &str,
            name: &str,
            n: i64,
            window_s: Option<f64>,
            now_ms: u64,
        ) -> Result<i64, &'static str> {
            Ok(self
                .slot(plugin, name, now_ms)?
                .incr(n, window_s, &|| now_ms))
        }
    }

    #[test]
    fn a_shadow_starts_from_the_live_counters_and_leaves_them_alone() {
        let live = Arc::new(Counters::default());
        live.incr("p", "day", 5, Some(60.0), 1000).unwrap();
        let shadow = Shadow::over(live.clone());
        let slot = shadow.slot("p", "day", 2000).unwrap();
        assert_eq!(
            slot.incr(1, Some(60.0), &|| 2000),
            6,
            "the live value, and its window"
        );
        assert_eq!(shadow.get("p", "day", 2000), 6);
        assert_eq!(
            live.get("p", "day", 2000),
            5,
            "the live counter is untouched"
        );
        assert_eq!(
            slot.incr(1, Some(60.0), &|| 61_000),
            1,
            "the live window ended"
        );
        assert_eq!(shadow.slot("p", "new", 0).unwrap().incr(1, None, &|| 0), 1);
        assert_eq!(live.get("p", "new", 0), 0);
    }

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
