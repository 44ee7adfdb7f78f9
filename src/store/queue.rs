//! The queue between the request path and the store's flusher.
//!
//! A finished request's [`Record`] is packed into bytes as it is queued: when it was queued and
//! its length, then its fields one after the other, appended to a chunk of the queue. A queued
//! record then costs its fields' bytes (under 200 for a plain request) and no allocation of its
//! own, where a queued `Record` held 340 bytes and five strings; and the strings are freed at
//! once by the worker that made them, not a flush later by the flusher's thread, which the
//! allocator hands back to their owner only when that one next tidies. The flusher unpacks
//! what it takes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::shard::Sharded;
use crate::store::logs::Record;

/// The start of the queue's clock (when a record was queued, in ns).
static ORIGIN: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

/// Records queued at most before the oldest are dropped.
const QUEUE: usize = 100_000;
/// Bytes of packed records queued at most before the oldest are dropped.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// A chunk's size: records are appended to the newest chunk while it has room (a larger record
/// has a chunk of its own), and a full queue drops its oldest chunk.
const CHUNK: usize = 64 * 1024;

/// The log queue: records packed in chunks, the drops counted.
///
/// Each worker thread fills a chunk of its own ([`Sharded`]: on cache lines no other thread
/// writes), and puts it in the shared queue when full, a lock taken once in some hundreds of
/// records: one queue that every request appended to moved its lock and its newest chunk
/// between the cores on every request. The flusher takes the chunks being filled too.
#[derive(Default)]
pub struct LogQueue {
    queue: Mutex<Queued>,
    filling: Sharded<Mutex<Option<Chunk>>>,
    dropped: AtomicU64,
}

/// The queued chunks, with their records and bytes counted.
#[derive(Default)]
struct Queued {
    chunks: VecDeque<Chunk>,
    records: usize,
    bytes: usize,
}

struct Chunk {
    packed: Vec<u8>,
    records: usize,
}

impl Queued {
    /// Takes the oldest chunk out of the queue and its counts.
    fn pop_oldest(&mut self) -> Option<Chunk> {
        let chunk = self.chunks.pop_front()?;
        self.records -= chunk.records;
        self.bytes -= chunk.packed.len();
        Some(chunk)
    }

    /// Queues `chunk` as the newest; past [`QUEUE`] records or [`QUEUE_BYTES`] the oldest
    /// chunks are dropped first. Returns how many records were dropped.
    fn push_newest(&mut self, chunk: Chunk) -> usize {
        let mut dropped = 0;
        while self.records > 0
            && (self.records + chunk.records > QUEUE
                || self.bytes + chunk.packed.len() > QUEUE_BYTES)
        {
            let Some(old) = self.pop_oldest() else {
                break;
            };
            dropped += old.records;
        }
        self.records += chunk.records;
        self.bytes += chunk.packed.len();
        self.chunks.push_back(chunk);
        dropped
    }
}

impl LogQueue {
    /// Queues a record; past [`QUEUE`] records or [`QUEUE_BYTES`] the oldest chunks of records
    /// are dropped, and counted.
    pub fn push(&self, r: Record) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let full = SCRATCH.with_borrow_mut(|packed| {
            packed.clear();
            // When it was queued, to put it back in order among other threads' records, and
            // its length, to sort records without unpacking them.
            let queued = ORIGIN.elapsed().as_nanos() as u64;
            packed.extend_from_slice(&queued.to_le_bytes());
            packed.extend_from_slice(&[0; 4]);
            pack(&r, packed);
            drop(r);
            // A record's strings are bounded (a body is cut at `BODY_KEPT`): far below 4 GiB.
            let len = (packed.len() - HEAD) as u32;
            packed[8..HEAD].copy_from_slice(&len.to_le_bytes());
            let mut filling = self
                .filling
                .mine()
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let full = match filling.as_mut() {
                Some(chunk) if chunk.packed.len() + packed.len() <= CHUNK => {
                    chunk.packed.extend_from_slice(packed);
                    chunk.records += 1;
                    None
                }
                _ => {
                    let mut chunk = Chunk {
                        packed: Vec::with_capacity(CHUNK.max(packed.len())),
                        records: 1,
                    };
                    chunk.packed.extend_from_slice(packed);
                    filling.replace(chunk)
                }
            };
            drop(filling);
            // A record with a large body leaves the scratch buffer large: let it go.
            if packed.capacity() > CHUNK {
                *packed = Vec::new();
            }
            full
        });
        if let Some(full) = full {
            self.queue_chunks([full]);
        }
    }

    /// Puts `chunks` in the shared queue, the oldest dropped (and counted) past its room.
    fn queue_chunks(&self, chunks: impl IntoIterator<Item = Chunk>) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let dropped: usize = chunks.into_iter().map(|c| q.push_newest(c)).sum();
        drop(q);
        if dropped > 0 {
            self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    /// Moves the chunks the threads are filling into the shared queue.
    fn queue_filling(&self) {
        let filled = self
            .filling
            .iter()
            .filter_map(|f| f.lock().unwrap_or_else(|e| e.into_inner()).take());
        self.queue_chunks(filled.collect::<Vec<_>>());
    }

    /// Takes the oldest queued records: whole chunks, until at least `max` records or the
    /// queue is empty (a chunk holds a few hundred records).
    pub fn take(&self, max: usize) -> Vec<Record> {
        // NOTE: the flusher runs at idle priority; a lock it holds can be held for as long as
        // the busy workers keep it off a CPU, and a worker waiting for it stalls for as long.
        // So the lock is held to move chunks only; the records are unpacked after.
        self.queue_filling();
        let (mut taken, mut records) = (Vec::new(), 0);
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            while records < max {
                let Some(chunk) = q.pop_oldest() else {
                    break;
                };
                records += chunk.records;
                taken.push(chunk);
            }
        }
        // Each thread's records are in order; the threads' chunks are put in order with them
        // (the store numbers records in the order it gets them). Sorted as (when, bytes),
        // then unpacked: sorting the unpacked records moved 340 bytes each, twice, through a
        // scratch copy of them all.
        let mut packed: Vec<(u64, &[u8])> = Vec::with_capacity(records);
        for chunk in &taken {
            let mut at = &chunk.packed[..];
            while !at.is_empty() {
                let Some((queued, record, rest)) = next_record(at) else {
                    tracing::error!("a queued log record is cut short; its chunk's rest is lost");
                    break;
                };
                packed.push((queued, record));
                at = rest;
            }
        }
        packed.sort_by_key(|(queued, _)| *queued);
        let mut out = Vec::with_capacity(packed.len());
        for (_, mut record) in packed {
            match unpack(&mut record) {
                Some(r) => out.push(r),
                None => tracing::error!("a queued log record does not unpack; it is lost"),
            }
        }
        out
    }

    /// Records waiting for the flusher.
    pub fn queued(&self) -> usize {
        let filling: usize = self
            .filling
            .iter()
            .map(|f| {
                f.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map_or(0, |c| c.records)
            })
            .sum();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).records + filling
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A queued record's head: when it was queued (ns since [`ORIGIN`]), and its packed length.
const HEAD: usize = 12;

/// The record at the start of `at`: when it was queued, its packed fields, and what follows.
fn next_record(at: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let (queued, rest) = at.split_first_chunk::<8>()?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let (record, rest) = rest.split_at_checked(u32::from_le_bytes(*len) as usize)?;
    Some((u64::from_le_bytes(*queued), record, rest))
}

/// `None` as a packed string's length.
const NONE: u32 = u32::MAX;

/// Appends `r`, packed: its numbers little-endian, then its strings, each its length as `u32`
/// (`NONE` for none) and its bytes; the trace as its JSON.
fn pack(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.ts_ms.to_le_bytes());
    out.extend_from_slice(&r.status.to_le_bytes());
    out.extend_from_slice(&r.attempts.to_le_bytes());
    out.extend_from_slice(&r.latency_ms.to_le_bytes());
    out.extend_from_slice(&r.ttfb_ms.unwrap_or(f64::NAN).to_le_bytes());
    out.push(u8::from(r.ttfb_ms.is_some()) | (u8::from(r.unsampled) << 1));
    for n in [r.prompt_tokens, r.output_tokens, r.thought_tokens] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&r.upstream_status.map_or(u32::MAX, u32::from).to_le_bytes());
    let mut text = |s: Option<&[u8]>| match s {
        Some(s) => {
            // A record's strings are bounded (a body is cut at `BODY_KEPT`) far below 4 GiB.
            let s = &s[..s.len().min(NONE as usize - 1)];
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
        None => out.extend_from_slice(&NONE.to_le_bytes()),
    };
    fn bytes(s: &Option<String>) -> Option<&[u8]> {
        s.as_deref().map(str::as_bytes)
    }
    text(Some(r.id.as_bytes()));
    text(bytes(&r.client));
    text(Some(r.model.as_bytes()));
    text(Some(r.action.as_bytes()));
    text(bytes(&r.key_id));
    text(bytes(&r.class));
    text(bytes(&r.upstream_message));
    text(bytes(&r.request_body));
    text(bytes(&r.asked_model));
    text(bytes(&r.instance));
    let trace = r.trace.as_ref().and_then(|t| serde_json::to_vec(t).ok());
    text(trace.as_deref());
}

/// Reads one record [`pack`] wrote at the start of `at`, and moves `at` past it.
fn unpack(at: &mut &[u8]) -> Option<Record> {
    fn take<'a>(at: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = at.split_at_checked(n)?;
        *at = rest;
        Some(head)
    }
    fn array<const N: usize>(at: &mut &[u8]) -> Option<[u8; N]> {
        take(at, N)?.try_into().ok()
    }
    fn text(at: &mut &[u8]) -> Option<Option<String>> {
        match u32::from_le_bytes(array(at)?) {
            NONE => Some(None),
            n => Some(Some(
                String::from_utf8(take(at, n as usize)?.to_vec()).ok()?,
            )),
        }
    }
    let ts_ms = u64::from_le_bytes(array(at)?);
    let status = u16::from_le_bytes(array(at)?);
    let attempts = u32::from_le_bytes(array(at)?);
    let latency_ms = f64::from_le_bytes(array(at)?);
    let ttfb_ms = f64::from_le_bytes(array(at)?);
    let [flags] = array(at)?;
    let [prompt_tokens, output_tokens, thought_tokens] =
        [(); 3].map(|_| array(at).map(u64::from_le_bytes));
    let upstream_status = u32::from_le_bytes(array(at)?);
    Some(Record {
        ts_ms,
        status,
        attempts,
        latency_ms,
        ttfb_ms: (flags & 1 != 0).then_some(ttfb_ms),
        unsampled: flags & 2 != 0,
        prompt_tokens: prompt_tokens?,
        output_tokens: output_tokens?,
        thought_tokens: thought_tokens?,
        upstream_status: u16::try_from(upstream_status).ok(),
        id: text(at)?.unwrap_or_default(),
        client: text(at)?,
        model: text(at)?.unwrap_or_default(),
        action: text(at)?.unwrap_or_default(),
        key_id: text(at)?,
        class: text(at)?,
        upstream_message: text(at)?,
        request_body: text(at)?,
        asked_model: text(at)?,
        instance: text(at)?,
        trace: text(at)?.and_then(|t| serde_json::from_str(&t).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::logs::BODY_KEPT;

    /// What a record takes in the queue: its packed fields after the time it was queued.
    fn packed_len(r: &Record) -> usize {
        let mut out = Vec::new();
        pack(r, &mut out);
        HEAD + out.len()
    }

    #[test]
    fn records_come_out_as_they_went_in() {
        let full = Record::every_field();
        let sampled_out = Record {
            unsampled: true,
            ttfb_ms: None,
            upstream_status: None,
            ..Record::every_field()
        };
        let q = LogQueue::default();
        let plain = Record::default();
        for r in [&full, &plain, &sampled_out] {
            q.push(r.clone());
        }
        assert_eq!(q.queued(), 3);
        assert_eq!(q.take(usize::MAX), vec![full, plain, sampled_out]);
        assert_eq!(q.queued(), 0);
        assert!(q.take(usize::MAX).is_empty());
        // Cut short, a packed record is refused rather than misread.
        let mut out = Vec::new();
        pack(&Record::default(), &mut out);
        assert!(unpack(&mut &out[..out.len() - 1]).is_none());
    }

    #[test]
    fn records_of_several_threads_come_out_in_the_order_they_were_queued() {
        let q = LogQueue::default();
        let at = |ts_ms| Record {
            ts_ms,
            ..Record::default()
        };
        q.push(at(1));
        std::thread::scope(|s| s.spawn(|| q.push(at(2))).join().unwrap());
        q.push(at(3));
        let order: Vec<u64> = q.take(usize::MAX).iter().map(|r| r.ts_ms).collect();
        assert_eq!(order, [1, 2, 3]);
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_as_well_as_records() {
        let q = LogQueue::default();
        let big = Record {
            request_body: Some("x".repeat(BODY_KEPT)),
            ..Record::default()
        };
        let fit = QUEUE_BYTES / packed_len(&big);
        for _ in 0..fit + 10 {
            q.push(big.clone());
        }
        // (The chunk a thread is filling joins the queue, and counts, when full or taken.)
        assert_eq!(q.take(usize::MAX).len(), fit);
        assert_eq!(q.dropped(), 10);

        // Small records: past the count, the oldest chunk goes, and is counted.
        let small = Record::default();
        let per_chunk = CHUNK / packed_len(&small);
        for _ in 0..QUEUE + 1 {
            q.push(small.clone());
        }
        let kept = q.take(usize::MAX).len();
        let dropped = q.dropped() as usize - 10;
        assert!(kept <= QUEUE, "{kept}");
        assert_eq!(kept + dropped, QUEUE + 1, "every record kept or counted");
        assert_eq!(dropped % per_chunk, 0, "whole chunks go: {dropped}");
        assert!(dropped > 0);
    }

    #[test]
    fn a_take_is_whole_chunks_oldest_first_up_to_its_size() {
        let q = LogQueue::default();
        let per_chunk = CHUNK / packed_len(&Record::default());
        for i in 0..3 * per_chunk as u64 {
            q.push(Record {
                ts_ms: i,
                ..Record::default()
            });
        }
        // One record asked: its whole chunk comes.
        let first = q.take(1);
        assert_eq!(first.len(), per_chunk);
        assert!(first.iter().enumerate().all(|(i, r)| r.ts_ms == i as u64));
        assert_eq!(q.queued(), 2 * per_chunk);
        // A chunk and one more asked: two chunks come; nothing is left.
        let rest = q.take(per_chunk + 1);
        assert_eq!(rest.len(), 2 * per_chunk);
        assert_eq!(rest[0].ts_ms, per_chunk as u64);
        assert_eq!(q.queued(), 0);
        assert!(q.take(1).is_empty());
    }

    /// A plain request's record, finished at `ts_ms`.
    fn plain(ts_ms: u64) -> Record {
        Record {
            ts_ms,
            id: "0199c3e1a2b4-5f0d3c1e9a7b6d4c".into(),
            client: Some("token-1a7674eb4ee7".into()),
            model: "gemini-2.5-flash".into(),
            action: "generateContent".into(),
            key_id: Some("kab29e27f94d7".into()),
            status: 200,
            ..Record::default()
        }
    }

    /// What queueing a plain request's record costs, on one thread and then on two at once (as
    /// two workers do). Run with
    /// `cargo test --release --lib -- --ignored --nocapture queueing_cost`.
    #[test]
    #[ignore]
    fn queueing_cost() {
        let q = LogQueue::default();
        let record = plain(0);
        let rounds = 1_000_000;
        let run = || {
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                // (A full queue drops its oldest chunk: the steady state of a stalled flusher.)
                q.push(record.clone());
            }
            t.elapsed().as_nanos() as f64 / rounds as f64
        };
        run();
        let alone = run();
        let both = std::thread::scope(|s| {
            let other = s.spawn(run);
            (run() + other.join().unwrap()) / 2.0
        });
        println!("{alone:>5.0} ns a record on one thread, {both:>5.0} on each of two");
    }

    /// What the flusher's taking costs a record: records queued by two threads, taken in
    /// batches as the flusher takes them. Run with
    /// `cargo test --release --lib -- --ignored --nocapture taking_cost`.
    #[test]
    #[ignore]
    fn taking_cost() {
        let q = LogQueue::default();
        let (rounds, each) = (5, 100_000);
        let mut spent = std::time::Duration::ZERO;
        for _ in 0..rounds {
            std::thread::scope(|s| {
                s.spawn(|| (0..each).for_each(|i| q.push(plain(i))));
                (0..each).for_each(|i| q.push(plain(i)));
            });
            let t = std::time::Instant::now();
            while !q.take(2048).is_empty() {}
            spent += t.elapsed();
        }
        let records = (rounds * each * 2) as f64;
        println!(
            "{:>5.0} ns a record taken",
            spent.as_nanos() as f64 / records
        );
    }
}
