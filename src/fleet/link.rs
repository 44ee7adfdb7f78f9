//! The link task: one per instance, on the fleet's own thread. It keeps a connection and a
//! subscription to Redis, writes what changed here in pipelined batches, merges what changed
//! elsewhere into the view, beats the heartbeat, and syncs in full whenever the link comes
//! back or Redis comes back empty.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, AsyncConnectionConfig, RedisResult, Script};
use tokio::sync::mpsc::UnboundedReceiver as Receiver;

use super::{FileWire, Fleet, Member, Op, SessionWire, UploadWire};
use crate::clock::now_ms;
use crate::keys::{KeyHealth, KeyState};
use crate::store::usage::{Counts, day_of};

/// Merges a key's health into the fleet's (the rules of `KeyState::merge`), announces the
/// result when it changed, and returns it. KEYS: the keys hash, the channel; ARGV: key id,
/// health JSON, now (ms).
static MERGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local out = cjson.decode(ARGV[2])
if cur then
  local c = cjson.decode(cur)
  if type(c.cool) ~= 'table' then c.cool = {} end
  if out.epoch < c.epoch then
    out = c
  elseif out.epoch == c.epoch then
    local inc = out
    out = c
    if inc.disabled and not c.disabled then
      out.disabled = true
      out.reason = inc.reason
    end
    if type(inc.cool) == 'table' then
      for model, v in pairs(inc.cool) do
        local have = out.cool[model]
        if not have or have[1] < v[1] then out.cool[model] = v end
      end
    end
  end
end
local now = tonumber(ARGV[3])
local live = {}
if type(out.cool) == 'table' then
  for model, v in pairs(out.cool) do
    if v[1] > now then live[model] = v end
  end
end
out.cool = live
local s = cjson.encode(out)
if s ~= cur then
  redis.call('HSET', KEYS[1], ARGV[1], s)
  redis.call('PUBLISH', KEYS[2], 'k' .. ARGV[1] .. ' ' .. s)
end
return s
"#,
    )
});

/// Counts one request in a limit's window. KEYS: the window's counter; ARGV: its lifetime (s).
pub(super) static LIMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"#,
    )
});

/// Saves the fleet's edits if this editor still holds the lock, releases it, announces the
/// new version. KEYS: lock, edits hash, channel; ARGV: lock token, sealed edits (empty: just
/// release). Returns the new version, 0 when only released, -1 when the lock was lost.
static WRITE_EDITS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
if ARGV[2] == '' then return 0 end
redis.call('HSET', KEYS[2], 'data', ARGV[2], 'version', ARGV[3])
redis.call('PUBLISH', KEYS[3], 'o' .. ARGV[3])
return tonumber(ARGV[3])
"#,
    )
});

/// Puts this instance's copy of the edits back when Redis has none or an older one (it lost
/// them, or an instance with an older copy put that back first), and announces it. KEYS:
/// edits hash, channel; ARGV: sealed edits, their version.
static RESTORE_EDITS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if v >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'version', ARGV[2])
redis.call('PUBLISH', KEYS[2], 'o' .. ARGV[2])
return 1
"#,
    )
});

/// How long an editor may hold the fleet's edit lock.
const EDIT_LOCK_MS: u64 = 5_000;
/// Usage and members are kept this long (past the logs' longest default retention).
const USAGE_TTL_S: i64 = 9 * 86_400;
/// A member silent this long leaves the members hash.
const MEMBER_GONE_MS: u64 = 3_600_000;
/// The fleet's usage is read every this many heartbeats.
const USAGE_EVERY: u64 = 3;
/// Files and uploads that are over leave Redis every this many heartbeats.
const PRUNE_EVERY: u64 = 60;
/// An upload not finished within a day is forgotten.
const UPLOAD_GONE_MS: u64 = 86_400_000;
/// How long the fleet remembers that a session or an upload was closed (longer than either
/// lives), so that no instance's sync brings it back.
const CLOSED_TTL_S: i64 = 25 * 3_600;

/// Runs the link for the life of the process.
pub(super) async fn run(fleet: Arc<Fleet>, mut ops: Receiver<Op>) {
    let mut wait = Duration::from_millis(200);
    // Changes made while Redis was away, written first by the next full sync.
    let mut held: Vec<Op> = Vec::new();
    loop {
        let error = match connect(&fleet).await {
            Ok((conn, pubsub)) => {
                wait = Duration::from_millis(200);
                serve(&fleet, conn, pubsub, &mut ops, &mut held).await
            }
            Err(e) => e.to_string(),
        };
        fleet.went_down(error);
        let until = tokio::time::Instant::now() + wait;
        while let Ok(Some(op)) = tokio::time::timeout_at(until, ops.recv()).await {
            fleet.queued.fetch_sub(1, Ordering::Relaxed);
            hold(&fleet, &mut held, op);
        }
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

/// Keeps `op` for the next full sync; past [`super::QUEUE`] additions, an addition is dropped
/// (the full sync writes what exists anyway); a removal, which it could not redo, never is.
fn hold(fleet: &Fleet, held: &mut Vec<Op>, op: Op) {
    if op.adds() && held.iter().filter(|o| o.adds()).count() >= super::QUEUE {
        fleet.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    held.push(op);
}

async fn connect(fleet: &Fleet) -> RedisResult<(MultiplexedConnection, redis::aio::PubSub)> {
    let timeout = Some(Duration::from_secs(2));
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout);
    let mut conn = fleet
        .client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), fleet.client.get_async_pubsub())
        .await
        .map_err(|_| timed_out())??;
    tokio::time::timeout(
        Duration::from_secs(2),
        pubsub.subscribe(fleet.names.of("events")),
    )
    .await
    .map_err(|_| timed_out())??;
    for script in [&*MERGE, &*LIMIT, &*WRITE_EDITS, &*RESTORE_EDITS] {
        script.prepare_invoke().load_async(&mut conn).await?;
    }
    Ok((conn, pubsub))
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// Serves one connection until it fails; returns why.
async fn serve(
    fleet: &Arc<Fleet>,
    mut conn: MultiplexedConnection,
    pubsub: redis::aio::PubSub,
    ops: &mut Receiver<Op>,
    held: &mut Vec<Op>,
) -> String {
    // Subscribed first, synced second: nothing announced in between is missed.
    if !held.is_empty() {
        if let Err(e) = write_ops(fleet, &mut conn, held).await {
            return e.to_string();
        }
        held.clear();
    }
    if let Err(e) = full_sync(fleet, &mut conn).await {
        return e.to_string();
    }
    let mut written = HashMap::new();
    let mut beats = 0;
    if let Err(e) = heartbeat(fleet, &mut conn, &mut written, beats).await {
        return e.to_string();
    }
    fleet.came_up(conn.clone());
    // The subscription's own connection is pinged with every heartbeat: one that died
    // silently (a half-open socket) would otherwise stop the fleet's news without an error.
    let (mut sink, mut messages) = pubsub.split();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    loop {
        let step: RedisResult<()> = tokio::select! {
            msg = messages.next() => match msg {
                Some(msg) => match on_message(fleet, msg.get_payload_bytes()) {
                    Some(Follow::Edits) => pull_edits(fleet, &mut conn).await,
                    None => Ok(()),
                },
                None => return "the subscription ended".to_owned(),
            },
            Some(op) = ops.recv() => {
                let mut batch = vec![op];
                while batch.len() < 512 {
                    match ops.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                fleet.queued.fetch_sub(batch.len(), Ordering::Relaxed);
                let written = write_ops(fleet, &mut conn, &batch).await;
                if written.is_err() {
                    // Written again, first, when Redis is back (the writes repeat harmlessly).
                    held.extend(batch);
                }
                written
            }
            _ = tick.tick() => {
                let changed = fleet.registry.take_unshared();
                push_keys(fleet, &mut conn, changed).await
            }
            _ = beat.tick() => {
                beats += 1;
                let beaten = beat_both(fleet, &mut conn, &mut sink, &mut written, beats).await;
                match beaten {
                    Ok(true) if !fleet.resync.swap(false, Ordering::Relaxed) => Ok(()),
                    // Redis lost the fleet's state (restarted empty), or changes were dropped.
                    Ok(_) => {
                        written.clear();
                        full_sync(fleet, &mut conn).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = step {
            return e.to_string();
        }
    }
}

/// The heartbeat `beat` (counting from 0), a ping of the subscription's connection, and now
/// and then the removal of files and uploads that are over.
async fn beat_both(
    fleet: &Fleet,
    conn: &mut MultiplexedConnection,
    sink: &mut redis::aio::PubSubSink,
    written: &mut HashMap<String, Counts>,
    beat: u64,
) -> RedisResult<bool> {
    tokio::time::timeout(Duration::from_secs(2), sink.ping::<()>())
        .await
        .map_err(|_| timed_out())??;
    if beat % PRUNE_EVERY == PRUNE_EVERY - 1 {
        pull_files(fleet, conn).await?;
    }
    heartbeat(fleet, conn, written, beat).await
}

/// What a message asks the link to do next.
enum Follow {
    Edits,
}

/// Takes in a message of the fleet's channel.
fn on_message(fleet: &Fleet, payload: &[u8]) -> Option<Follow> {
    let (&kind, body) = payload.split_first()?;
    match kind {
        b'k' => {
            let text = std::str::from_utf8(body).ok()?;
            let (id, json) = text.split_once(' ')?;
            take_health(fleet, id, json);
        }
        b'f' => {
            let (id, record): (String, Option<FileWire>) = serde_json::from_slice(body).ok()?;
            take_file(fleet, id, record);
        }
        b'u' => {
            let (id, upload) = open_message::<UploadWire>(fleet, body)?;
            take_upload(fleet, id, upload);
        }
        b's' => {
            let (id, session) = open_message::<SessionWire>(fleet, body)?;
            take_session(fleet, id, session);
        }
        b'o' => return Some(Follow::Edits),
        _ => {}
    }
    None
}

/// A sealed message: an id and its entry (`None`: removed).
fn open_message<T: serde::de::DeserializeOwned>(
    fleet: &Fleet,
    body: &[u8],
) -> Option<(String, Option<T>)> {
    match fleet.seal.open(&fleet.names.of("events"), body) {
        Ok(plain) => serde_json::from_slice(&plain).ok(),
        Err(e) => {
            tracing::warn!(
                "fleet: a message cannot be read ({e}): is GEMGATE_CLUSTER_SECRET the same on every instance?"
            );
            None
        }
    }
}

/// `id` and its entry, sealed for the fleet's channel behind the byte `kind`.
fn sealed_message<T: serde::Serialize>(
    fleet: &Fleet,
    kind: u8,
    id: &str,
    entry: Option<&T>,
) -> Vec<u8> {
    let plain = serde_json::to_vec(&(id, entry)).unwrap_or_default();
    tagged(kind, &fleet.seal.seal(&fleet.names.of("events"), &plain))
}

fn take_health(fleet: &Fleet, id: &str, json: &str) {
    match serde_json::from_str::<KeyHealth>(json) {
        Ok(health) => {
            fleet.registry.state(id).merge(&health, now_ms());
        }
        Err(e) => tracing::warn!(key = id, "fleet: unreadable key health: {e}"),
    }
}

fn take_file(fleet: &Fleet, id: String, record: Option<FileWire>) {
    let files = &fleet.local.files;
    match record {
        Some(r) if r.expires_ms > now_ms() => {
            let record = r.record();
            if files.file(&id).as_ref() != Some(&record) {
                files.insert(id.clone(), record.clone());
                fleet.local.save_file(id, Some(record));
            }
        }
        Some(_) => {}
        None => {
            if files.file(&id).is_some() {
                files.remove(&id);
                fleet.local.save_file(id, None);
            }
        }
    }
}

fn take_upload(fleet: &Fleet, id: String, upload: Option<UploadWire>) {
    let files = &fleet.local.files;
    match upload {
        Some(u) if u.id == id => files.start_upload(
            id,
            crate::keys::owners::Owner {
                key: u.key,
                client: u.client,
            },
        ),
        Some(_) => {}
        None => files.finish_upload(&id),
    }
}

fn take_session(fleet: &Fleet, id: String, session: Option<SessionWire>) {
    let sessions = &fleet.local.sessions;
    match session {
        Some(s) => {
            let now = now_ms();
            let Some(admin) = super::unhex32(&s.admin) else {
                return;
            };
            if s.expires_ms > now && s.id == id {
                let left = Duration::from_millis(s.expires_ms - now);
                sessions.adopt(s.id, s.csrf, admin, left);
            }
        }
        None => sessions.close(&id),
    }
}

/// Writes a batch of changes made here, and announces each.
async fn write_ops(fleet: &Fleet, conn: &mut MultiplexedConnection, ops: &[Op]) -> RedisResult<()> {
    let channel = fleet.names.of("events");
    let mut pipe = redis::pipe();
    for op in ops {
        match op {
            Op::File(id, record) => {
                file_into(&mut pipe, fleet, id, record.as_ref());
                let msg = tagged(
                    b'f',
                    &serde_json::to_vec(&(&id, &record)).unwrap_or_default(),
                );
                pipe.publish(&channel, msg).ignore();
            }
            Op::Upload(id, upload) => {
                sealed_into(&mut pipe, fleet, "uploads", id, upload.as_ref());
                let msg = sealed_message(fleet, b'u', id, upload.as_ref());
                pipe.publish(&channel, msg).ignore();
            }
            Op::Session(id, session) => {
                sealed_into(&mut pipe, fleet, "sessions", id, session.as_ref());
                let msg = sealed_message(fleet, b's', id, session.as_ref());
                pipe.publish(&channel, msg).ignore();
            }
        }
    }
    pipe.query_async::<()>(conn).await
}

fn tagged(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(kind);
    out.extend_from_slice(body);
    out
}

fn file_into(pipe: &mut redis::Pipeline, fleet: &Fleet, id: &str, record: Option<&FileWire>) {
    let files = fleet.names.of("files");
    match record.and_then(|r| serde_json::to_string(r).ok()) {
        Some(json) => pipe.hset(files, id, json).ignore(),
        None => pipe.hdel(files, id).ignore(),
    };
}

/// Entries whose id is a credential (sessions, uploads) are kept in hash `hash` by the digest
/// of their id (names are never sealed), their values (id included) sealed.
fn sealed_into<T: serde::Serialize>(
    pipe: &mut redis::Pipeline,
    fleet: &Fleet,
    hash: &str,
    id: &str,
    entry: Option<&T>,
) {
    let name = fleet.names.of(hash);
    let field = super::hex(&crate::app::session::digest(id));
    match entry.and_then(|e| serde_json::to_vec(e).ok()) {
        Some(plain) => {
            let sealed = fleet.seal.seal(&name, &plain);
            pipe.hset(name, field, sealed).ignore()
        }
        None => {
            // Closed for good: an instance that still has it (it missed the news while Redis
            // was away) must not push it back at its next sync.
            let closed = fleet.names.of(&format!("{hash}-closed"));
            pipe.hdel(name, &field)
                .ignore()
                .hset(&closed, &field, now_ms())
                .ignore()
                .expire(&closed, CLOSED_TTL_S)
                .ignore()
        }
    };
}

/// The digests of the entries of sealed hash `hash` closed anywhere in the fleet.
async fn closed_in(
    fleet: &Fleet,
    conn: &mut MultiplexedConnection,
    hash: &str,
) -> RedisResult<std::collections::HashSet<String>> {
    conn.hkeys(fleet.names.of(&format!("{hash}-closed"))).await
}

/// Whether the entry with id `id` is among `closed` (digests).
fn is_closed(closed: &std::collections::HashSet<String>, id: &str) -> bool {
    !closed.is_empty() && closed.contains(&super::hex(&crate::app::session::digest(id)))
}

/// The live entries of the sealed hash `hash` (see [`sealed_into`]); the ones `live` says are
/// over are deleted. Entries sealed with another secret are another instance's to read (this
/// one is misconfigured, and says so), never to delete.
async fn pull_sealed<T: serde::de::DeserializeOwned>(
    fleet: &Fleet,
    conn: &mut MultiplexedConnection,
    hash: &str,
    live: impl Fn(&T) -> bool,
) -> RedisResult<Vec<T>> {
    let name = fleet.names.of(hash);
    let closed = closed_in(fleet, conn, hash).await?;
    let entries: HashMap<String, Vec<u8>> = conn.hgetall(&name).await?;
    let (mut out, mut gone, mut unreadable) = (Vec::new(), Vec::new(), 0);
    for (field, sealed) in entries {
        if closed.contains(&field) {
            gone.push(field);
            continue;
        }
        let Ok(plain) = fleet.seal.open(&name, &sealed) else {
            unreadable += 1;
            continue;
        };
        match serde_json::from_slice::<T>(&plain) {
            Ok(entry) if live(&entry) => out.push(entry),
            _ => gone.push(field),
        }
    }
    if !gone.is_empty() {
        let _: () = conn.hdel(&name, &gone).await?;
    }
    if unreadable > 0 {
        tracing::error!(
            entries = unreadable,
            hash,
            "fleet: entries in Redis cannot be read: is GEMGATE_CLUSTER_SECRET the same on every instance?"
        );
    }
    Ok(out)
}

/// Merges key states changed here into the fleet's, and the merged results back here.
async fn push_keys(
    fleet: &Fleet,
    conn: &mut MultiplexedConnection,
    states: Vec<(String, Arc<KeyState>)>,
) -> RedisResult<()> {
    let now = now_ms();
    let (keys, channel) = (fleet.names.of("keys"), fleet.names.of("events"));
    for chunk in states.chunks(256) {
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(chunk.len());
        for (id, state) in chunk {
            let health = state.health(now);
            let Ok(json) = serde_json::to_string(&health) else {
                continue;
            };
            pipe.cmd("EVALSHA")
                .arg(MERGE.get_hash())
                .arg(2)
                .arg(&keys)
                .arg(&channel)
                .arg(id)
                .arg(json)
                .arg(now);
            ids.push(id);
        }
        if pipe.is_empty() {
            continue;
        }
        let merged: Vec<String> = pipe.query_async(conn).await?;
        for (id, json) in ids.into_iter().zip(merged) {
            take_health(fleet, id, &json);
        }
    }
    Ok(())
}

/// Pushes this instance's view and pulls the fleet's: on every (re)connect, and when Redis
/// came back empty. Ends by marking the fleet's state as present.
async fn full_sync(fleet: &Fleet, conn: &mut MultiplexedConnection) -> RedisResult<()> {
    let started = Instant::now();
    push_all(fleet, conn).await?;
    let keys = pull_keys(fleet, conn).await?;
    pull_files(fleet, conn).await?;
    pull_sessions(fleet, conn).await?;
    pull_edits(fleet, conn).await?;
    let _: () = conn.set(fleet.names.of("alive"), now_ms()).await?;
    fleet.link().last_sync_ms = Some(now_ms());
    tracing::info!(
        keys,
        took_ms = started.elapsed().as_millis() as u64,
        "fleet: state synced with Redis"
    );
    Ok(())
}

/// Writes this instance's view: key health that is not the default, files, sessions, and the
/// edits if Redis has none (it lost them).
async fn push_all(fleet: &Fleet, conn: &mut MultiplexedConnection) -> RedisResult<()> {
    let now = now_ms();
    fleet.registry.take_unshared();
    let states: Vec<_> = fleet
        .registry
        .all()
        .into_iter()
        .filter(|(_, s)| s.health(now) != KeyHealth::default())
        .collect();
    push_keys(fleet, conn, states).await?;
    let mut pipe = redis::pipe();
    for (id, record) in fleet.local.files.all() {
        file_into(&mut pipe, fleet, &id, Some(&FileWire::of(&record)));
    }
    let (closed_sessions, closed_uploads) = (
        closed_in(fleet, conn, "sessions").await?,
        closed_in(fleet, conn, "uploads").await?,
    );
    for (id, csrf, admin, left) in fleet.local.sessions.all() {
        if is_closed(&closed_sessions, &id) {
            fleet.local.sessions.close(&id);
            continue;
        }
        let wire = SessionWire {
            id: id.clone(),
            csrf,
            admin: super::hex(&admin),
            expires_ms: now + left.as_millis() as u64,
        };
        sealed_into(&mut pipe, fleet, "sessions", &id, Some(&wire));
    }
    for (id, owner) in fleet.local.files.uploads() {
        if is_closed(&closed_uploads, &id) {
            fleet.local.files.finish_upload(&id);
            continue;
        }
        let wire = UploadWire {
            id: id.clone(),
            key: owner.key,
            client: owner.client,
            started_ms: now,
        };
        sealed_into(&mut pipe, fleet, "uploads", &id, Some(&wire));
    }
    if !pipe.is_empty() {
        pipe.query_async::<()>(conn).await?;
    }
    restore_edits(fleet, conn).await
}

/// Merges the fleet's key health here; returns how many keys it has.
async fn pull_keys(fleet: &Fleet, conn: &mut MultiplexedConnection) -> RedisResult<usize> {
    let health: HashMap<String, String> = conn.hgetall(fleet.names.of("keys")).await?;
    for (id, json) in &health {
        take_health(fleet, id, json);
    }
    Ok(health.len())
}

/// Takes the fleet's files and uploads in progress; forgets expired ones in Redis.
async fn pull_files(fleet: &Fleet, conn: &mut MultiplexedConnection) -> RedisResult<()> {
    let now = now_ms();
    let files: HashMap<String, String> = conn.hgetall(fleet.names.of("files")).await?;
    let mut gone = Vec::new();
    for (id, json) in files {
        match serde_json::from_str::<FileWire>(&json) {
            Ok(r) if r.expires_ms > now => take_file(fleet, id, Some(r)),
            _ => gone.push(id),
        }
    }
    if !gone.is_empty() {
        let _: () = conn.hdel(fleet.names.of("files"), &gone).await?;
    }
    let live = |u: &UploadWire| now.saturating_sub(u.started_ms) < UPLOAD_GONE_MS;
    for upload in pull_sealed(fleet, conn, "uploads", live).await? {
        take_upload(fleet, upload.id.clone(), Some(upload));
    }
    Ok(())
}

/// Takes the fleet's live admin sessions; forgets expired ones in Redis.
async fn pull_sessions(fleet: &Fleet, conn: &mut MultiplexedConnection) -> RedisResult<()> {
    let now = now_ms();
    let live = |s: &SessionWire| s.expires_ms > now;
    for session in pull_sealed(fleet, conn, "sessions", live).await? {
        take_session(fleet, session.id.clone(), Some(session));
    }
    Ok(())
}

/// Reads the fleet's edits and applies them here if they are newer; puts this instance's
/// copy back if Redis has an older one.
async fn pull_edits(fleet: &Fleet, conn: &mut MultiplexedConnection) -> RedisResult<()> {
    let sealed: Option<Vec<u8>> = conn.hget(fleet.names.of("edits"), "data").await?;
    let edits = match sealed {
        None => crate::config::edit::FleetEdits::default(),
        Some(sealed) => match fleet.open_edits(&sealed) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("fleet: {e}");
                return Ok(());
            }
        },
    };
    if edits.version < fleet.edits.load().version {
        return restore_edits(fleet, conn).await;
    }
    fleet.take_edits(edits);
    Ok(())
}

/// Puts this instance's edits back in Redis if it has none or older ones.
async fn restore_edits(fleet: &Fleet, conn: &mut MultiplexedConnection) -> RedisResult<()> {
    let edits = fleet.edits.load_full();
    if edits.version == 0 {
        return Ok(());
    }
    let name = fleet.names.of("edits");
    let sealed = fleet
        .seal
        .seal(&name, &serde_json::to_vec(&*edits).unwrap_or_default());
    let _: i64 = RESTORE_EDITS
        .key(&name)
        .key(fleet.names.of("events"))
        .arg(sealed)
        .arg(edits.version)
        .invoke_async(conn)
        .await?;
    Ok(())
}

/// The heartbeat: this member's entry, its usage of today, the members and the fleet's
/// usage read back. Returns whether Redis still holds the fleet's state (`false`: it came
/// back empty).
async fn heartbeat(
    fleet: &Fleet,
    conn: &mut MultiplexedConnection,
    written: &mut HashMap<String, Counts>,
    beat: u64,
) -> RedisResult<bool> {
    let now = now_ms();
    let day = day_of(now);
    let mine = own_usage(fleet, day).await;
    let started = Instant::now();
    let me = Member {
        instance: fleet.instance.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        generation: fleet
            .state
            .get()
            .and_then(std::sync::Weak::upgrade)
            .map_or(0, |s| s.current.load().id),
        heartbeat_ms: now,
        started_ms: fleet.started_ms,
    };
    let members_name = fleet.names.of("members");
    let usage_name = fleet.names.of(&format!("usage:{day}:{}", fleet.instance));
    let usage_members = fleet.names.of(&format!("usage-members:{day}"));
    let mut pipe = redis::pipe();
    pipe.exists(fleet.names.of("alive"));
    pipe.hset(
        &members_name,
        &fleet.instance,
        serde_json::to_string(&me).unwrap_or_default(),
    )
    .ignore();
    let changed: Vec<(String, String)> = mine
        .iter()
        .filter(|(id, c)| written.get(*id) != Some(c))
        .filter_map(|(id, c)| Some((id.clone(), serde_json::to_string(c).ok()?)))
        .collect();
    if !changed.is_empty() {
        pipe.hset_multiple(&usage_name, &changed).ignore();
        pipe.expire(&usage_name, USAGE_TTL_S).ignore();
        pipe.sadd(&usage_members, &fleet.instance).ignore();
        pipe.expire(&usage_members, USAGE_TTL_S).ignore();
    }
    pipe.hgetall(&members_name);
    pipe.smembers(&usage_members);
    let (alive, members, usage_of): (bool, HashMap<String, String>, Vec<String>) =
        pipe.query_async(conn).await?;
    // One round trip, as a limit's count takes: what "slow" is measured on.
    fleet.beat_took(started.elapsed());
    *written = mine;

    take_members(fleet, conn, &members_name, members).await?;
    // Every instance reads every instance's usage: not every second.
    if beat.is_multiple_of(USAGE_EVERY) {
        read_fleet_usage(fleet, conn, day, &usage_of).await?;
    }
    Ok(alive)
}

/// Keeps the members as the heartbeat read them (and how many are live); forgets the ones
/// silent for long.
async fn take_members(
    fleet: &Fleet,
    conn: &mut MultiplexedConnection,
    name: &str,
    members: HashMap<String, String>,
) -> RedisResult<()> {
    let now = now_ms();
    let mut list: Vec<Member> = Vec::new();
    let mut gone = Vec::new();
    for (id, json) in members {
        match serde_json::from_str::<Member>(&json) {
            Ok(m) if now.saturating_sub(m.heartbeat_ms) < MEMBER_GONE_MS => list.push(m),
            _ => gone.push(id),
        }
    }
    if !gone.is_empty() {
        let _: () = conn.hdel(name, gone).await?;
    }
    list.sort_by(|a, b| a.instance.cmp(&b.instance));
    let live = list
        .iter()
        .filter(|m| now.saturating_sub(m.heartbeat_ms) < super::MEMBER_LIVE_MS)
        .count();
    fleet.members_seen.store(live.max(1), Ordering::Relaxed);
    fleet.members.store(Arc::new(list));
    Ok(())
}

/// Adds up the usage of `day` every instance wrote (`instances`), for the admin pages.
async fn read_fleet_usage(
    fleet: &Fleet,
    conn: &mut MultiplexedConnection,
    day: u32,
    instances: &[String],
) -> RedisResult<()> {
    let mut pipe = redis::pipe();
    for instance in instances {
        pipe.hgetall(fleet.names.of(&format!("usage:{day}:{instance}")));
    }
    let all: Vec<HashMap<String, String>> = if pipe.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(conn).await?
    };
    let mut total: HashMap<String, Counts> = HashMap::new();
    for of_one in all {
        for (id, json) in of_one {
            if let Ok(c) = serde_json::from_str::<Counts>(&json) {
                total.entry(id).or_default().merge(&c);
            }
        }
    }
    fleet.usage.store(Some(Arc::new((day, total))));
    Ok(())
}

/// This instance's usage of `day` by key id: saved in its store, and counted since.
async fn own_usage(fleet: &Fleet, day: u32) -> HashMap<String, Counts> {
    let store = fleet.local.store.clone();
    let usage = fleet.local.usage.clone();
    tokio::task::spawn_blocking(move || crate::store::usage::of_day(store.as_deref(), &usage, day))
        .await
        .unwrap_or_default()
}

/// Takes the fleet's edit lock (waiting for another editor's at most its lifetime) and reads
/// the sealed edits.
pub(super) async fn lock_and_read(
    conn: &mut MultiplexedConnection,
    lock: &str,
    edits: &str,
    token: &str,
) -> RedisResult<Option<Vec<u8>>> {
    let deadline = Instant::now() + Duration::from_millis(EDIT_LOCK_MS);
    loop {
        let taken: Option<String> = redis::cmd("SET")
            .arg(lock)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(EDIT_LOCK_MS)
            .query_async(conn)
            .await?;
        if taken.is_some() {
            let read = conn.hget(edits, "data").await;
            if read.is_err() {
                // Best effort: release the lock rather than leave it to expire.
                let _ = write_and_unlock(conn, lock, edits, "", token, None).await;
            }
            return read;
        }
        if Instant::now() > deadline {
            return Err(timed_out());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Saves `sealed` edits of a version (`None`: nothing changed) if the lock is still `token`'s,
/// and releases it. Returns whether it was still held.
pub(super) async fn write_and_unlock(
    conn: &mut MultiplexedConnection,
    lock: &str,
    edits: &str,
    channel: &str,
    token: &str,
    sealed: Option<(Vec<u8>, u64)>,
) -> RedisResult<bool> {
    let (sealed, version) = sealed.unwrap_or_default();
    let done: i64 = WRITE_EDITS
        .key(lock)
        .key(edits)
        .key(channel)
        .arg(token)
        .arg(sealed)
        .arg(version)
        .invoke_async(conn)
        .await?;
    Ok(done >= 0)
}

impl Fleet {
    fn came_up(&self, conn: MultiplexedConnection) {
        self.conn.store(Some(Arc::new(conn)));
        let mut link = self.link();
        if !link.up {
            tracing::info!(redis = %self.redis_shown, "fleet: Redis answers: sharing state with the fleet");
            link.up = true;
            link.since_ms = now_ms();
        }
    }

    fn went_down(&self, error: String) {
        self.conn.store(None);
        self.slow.store(false, Ordering::Relaxed);
        let mut link = self.link();
        if link.up || link.last_error.is_none() {
            tracing::error!(
                redis = %self.redis_shown,
                "fleet: Redis unreachable, serving on this instance's state until it is back: {error}"
            );
            link.since_ms = now_ms();
        }
        link.up = false;
        link.slow = false;
        link.last_error = Some(error);
    }

    fn beat_took(&self, took: Duration) {
        let slow = took > super::SLOW;
        self.slow.store(slow, Ordering::Relaxed);
        let mut link = self.link();
        if slow != link.slow {
            if slow {
                tracing::warn!(took_ms = took.as_millis() as u64, "fleet: Redis is slow");
            } else {
                tracing::info!("fleet: Redis answers in time again");
            }
            link.slow = slow;
        }
    }
}
