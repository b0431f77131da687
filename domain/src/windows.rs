//! Maintenance windows: the times, in a time zone, when a wave may run.
//!
//! A window is a time of day span (`02:00`-`05:00`; one that ends before it
//! starts runs past midnight) on some days of the week (all by default, the
//! day being the one it starts on), in an IANA time zone. A wave starts
//! only at a time when its expected length (its steps' time limits, batch
//! after batch of `max_in_flight` hosts, plus its bake) fits, whole, inside
//! one window of every set that applies to it (the plan's, and each site
//! rule's for the groups of its hosts). The time is always given: nothing
//! here reads a clock.

use std::time::Duration;

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _};
use serde::{Deserialize, Serialize};

/// A window as a plan or a site rule writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowDoc {
    days: Option<Vec<String>>,
    start: Option<String>,
    end: Option<String>,
    tz: Option<String>,
}

/// Windows as written, checked: each problem reported at its window.
pub(crate) fn from_docs(
    file: &str,
    docs: Vec<serde_saphyr::Spanned<WindowDoc>>,
    field: &str,
    v: &mut Vec<crate::violation::Violation>,
) -> Vec<Window> {
    let mut out = Vec::new();
    for (i, d) in docs.into_iter().enumerate() {
        let loc = crate::yaml::loc_of(file, &d);
        let d = d.value;
        let (Some(start), Some(end)) = (d.start, d.end) else {
            v.push(
                crate::violation::Violation::new(
                    crate::violation::Code::ParseError,
                    format!("`{field}[{i}]` needs `start` and `end`"),
                )
                .at(&loc)
                .field(format!("{field}[{i}]"))
                .fix("write a window like `{start: \"02:00\", end: \"05:00\", tz: Europe/Berlin}`"),
            );
            continue;
        };
        let w = Window {
            days: d.days.unwrap_or_default(),
            start,
            end,
            tz: d.tz.unwrap_or_else(|| "UTC".into()),
        };
        match check(&w) {
            Ok(()) => out.push(w),
            Err(why) => v.push(
                crate::violation::Violation::new(crate::violation::Code::ParseError, format!("`{field}[{i}]`: {why}"))
                    .at(&loc)
                    .field(format!("{field}[{i}]"))
                    .fix("`days` (mon..sun, optional), `start` and `end` (HH:MM), `tz` (an IANA name; default UTC)"),
            ),
        }
    }
    out
}

/// One window, as written and checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Days it starts on, `mon`..`sun`; empty: every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// `HH:MM` or `HH:MM:SS`.
    pub start: String,
    /// `HH:MM` or `HH:MM:SS`; before `start`: the next day.
    pub end: String,
    /// IANA time zone name (`Europe/Berlin`, `UTC`).
    pub tz: String,
}

/// A set of windows that applies to a wave, and where it comes from
/// (`plan`, `policy:<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSet {
    /// `plan` or `policy:<rule id>`.
    pub source: String,
    /// Its windows: a wave fits the set when it fits one of them.
    pub windows: Vec<Window>,
}

impl WindowSet {
    /// For people: `plan: daily 02:00-05:00 Europe/Berlin, sat 22:00-02:00 UTC`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {}",
            self.source,
            self.windows.iter().map(describe).collect::<Vec<_>>().join(", ")
        )
    }
}

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

/// A time of day, `HH:MM` or `HH:MM:SS`.
pub fn parse_time(s: &str) -> Result<Time, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str, max: i8| -> Option<i8> {
        (p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse::<i8>().ok())
            .flatten()
            .filter(|n| *n <= max)
    };
    let (h, m, sec) = match parts.as_slice() {
        [h, m] => (num(h, 23), num(m, 59), Some(0)),
        [h, m, s] => (num(h, 23), num(m, 59), num(s, 59)),
        _ => (None, None, None),
    };
    match (h, m, sec) {
        (Some(h), Some(m), Some(sec)) => Time::new(h, m, sec, 0).map_err(|e| e.to_string()),
        _ => Err(format!("`{s}` is not a time of day: write HH:MM, like 02:00")),
    }
}

/// Check a window; the message says what is wrong.
pub fn check(w: &Window) -> Result<(), String> {
    for d in &w.days {
        if !DAYS.iter().any(|(n, _)| n == d) {
            return Err(format!("`{d}` is not a day: write mon, tue, wed, thu, fri, sat or sun"));
        }
    }
    let (s, e) = (parse_time(&w.start)?, parse_time(&w.end)?);
    if s == e {
        return Err(format!("the window starts and ends at {}: it has no length", w.start));
    }
    TimeZone::get(&w.tz).map_err(|_| {
        format!(
            "`{}` is not a time zone wavegate knows: write an IANA name like Europe/Berlin or UTC",
            w.tz
        )
    })?;
    Ok(())
}

/// How long one occurrence of the window lasts (at most a day).
pub fn length(w: &Window) -> Duration {
    let (Ok(s), Ok(e)) = (parse_time(&w.start), parse_time(&w.end)) else {
        return Duration::ZERO;
    };
    let secs = |t: Time| i64::from(t.hour()) * 3600 + i64::from(t.minute()) * 60 + i64::from(t.second());
    let d = (secs(e) - secs(s)).rem_euclid(86_400);
    Duration::from_secs(d as u64)
}

/// The occurrences of `w` that start between a day before `from` and a
/// week after it, as Unix milliseconds `[start, end)`.
fn occurrences(w: &Window, from_ms: i64) -> Vec<(i64, i64)> {
    let (Ok(tz), Ok(s), Ok(e)) = (TimeZone::get(&w.tz), parse_time(&w.start), parse_time(&w.end)) else {
        return Vec::new();
    };
    let Ok(from) = Timestamp::from_millisecond(from_ms) else {
        return Vec::new();
    };
    let today = from.to_zoned(tz.clone()).date();
    let mut out = Vec::new();
    for offset in -1..=8i64 {
        let Ok(day) = today.checked_add(offset.days()) else {
            continue;
        };
        if !w.days.is_empty()
            && !w
                .days
                .iter()
                .any(|d| DAYS.iter().any(|(n, wd)| n == d && *wd == day.weekday()))
        {
            continue;
        }
        let end_day = if e > s { Ok(day) } else { day.checked_add(1.day()) };
        let (Ok(start), Ok(end_day)) = (day.to_datetime(s).to_zoned(tz.clone()), end_day) else {
            continue;
        };
        let Ok(end) = end_day.to_datetime(e).to_zoned(tz.clone()) else {
            continue;
        };
        out.push((start.timestamp().as_millisecond(), end.timestamp().as_millisecond()));
    }
    out
}

/// Whether `[at, at + need)` lies inside one window of the set.
fn fits(set: &WindowSet, at: i64, need: i64) -> Option<i64> {
    set.windows
        .iter()
        .flat_map(|w| occurrences(w, at))
        .filter(|(s, e)| *s <= at && at + need <= *e)
        .map(|(_, e)| e)
        .max()
}

/// When a wave expected to take `need` can start, at `now` or later, so
/// that it lies whole inside a window of every set: `(start, the earliest
/// end of the windows it runs in)` in Unix milliseconds, or `None` when no
/// time in the next week does (the windows are too short for it, or never
/// meet).
pub fn next_start(sets: &[WindowSet], now_ms: i64, need: Duration) -> Option<(i64, i64)> {
    let need = i64::try_from(need.as_millis()).unwrap_or(i64::MAX);
    if sets.is_empty() {
        return Some((now_ms, i64::MAX));
    }
    let mut candidates: Vec<i64> = vec![now_ms];
    for set in sets {
        for w in &set.windows {
            candidates.extend(
                occurrences(w, now_ms)
                    .into_iter()
                    .map(|(s, _)| s)
                    .filter(|s| *s > now_ms),
            );
        }
    }
    candidates.sort_unstable();
    candidates.dedup();
    candidates.into_iter().find_map(|at| {
        let ends: Option<Vec<i64>> = sets.iter().map(|set| fits(set, at, need)).collect();
        ends.and_then(|e| e.into_iter().min()).map(|end| (at, end))
    })
}

/// A window for people: `mon-fri 02:00-05:00 Europe/Berlin`.
pub fn describe(w: &Window) -> String {
    let days = if w.days.is_empty() {
        "daily".to_owned()
    } else {
        w.days.join(",")
    };
    format!("{days} {}-{} {}", w.start, w.end, w.tz)
}

/// A Unix millisecond time in a window's zone, for people.
pub fn local(ms: i64, tz: &str) -> String {
    match (Timestamp::from_millisecond(ms), TimeZone::get(tz)) {
        (Ok(t), Ok(z)) => t.to_zoned(z).strftime("%Y-%m-%d %H:%M:%S %Z").to_string(),
        (Ok(t), Err(_)) => t.to_string(),
        _ => ms.to_string(),
    }
}

/// A Unix millisecond time in UTC, RFC 3339.
pub fn utc(ms: i64) -> String {
    Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(days: &[&str], start: &str, end: &str, tz: &str) -> Window {
        Window {
            days: days.iter().map(|d| (*d).to_owned()).collect(),
            start: start.into(),
            end: end.into(),
            tz: tz.into(),
        }
    }

    fn at(s: &str) -> i64 {
        s.parse::<Timestamp>().expect("timestamp").as_millisecond()
    }

    fn set(ws: Vec<Window>) -> WindowSet {
        WindowSet {
            source: "plan".into(),
            windows: ws,
        }
    }

    #[test]
    fn a_wave_starts_now_inside_a_window_or_waits_for_the_next_that_fits_it() {
        // 02:00-05:00 in Berlin (UTC+1 in December): 01:00-04:00 UTC.
        let night = set(vec![w(&[], "02:00", "05:00", "Europe/Berlin")]);
        let hour = Duration::from_secs(3600);
        // Inside, with room: now.
        let now = at("2026-12-07T01:30:00Z");
        assert_eq!(
            next_start(std::slice::from_ref(&night), now, hour),
            Some((now, at("2026-12-07T04:00:00Z")))
        );
        // Inside, but two hours do not fit before 05:00: tomorrow at 02:00.
        let late = at("2026-12-07T02:30:00Z");
        assert_eq!(
            next_start(std::slice::from_ref(&night), late, 2 * hour),
            Some((at("2026-12-08T01:00:00Z"), at("2026-12-08T04:00:00Z")))
        );
        // Four hours never fit a three-hour window.
        assert_eq!(next_start(std::slice::from_ref(&night), now, 4 * hour), None);
        // Business hours: waits for the night.
        let noon = at("2026-12-07T11:00:00Z");
        assert_eq!(
            next_start(&[night], noon, hour).map(|(s, _)| s),
            Some(at("2026-12-08T01:00:00Z"))
        );
    }

    #[test]
    fn days_midnight_and_two_sets_at_once() {
        // Saturday night into Sunday, UTC: Sat 22:00 - Sun 02:00.
        let weekend = set(vec![w(&["sat"], "22:00", "02:00", "UTC")]);
        // Monday 2026-12-07: next is Saturday 12th 22:00.
        let mon = at("2026-12-07T10:00:00Z");
        let (s, e) = next_start(std::slice::from_ref(&weekend), mon, Duration::from_secs(3 * 3600)).expect("fits");
        assert_eq!((s, e), (at("2026-12-12T22:00:00Z"), at("2026-12-13T02:00:00Z")));
        // A site rule's window too: only where both hold.
        let site = WindowSet {
            source: "policy:nights".into(),
            windows: vec![w(&[], "23:00", "04:00", "UTC")],
        };
        let (s, e) = next_start(&[weekend, site], mon, Duration::from_secs(3600)).expect("fits");
        assert_eq!((s, e), (at("2026-12-12T23:00:00Z"), at("2026-12-13T02:00:00Z")));
    }

    #[test]
    fn windows_are_checked() {
        assert!(check(&w(&["mon"], "02:00", "05:00", "Europe/Berlin")).is_ok());
        assert!(check(&w(&["monday"], "02:00", "05:00", "UTC")).is_err());
        assert!(check(&w(&[], "2:00", "05:00", "UTC")).is_err());
        assert!(check(&w(&[], "02:00", "24:00", "UTC")).is_err());
        assert!(check(&w(&[], "02:00", "02:00", "UTC")).is_err());
        let tz = check(&w(&[], "02:00", "05:00", "Mars/Olympus")).expect_err("unknown zone");
        assert!(tz.contains("IANA"), "{tz}");
        assert_eq!(length(&w(&[], "22:00", "02:00", "UTC")), Duration::from_secs(4 * 3600));
    }
}
