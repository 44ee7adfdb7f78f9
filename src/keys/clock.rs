//! Wall-clock helpers: milliseconds since the epoch, and the next daily quota reset (midnight
//! in America/Los_Angeles, with the US daylight-saving rules).

use std::time::{SystemTime, UNIX_EPOCH};

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ms` as an RFC 3339 UTC time with milliseconds: `2026-11-26T09:01:20.123Z`.
pub fn rfc3339(ms: u64) -> String {
    let ms = ms as i64;
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    let in_day = ms.rem_euclid(DAY_MS);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / HOUR_MS,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000
    )
}

/// Parses `2026-11-26T09:01:20Z` or `2026-11-26T09:01:20.123Z` (UTC only).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    // Milliseconds: the first three digits of the fraction (a shorter one padded with zeros).
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    if !(0..=9999).contains(&y) || h < 0 || min < 0 || sec < 0 {
        return None;
    }
    let days = days_from_civil(y, m, day);
    u64::try_from(days * DAY_MS + h * HOUR_MS + min * 60_000 + sec * 1000 + ms).ok()
}

/// The first instant after `now_ms` at which it is midnight in Pacific time.
pub fn next_pacific_midnight_ms(now_ms: u64) -> u64 {
    let now = now_ms as i64;
    // Local midnight is 07:00 or 08:00 UTC; try the UTC days around `now` in order.
    let utc_day = now.div_euclid(DAY_MS);
    for day in utc_day - 1..=utc_day + 2 {
        for offset_h in [7, 8] {
            let candidate = day * DAY_MS + offset_h * HOUR_MS;
            if candidate > now && pacific_offset_hours(candidate) == -offset_h {
                return candidate as u64;
            }
        }
    }
    (now + DAY_MS) as u64 // unreachable with a sane clock
}

/// UTC offset of Pacific time at the instant `ms`: -7 in daylight time, -8 otherwise.
/// DST runs from the second Sunday of March, 02:00 PST (10:00 UTC), to the first Sunday of
/// November, 02:00 PDT (09:00 UTC).
fn pacific_offset_hours(ms: i64) -> i64 {
    let (year, ..) = civil_from_days(ms.div_euclid(DAY_MS));
    let start = (nth_sunday(year, 3, 2) * DAY_MS) + 10 * HOUR_MS;
    let end = (nth_sunday(year, 11, 1) * DAY_MS) + 9 * HOUR_MS;
    if ms >= start && ms < end {
        -7
    } else {
        -8
    }
}

/// Days since the epoch of the `n`th Sunday of `month` in `year`.
fn nth_sunday(year: i64, month: i64, n: i64) -> i64 {
    let first = days_from_civil(year, month, 1);
    let weekday = (first + 4).rem_euclid(7); // 1970-01-01 was a Thursday (4); Sunday is 0
    first + (7 - weekday) % 7 + (n - 1) * 7
}

// Howard Hinnant's civil-date algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of the day `z` days after 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
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
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1795683680123), "2026-11-26T09:01:20.123Z");
        assert_eq!(
            parse_rfc3339("2026-11-26T09:01:20.5Z"),
            parse_rfc3339("2026-11-26T09:01:20.500Z")
        );
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
            "T::.Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(odd), None, "{odd}");
        }
    }

    fn utc(y: i64, mo: i64, d: i64, h: i64) -> u64 {
        (days_from_civil(y, mo, d) * DAY_MS + h * HOUR_MS) as u64
    }

    #[test]
    fn midnight_pacific_in_summer_and_winter() {
        // 2026-07-01 12:00 UTC is 05:00 PDT: next midnight is 2026-07-02 07:00 UTC.
        assert_eq!(
            next_pacific_midnight_ms(utc(2026, 7, 1, 12)),
            utc(2026, 7, 2, 7)
        );
        // 2026-01-15 03:00 UTC is 19:00 PST on the 14th: midnight is 2026-01-15 08:00 UTC.
        assert_eq!(
            next_pacific_midnight_ms(utc(2026, 1, 15, 3)),
            utc(2026, 1, 15, 8)
        );
    }

    #[test]
    fn dst_boundaries_2026() {
        // DST 2026: March 8 to November 1.
        assert_eq!(nth_sunday(2026, 3, 2), days_from_civil(2026, 3, 8));
        assert_eq!(nth_sunday(2026, 11, 1), days_from_civil(2026, 11, 1));
        // The night DST ends, midnight Nov 2 local is 08:00 UTC.
        assert_eq!(
            next_pacific_midnight_ms(utc(2026, 11, 1, 12)),
            utc(2026, 11, 2, 8)
        );
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }
}
