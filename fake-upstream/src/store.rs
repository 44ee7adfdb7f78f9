//! A bounded store of resources by id, in creation order: when full, the oldest goes first.

use std::collections::{BTreeMap, HashMap};

use super::cache::Owner;

/// What a stored resource says about whom it belongs to.
pub(crate) trait Owned {
    /// The project (or key) it belongs to.
    fn owner(&self) -> &Owner;
}

/// At most `CAP` resources.
#[derive(Debug)]
pub(crate) struct Store<T, const CAP: usize> {
    /// Id → (creation number, resource).
    by_id: HashMap<String, (u64, T)>,
    /// Creation number → id.
    order: BTreeMap<u64, String>,
    next: u64,
}

impl<T, const CAP: usize> Default for Store<T, CAP> {
    fn default() -> Self {
        Store {
            by_id: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
        }
    }
}

impl<T, const CAP: usize> Store<T, CAP> {
    /// Stores `item` under `id` (replacing one of that id), first forgetting the oldest if full.
    pub(crate) fn insert(&mut self, id: String, item: T) {
        self.remove(&id);
        while self.by_id.len() >= CAP.max(1) {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_id.remove(&oldest);
        }
        let seq = self.next;
        self.next += 1;
        self.order.insert(seq, id.clone());
        self.by_id.insert(id, (seq, item));
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub(crate) fn get(&self, id: &str) -> Option<&T> {
        self.by_id.get(id).map(|(_, t)| t)
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.by_id.get_mut(id).map(|(_, t)| t)
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<T> {
        let (seq, item) = self.by_id.remove(id)?;
        self.order.remove(&seq);
        Some(item)
    }

    pub(crate) fn clear(&mut self) {
        self.by_id.clear();
        self.order.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// (creation number, id, item) from creation number `start` on, oldest first.
    pub(crate) fn since(&self, start: u64) -> impl Iterator<Item = (u64, &str, &T)> {
        self.order
            .range(start..)
            .map(|(&seq, id)| (seq, id.as_str(), &self.by_id[id].1))
    }
}

impl<T: Owned, const CAP: usize> Store<T, CAP> {
    /// The resource `id` if `owner`'s.
    pub(crate) fn owned(&mut self, id: &str, owner: &Owner) -> Option<&mut T> {
        self.get_mut(id).filter(|t| t.owner() == owner)
    }
}

/// A fresh id of `len` characters drawn by `draw`.
pub(crate) fn random_id(len: usize, draw: fn() -> char) -> String {
    (0..len).map(|_| draw()).collect()
}

/// A lowercase letter or digit.
pub(crate) fn lower_alnum() -> char {
    const SET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    SET[fastrand::usize(..SET.len())] as char
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_goes_first() {
        let mut store = Store::<i32, 3>::default();
        for i in 0..3 {
            store.insert(format!("{i}"), i);
        }
        store.insert("3".to_owned(), 3);
        assert_eq!(store.len(), 3);
        assert!(!store.contains("0"));
        assert_eq!(store.get("3"), Some(&3));
        // Replacing keeps the count.
        store.insert("2".to_owned(), 20);
        assert_eq!(store.len(), 3);
        let ids: Vec<&str> = store.since(0).map(|(_, id, _)| id).collect();
        assert_eq!(ids, ["1", "3", "2"]);
        assert_eq!(store.remove("1"), Some(1));
        assert_eq!(store.since(0).count(), 2);
        store.clear();
        assert_eq!(store.len(), 0);
    }
}
