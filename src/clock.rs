//! Wall-clock helpers: milliseconds since the epoch, how far the wall clock has been stepped
//! since the process began, RFC 3339 times, and the next daily quota reset (midnight in
//! America/Los_Angeles). Dates, time zones and their daylight-saving rules are `jiff`'s, with
//! its time-zone database built in: a slim container needs no tzdata.

use std::sync::LazyLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Google's quota day: midnight Pacific time.
static PACIFIC: LazyLock<TimeZone> = LazyLock::new(|| {
    TimeZone::get("America/Los_Angeles").unwrap_or_else(|_| TimeZone::fixed(jiff::tz::offset(-8)))
});

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall clock and the monotonic clock, read together the first time they are compared
/// (the process's first quota decision: a step before it moves nothing already counted).
static ORIGIN: LazyLock<(u64, Instant)> = LazyLock::new(|| (now_ms(), Instant::now()));

/// How far the wall clock has been stepped since [`ORIGIN`], in whole seconds (as ms;
/// positive: set forward). Both clocks run at the same rate (NTP slews them alike), so this
/// moves only when the wall clock is set: by NTP correcting a large error, or by a virtual
/// machine restored from a snapshot. The two clocks are read one after the other; rounding to
/// whole seconds keeps the microseconds between the readings out of the answer.
pub fn wall_steps_ms() -> i64 {
    let (wall0, start) = *ORIGIN;
    let steady = i128::from(wall0) + start.elapsed().as_millis() as i128;
    whole_seconds(i128::from(now_ms()) - steady)
}

/// `ms` rounded to the nearest whole second (half a second away from zero), as ms.
fn whole_seconds(ms: i128) -> i64 {
    let rounded = ms.saturating_add(ms.signum() * 500) / 1000 * 1000;
    i64::try_from(rounded).unwrap_or(if ms > 0 { i64::MAX } else { i64::MIN })
}

/// The instant `ms` milliseconds after the epoch, within what `jiff` represents (year 9999).
fn timestamp(ms: u64) -> Timestamp {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::MAX)
}

/// `ms` as an RFC 3339 UTC time with milliseconds: `2026-11-26T09:01:20.123Z`.
pub fn rfc3339(ms: u64) -> String {
    format!("{:.3}", timestamp(ms))
}

/// Parses an RFC 3339 time (`2026-11-26T09:01:20Z`, `2026-11-26T09:01:20.123+01:00`) into
/// milliseconds since the epoch; `None` for anything else, or a time before 1970.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let ts: Timestamp = s.parse().ok()?;
    u64::try_from(ts.as_millisecond()).ok()
}

/// The first instant after `now_ms` at which it is midnight in Pacific time.
pub fn next_pacific_midnight_ms(now_ms: u64) -> u64 {
    let now = timestamp(now_ms).to_zoned(PACIFIC.clone());
    now.date()
        .tomorrow()
        .and_then(|day| day.to_zoned(PACIFIC.clone()))
        .ok()
        .and_then(|midnight| u64::try_from(midnight.timestamp().as_millisecond()).ok())
        .unwrap_or(now_ms.saturating_add(86_400_000))
}

/// `YYYY-MM-DDTHH:MM:SS` for a Unix time in seconds (UTC).
pub fn utc_seconds(secs: u64) -> String {
    let ts = timestamp(secs.saturating_mul(1000));
    ts.strftime("%Y-%m-%dT%H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(
            parse_rfc3339("2026-11-26T09:01:20.123Z")
                .map(rfc3339)
                .as_deref(),
            Some("2026-11-26T09:01:20.123Z")
        );
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:01+01:00"), Some(1000));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1795683680123), "2026-11-26T09:01:20.123Z");
        assert_eq!(
            parse_rfc3339("2026-11-26T09:01:20.5Z"),
            parse_rfc3339("2026-11-26T09:01:20.500Z")
        );
        assert!(
            rfc3339(u64::MAX).starts_with("9999-12-"),
            "the last time jiff holds"
        );
        assert_eq!(utc_seconds(1795683680), "2026-11-26T09:01:20");
    }

    #[test]
    fn steps_of_the_wall_clock_count_in_whole_seconds() {
        for (offset, steps) in [
            (0, 0),
            (3, 0),
            (-499, 0),
            (499, 0),
            (500, 1000),
            (-120_400, -120_000),
            (86_400_700, 86_401_000),
            (i128::MAX, i64::MAX),
            (i128::MIN, i64::MIN),
        ] {
            assert_eq!(whole_seconds(offset), steps, "{offset}");
        }
    }

    #[test]
    fn odd_times_are_refused_never_a_panic() {
        for odd in [
            "2026-11-26T09:01:20.é1Z",
            "2026-11-26T09:01:20.1éZ",
            "2026-11-26T09:01:20.😀Z",
            "2026-11-26T09:01:-1Z",
            "-9999999999999-01-01T00:00:00Z",
            "99999999999999999-01-01T00:00:00Z",
            "2026-11-26T99999999999999:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-02-30T00:00:00Z",
            "T::.Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(odd), None, "{odd}");
        }
    }

    fn utc(s: &str) -> u64 {
        parse_rfc3339(s).unwrap()
    }

    #[test]
    fn midnight_pacific_in_summer_and_winter() {
        // 05:00 PDT: the next midnight is 07:00 UTC.
        assert_eq!(
            next_pacific_midnight_ms(utc("2026-07-01T12:00:00Z")),
            utc("2026-07-02T07:00:00Z")
        );
        // 19:00 PST on the 14th: midnight is 08:00 UTC.
        assert_eq!(
            next_pacific_midnight_ms(utc("2026-01-15T03:00:00Z")),
            utc("2026-01-15T08:00:00Z")
        );
        // Exactly at midnight, the next one is a day on.
        assert_eq!(
            next_pacific_midnight_ms(utc("2026-01-15T08:00:00Z")),
            utc("2026-01-16T08:00:00Z")
        );
    }

    #[test]
    fn dst_boundaries_2026() {
        // DST 2026: March 8 to November 1. The night it starts, midnight March 9 is 07:00 UTC;
        // the night it ends, midnight November 2 is 08:00 UTC.
        assert_eq!(
            next_pacific_midnight_ms(utc("2026-03-08T12:00:00Z")),
            utc("2026-03-09T07:00:00Z")
        );
        assert_eq!(
            next_pacific_midnight_ms(utc("2026-11-01T12:00:00Z")),
            utc("2026-11-02T08:00:00Z")
        );
    }
}
