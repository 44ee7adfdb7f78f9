//! Projects' quota windows shared by a fleet: every instance counts a limited request in
//! Redis, atomically, so that the fleet together sends no project over its limit.
//!
//! A project's window for a model is one hash, `quota:{project}:{model}`: a field per second
//! for requests (`r<second>`) and for input tokens (`t<second>`), and one for the requests of
//! the Pacific day (`d<end of the day in ms>`). Seconds are forgotten 61 seconds after they
//! began, as in `keys::quota`; the day's field when another day is counted.

use std::sync::LazyLock;

use redis::Script;

use super::{Fleet, LIMIT_WAIT};
use crate::app::shared::{QuotaCheck, QuotaSettle, QuotaVerdict};
use crate::clock;

/// KEYS: the window's hash. ARGV: now (s), rpm, tpm, rpd (0: none), tokens, the day's end
/// (ms), span (s). Returns `{1, 0}` when counted, else `{0, ms at which it may fit}`.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local h = KEYS[1]
local now, rpm, tpm, rpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, day, span = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local all = redis.call('HGETALL', h)
local req, tok, today, oldest = 0, 0, 0, nil
for i = 1, #all, 2 do
  local f, v = all[i], tonumber(all[i + 1])
  local kind, n = string.sub(f, 1, 1), string.sub(f, 2)
  if kind == 'd' then
    if n == day then today = v else redis.call('HDEL', h, f) end
  else
    local sec = tonumber(n)
    if sec == nil or sec + span <= now then
      redis.call('HDEL', h, f)
    else
      if kind == 'r' then req = req + v else tok = tok + v end
      if oldest == nil or sec < oldest then oldest = sec end
    end
  end
end
if rpd > 0 and today + 1 > rpd then return {0, tonumber(day)} end
local over_tokens = tpm > 0 and tok + tokens > math.max(tpm, tokens)
if (rpm > 0 and req + 1 > rpm) or over_tokens then
  return {0, ((oldest or now) + span) * 1000}
end
redis.call('HINCRBY', h, 'r' .. now, 1)
if tokens > 0 then redis.call('HINCRBY', h, 't' .. now, tokens) end
redis.call('HINCRBY', h, 'd' .. day, 1)
redis.call('PEXPIRE', h, 90000000)
return {1, 0}
"#,
    )
});

/// The window's hash of `project` and `model`.
fn window_name(fleet: &Fleet, project: &str, model: &str) -> String {
    fleet.names.of(&format!("quota:{project}:{model}"))
}

impl Fleet {
    /// Counts `check` in the fleet's window; while Redis is away or slow, here with this
    /// instance's share of the limit.
    pub(super) async fn admit_quota_shared(&self, check: &QuotaCheck<'_>) -> QuotaVerdict {
        match self.admit_quota_in_redis(check).await {
            Some(verdict) => verdict,
            None => QuotaVerdict::Here {
                share: self.members_live() as u32,
            },
        }
    }

    async fn admit_quota_in_redis(&self, check: &QuotaCheck<'_>) -> Option<QuotaVerdict> {
        if self.count_here() {
            return None;
        }
        let mut conn = (*self.conn.load_full()?).clone();
        let l = &check.limit;
        let mut admit = ADMIT.key(window_name(self, check.project, check.model));
        admit
            .arg(check.now_ms / 1000)
            .arg(l.rpm.unwrap_or(0))
            .arg(l.tpm.unwrap_or(0))
            .arg(l.rpd.unwrap_or(0))
            .arg(check.tokens)
            .arg(clock::next_pacific_midnight_ms(check.now_ms))
            .arg(crate::keys::quota::SPAN_S);
        let answer: redis::RedisResult<(u8, u64)> =
            tokio::time::timeout(LIMIT_WAIT, admit.invoke_async(&mut conn))
                .await
                .ok()?;
        match answer {
            Ok((1, _)) => Some(QuotaVerdict::Admitted),
            Ok((_, at_ms)) => Some(QuotaVerdict::Denied {
                at_ms: at_ms.max(check.now_ms + 1),
            }),
            Err(e) => {
                tracing::debug!("fleet: a quota was counted locally: {e}");
                None
            }
        }
    }

    /// Moves a counted request to the second its attempt ended in, with its reported tokens,
    /// off the request path.
    pub(super) fn settle_quota_shared(&self, settle: &QuotaSettle<'_>) {
        if settle.from_second == settle.to_second && settle.estimate == settle.tokens {
            return;
        }
        let (Some(conn), Ok(runtime)) =
            (self.conn.load_full(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let mut conn = (*conn).clone();
        let name = window_name(self, settle.project, settle.model);
        let mut moves = redis::pipe();
        moves
            .hincr(&name, format!("r{}", settle.from_second), -1)
            .ignore()
            .hincr(&name, format!("r{}", settle.to_second), 1)
            .ignore()
            .hincr(
                &name,
                format!("t{}", settle.from_second),
                -(settle.estimate as i64),
            )
            .ignore()
            .hincr(
                &name,
                format!("t{}", settle.to_second),
                settle.tokens as i64,
            )
            .ignore();
        runtime.spawn(async move {
            let done: Result<redis::RedisResult<()>, _> =
                tokio::time::timeout(LIMIT_WAIT * 10, moves.query_async(&mut conn)).await;
            if let Ok(Err(e)) = done {
                tracing::debug!("fleet: a quota settlement was lost: {e}");
            }
        });
    }
}
