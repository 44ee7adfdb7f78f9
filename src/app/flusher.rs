//! The flusher: two background threads that save what the request path queued (key state,
//! usage, log records) to the store every [`FLUSH_EVERY`], and retire old log rows.

use std::sync::Arc;
use std::time::Duration;

use super::{Lasting, State};
use crate::store::{Batch, FLUSH_EVERY, Store, retire_logs};

/// Log records a batch takes at most (whole chunks of the queue: a few hundred more at most).
///
/// A batch holds its records several times as large as the queue did (unpacked, and encoded
/// as stored: about a KiB each), and the preparer runs at idle priority: on a saturated
/// machine it may take a second's records or more at once. Unbounded, those batches took
/// gemgate's peak at 256 connections to 70-104 MiB; at most 4,096 records, 46-52; at most
/// 2,048, 38-40, with the same throughput and CPU per request (a commit every 40 ms or so at
/// 50,000 requests a second). What waits stays packed in the queue.
const BATCH_RECORDS: usize = 2048;

/// Takes what the request path queued (at most about [`BATCH_RECORDS`] log records), and does
/// a flush's CPU work: encoding the records, and adding them to the dashboard's figures. Usage
/// is taken when due ([`crate::store::usage::Usage::drain_due`]), or with `all_usage`.
fn take(lasting: &Lasting, all_usage: bool) -> Batch {
    let records = lasting.logs.take(BATCH_RECORDS);
    let usage = lasting.usage.drain_due(crate::clock::now_ms(), all_usage);
    lasting.metrics.add(&records);
    Batch::new(records, usage)
}

/// Starts the flusher: every [`FLUSH_EVERY`], the keys marked dirty, the queued usage and the
/// queued log records are written; once an hour, log rows past their retention are deleted.
///
/// Two threads share the work. The preparer runs at idle priority and does the CPU work of a
/// flush: it takes what the request path queued, encodes the records and feeds the
/// dashboard. The committer runs at normal priority and only writes what the preparer hands
/// it: redb has one write lock, and a thread at idle priority holding it on a saturated
/// machine would keep everything else from being saved. When the preparer is behind (a busy
/// machine leaves it no core: [`behind`]), the committer takes and encodes what waits itself,
/// batch by batch ([`stand_in`]), so key state and the logs stay about a flush behind, and
/// the queue a few batches long, however busy it is.
pub fn start(store: Arc<Store>, state: Arc<State>) {
    // One batch waits while one is committed and the next is prepared: more would only hold
    // batches in their large form.
    let (ready, batches) = std::sync::mpsc::sync_channel::<Batch>(1);
    let preparer = {
        let state = state.clone();
        let store = store.clone();
        std::thread::Builder::new()
            .name("gemgate-store".into())
            .spawn(move || {
                lower_priority();
                // The dashboard's last day, from the request log (the committer saves
                // meanwhile: a long log must not hold up key state).
                let day_ago = crate::clock::now_ms().saturating_sub(86_400_000);
                let metrics = &state.lasting.metrics;
                if let Err(e) = store.log_since(
                    crate::store::logs::Log::Requests,
                    day_ago,
                    4096,
                    &mut |batch| metrics.add(&batch),
                ) {
                    tracing::warn!(
                        "cannot read the last day of the request log for the dashboard: {e}"
                    );
                }
                let mut tidied = std::time::Instant::now();
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    // While a whole batch more waits, it goes at once.
                    loop {
                        if ready.send(take(&state.lasting, false)).is_err() {
                            return;
                        }
                        // What the committer freed of the last batches is this thread's
                        // again at once; it goes back to the system once a second.
                        crate::alloc::tidy_when_due(&mut tidied);
                        if state.lasting.logs.queued() < BATCH_RECORDS {
                            break;
                        }
                    }
                }
            })
    };
    let committer = std::thread::Builder::new()
        .name("gemgate-store-commit".into())
        .spawn(move || {
            let mut last_retention = std::time::Instant::now() - RETENTION_EVERY;
            loop {
                let received = batches.recv_timeout(FLUSH_EVERY / 4);
                let generation = state.current.load_full();
                let config = &generation.config;
                match received {
                    Ok(batch) => write(batch, &store, &state.lasting, config.max_data_bytes),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                if behind(&store, &state.lasting, crate::clock::now_ms()) {
                    stand_in(&store, &state.lasting, config.max_data_bytes);
                }
                if last_retention.elapsed() >= RETENTION_EVERY {
                    last_retention = std::time::Instant::now();
                    retire_logs(&store, &config.file.logs);
                    forget_expired(&store, &state.lasting);
                }
            }
        });
    if let Err(e) = preparer.and(committer) {
        tracing::error!("cannot start the store flusher, key state will not be saved: {e}");
    }
}

/// Whether the preparer is behind, and the committer is to stand in for it: no batch written
/// for [`LATE_MS`], or more than [`BEHIND_RECORDS`] waiting. (Lateness
/// alone let the queue grow to 26,000 records, most of a second's, at 30,000 requests a
/// second: a preparer that the busy workers let through now and then writes one batch and
/// resets it, whatever waits.)
fn behind(store: &Store, lasting: &Lasting, now_ms: u64) -> bool {
    now_ms.saturating_sub(store.flushed_ms()) > LATE_MS || lasting.logs.queued() > BEHIND_RECORDS
}

/// How long after the last batch written the preparer is late: half an interval past its time.
const LATE_MS: u64 = FLUSH_EVERY.as_millis() as u64 * 3 / 2;

/// Log records waiting past which the committer takes them itself: two batches (the preparer
/// takes one a flush when it keeps up, and may have one ready).
const BEHIND_RECORDS: usize = 2 * BATCH_RECORDS;

/// The committer standing in for a preparer the busy workers keep off the cores: takes and
/// writes batches until less than one waits. (Taking one batch each time the preparer was
/// late let records pile up in the queue for as long as the machine stayed saturated: OpenAI
/// chat at 256 connections for 10 s peaked at 61-65 MiB so, 51-58 taking all; with
/// [`behind`] watching the queue too, 43-46 in 6-s runs.)
fn stand_in(store: &Store, lasting: &Lasting, max_bytes: u64) {
    loop {
        write(take(lasting, false), store, lasting, max_bytes);
        if lasting.logs.queued() < BATCH_RECORDS {
            return;
        }
    }
}

/// The committer's writing of a batch: the commit, then what it took (redb's pages, the
/// encoded blocks) given back at once, which kept gemgate's peak at 256 connections 2-5 MiB
/// lower than giving it back once a second, for a few hundred page faults a batch.
fn write(batch: Batch, store: &Store, lasting: &Lasting, max_bytes: u64) {
    batch.commit(store, &lasting.registry, max_bytes);
    crate::alloc::tidy();
}

/// Asks the kernel to run this thread only when a core would otherwise idle (`SCHED_IDLE`):
/// writing a second's worth of logs takes a burst of CPU, and even at a lower nice level that
/// burst held request threads back for whole time slices on a small machine (p99 went from
/// 0.3 ms to 2-4 ms at concurrency 1). A request thread that wakes up now preempts it at once.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain system call on the calling thread, with a valid parameter block.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
        }
    }
}

/// Forgets the owner registry's expired records (files, caches, batches, interactions,
/// tokens), in memory and in the store, and the kept Responses API answers past their
/// retention.
fn forget_expired(store: &Store, lasting: &Lasting) {
    let now = crate::clock::now_ms();
    match store.forget_expired_responses(now) {
        Ok(0) => {}
        Ok(n) => tracing::info!(responses = n, "expired Responses API answers forgotten"),
        Err(e) => tracing::warn!("cannot forget expired Responses API answers: {e}"),
    }
    let gone = lasting.files.prune(now);
    if gone.is_empty() {
        return;
    }
    match store.forget_files(&gone) {
        Ok(()) => tracing::info!(records = gone.len(), "expired resource records forgotten"),
        Err(e) => tracing::warn!("cannot forget expired resource records: {e}"),
    }
}

/// How often old log rows are looked for.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Writes every dirty key, the queued usage and the queued log records now. Failures are
/// logged; dirty keys stay dirty and are tried again.
///
/// The log records are taken first and written last, and key state is looked at after they
/// were taken: a request's log row, once it can be read, says that the key state and usage
/// its request changed are saved too (a request changes them before its record is queued).
pub fn flush(store: &Store, lasting: &Lasting, max_bytes: u64) {
    // What is queued now goes, batch by batch (the flusher's threads may take some of it);
    // what is queued meanwhile waits for the next flush.
    let mut left = lasting.logs.queued();
    loop {
        let batch = take(lasting, true);
        let taken = batch.records();
        batch.commit(store, &lasting.registry, max_bytes);
        left = left.saturating_sub(taken);
        if left == 0 || taken == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::logs::{Log, Record};

    /// The data file's size bound in these tests.
    const CAP: u64 = 64 << 20;

    /// A store in a new folder, and `n` log records queued (at 1,000,000 ms and on, a ms apart).
    fn queued(n: usize) -> (tempfile::TempDir, Store, Lasting) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CAP).unwrap();
        let lasting = Lasting::default();
        for i in 0..n as u64 {
            lasting.logs.push(Record {
                ts_ms: 1_000_000 + i,
                ..Record::default()
            });
        }
        (dir, store, lasting)
    }

    #[test]
    fn a_flush_writes_every_queued_record_batch_by_batch() {
        let n = 2 * BATCH_RECORDS + 7;
        let (_dir, store, lasting) = queued(n);
        flush(&store, &lasting, CAP);
        assert_eq!(lasting.logs.queued(), 0);
        let mut stored = Vec::new();
        store
            .log_since(Log::Requests, 0, 1000, &mut |batch| {
                stored.extend(batch.iter().map(|r| r.ts_ms))
            })
            .unwrap();
        assert_eq!(
            stored,
            (1_000_000..1_000_000 + n as u64).collect::<Vec<_>>()
        );
    }

    #[test]
    fn standing_in_for_the_preparer_takes_all_that_waits() {
        let (_dir, store, lasting) = queued(3 * BATCH_RECORDS);
        stand_in(&store, &lasting, CAP);
        assert!(
            lasting.logs.queued() < BATCH_RECORDS,
            "{}",
            lasting.logs.queued()
        );
        let mut stored = 0;
        store
            .log_since(Log::Requests, 0, 1000, &mut |batch| stored += batch.len())
            .unwrap();
        assert_eq!(stored + lasting.logs.queued(), 3 * BATCH_RECORDS);
    }

    #[test]
    fn the_committer_stands_in_when_the_preparer_is_late_or_records_pile_up() {
        let (_dir, store, lasting) = queued(BEHIND_RECORDS);
        flush(&store, &Lasting::default(), CAP);
        let now = store.flushed_ms();
        assert!(
            !behind(&store, &lasting, now),
            "just written, two batches waiting"
        );
        assert!(behind(&store, &lasting, now + LATE_MS + 1), "late");
        lasting.logs.push(Record::default());
        assert!(
            behind(&store, &lasting, now),
            "more than two batches waiting"
        );
    }

    #[test]
    fn a_kept_response_reaches_the_disk_with_the_next_flush() {
        use crate::store::responses::StoredResponse;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CAP).unwrap();
        let kept = StoredResponse {
            client: "c".into(),
            expires_ms: u64::MAX / 2,
            previous: None,
            items: vec![serde_json::json!({ "type": "message", "content": "hi" })],
            response: serde_json::json!({ "id": "resp_1" }),
        };
        assert!(
            !store.queue_response("resp_1", Some(&kept)),
            "past the queue's room"
        );
        // Readable at once.
        assert_eq!(
            store.load_response("resp_1", 0).unwrap(),
            Some(kept.clone())
        );
        // What a crash would leave: the file as written so far, opened as it is.
        let after_a_crash = || {
            let copy = tempfile::tempdir().unwrap();
            std::fs::copy(
                dir.path().join("gemgate.redb"),
                copy.path().join("gemgate.redb"),
            )
            .unwrap();
            let reopened = Store::open(copy.path(), CAP).unwrap();
            reopened.load_response("resp_1", 0).unwrap()
        };
        assert_eq!(after_a_crash(), None, "on the disk before any flush");
        // A flush with nothing else to write still writes it.
        flush(&store, &Lasting::default(), CAP);
        assert_eq!(after_a_crash(), Some(kept));
    }
}
