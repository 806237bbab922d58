//! Retention policies: which snapshots `forget` keeps. Pure: a policy and
//! a list of timestamped, tagged items in, one decision per item with its
//! reasons out; no repository, no clock (the caller passes the time zone
//! calendar periods are counted in).
//!
//! The rules are restic's documented ones (`restic forget`):
//!
//! - Items are walked newest first. `--keep-last N` keeps the N newest.
//! - `--keep-hourly/daily/weekly/monthly/yearly N` keep the newest item of
//!   each of the last N periods that hold an item (periods are counted back
//!   from the newest item, not from now; weeks are ISO 8601 weeks). A
//!   period without an item does not count.
//! - `--keep-within D` keeps every item newer than the newest item's time
//!   minus D (`1y5m7d2h`: years, months, days, hours); `--keep-within-hourly
//!   D` (and daily, ...) keeps the newest item of each period within D.
//! - `--keep-tag T[,T...]` keeps every item carrying all the tags of one of
//!   the lists; tagged items do not use up a count.
//! - When a counted or `within` rule has periods left after the walk (there
//!   were fewer periods than asked for), the oldest item is kept as well
//!   ("oldest daily snapshot"): it is the longest history the rule allows.
//! - An item kept by several rules lists every reason; an empty policy keeps
//!   everything (the caller refuses to run one).

use std::collections::BTreeSet;
use std::fmt;

use chrono::{DateTime, Datelike, Duration, Months, TimeZone, Timelike, Utc};

/// How many periods a counted rule keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Last(u32),
    Unlimited,
}

impl Count {
    /// `N` (a positive integer) or `unlimited`.
    pub fn parse(text: &str) -> Result<Count, PolicyError> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("unlimited") || t == "-1" {
            return Ok(Count::Unlimited);
        }
        match t.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Count::Last(n)),
            _ => Err(PolicyError::BadCount(text.to_string())),
        }
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Count::Last(n) => write!(f, "{n}"),
            Count::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// A calendar span, `1y5m7d2h` (restic's duration syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub years: u32,
    pub months: u32,
    pub days: u32,
    pub hours: u32,
}

impl Span {
    /// Parses `[Ny][Nm][Nd][Nh]` with at least one part, each unit at most once.
    pub fn parse(text: &str) -> Result<Span, PolicyError> {
        let bad = || PolicyError::BadSpan(text.to_string());
        let mut span = Span::default();
        let mut seen = BTreeSet::new();
        let mut digits = String::new();
        for c in text.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: u32 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            if !seen.insert(c) {
                return Err(bad());
            }
            match c {
                'y' => span.years = n,
                'm' => span.months = n,
                'd' => span.days = n,
                'h' => span.hours = n,
                _ => return Err(bad()),
            }
        }
        if !digits.is_empty() || seen.is_empty() {
            return Err(bad());
        }
        Ok(span)
    }

    /// `time` minus this span, calendar-wise (a month back from 31 March
    /// is the last day of February). Saturates at the earliest time.
    fn before<Tz: TimeZone>(&self, time: &DateTime<Tz>) -> DateTime<Utc> {
        let utc = time.with_timezone(&Utc);
        let months = self.years.saturating_mul(12).saturating_add(self.months);
        let t = utc
            .checked_sub_months(Months::new(months))
            .and_then(|t| t.checked_sub_signed(Duration::days(i64::from(self.days))))
            .and_then(|t| t.checked_sub_signed(Duration::hours(i64::from(self.hours))));
        t.unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, unit) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        if *self == Span::default() {
            f.write_str("0h")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("'{0}' is not a count: give a positive number or 'unlimited'")]
    BadCount(String),
    #[error("'{0}' is not a duration: give e.g. 1y5m7d2h (years, months, days, hours)")]
    BadSpan(String),
}

/// The calendar periods of the counted rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Period {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    pub const ALL: [Period; 5] = [
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Yearly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }

    /// The period holding `time` in the time zone `tz`, as one number.
    fn key<Tz: TimeZone>(self, time: &DateTime<Utc>, tz: &Tz) -> i64 {
        let t = time.with_timezone(tz);
        let (y, m, d, h) = (
            i64::from(t.year()),
            i64::from(t.month()),
            i64::from(t.day()),
            i64::from(t.hour()),
        );
        match self {
            Period::Hourly => ((y * 100 + m) * 100 + d) * 100 + h,
            Period::Daily => (y * 100 + m) * 100 + d,
            Period::Weekly => {
                let w = t.iso_week();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }
            Period::Monthly => y * 100 + m,
            Period::Yearly => y,
        }
    }
}

/// A retention policy (restic's `--keep-*` options).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: Option<Count>,
    /// Indexed as [`Period::ALL`].
    pub periods: [Option<Count>; 5],
    pub within: Option<Span>,
    /// Indexed as [`Period::ALL`].
    pub within_periods: [Option<Span>; 5],
    /// Keep items carrying every tag of any one list.
    pub tags: Vec<Vec<String>>,
}

impl Policy {
    /// No rule given: nothing would be kept by it.
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.periods.iter().all(Option::is_none)
            && self.within.is_none()
            && self.within_periods.iter().all(Option::is_none)
            && self.tags.is_empty()
    }

    pub fn set_period(&mut self, p: Period, c: Count) {
        self.periods[p as usize] = Some(c);
    }

    pub fn set_within_period(&mut self, p: Period, s: Span) {
        self.within_periods[p as usize] = Some(s);
    }
}

impl fmt::Display for Policy {
    /// The policy as its command-line options, e.g. `--keep-last 3 --keep-daily 7`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(c) = self.last {
            parts.push(format!("--keep-last {c}"));
        }
        for p in Period::ALL {
            if let Some(c) = self.periods[p as usize] {
                parts.push(format!("--keep-{} {c}", p.name()));
            }
        }
        if let Some(s) = self.within {
            parts.push(format!("--keep-within {s}"));
        }
        for p in Period::ALL {
            if let Some(s) = self.within_periods[p as usize] {
                parts.push(format!("--keep-within-{} {s}", p.name()));
            }
        }
        for t in &self.tags {
            parts.push(format!("--keep-tag {}", t.join(",")));
        }
        f.write_str(&parts.join(" "))
    }
}

/// What the policy sees of one item (a snapshot, or a VM backup's
/// snapshots taken together).
#[derive(Debug, Clone)]
pub struct Item<'a> {
    pub time: DateTime<Utc>,
    pub tags: &'a [String],
}

/// The verdict on one item.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub keep: bool,
    /// Why it is kept (empty when it is not), e.g. `daily snapshot`.
    pub reasons: Vec<String>,
}

/// A counted rule as the walk goes: periods left and the last one kept.
struct Bucket {
    what: Rule,
    left: Option<u32>,
    last: Option<i64>,
}

#[derive(Clone, Copy)]
enum Rule {
    Last,
    Counted(Period),
    Within(Period, DateTime<Utc>),
}

impl Bucket {
    fn has_room(&self) -> bool {
        self.left != Some(0)
    }

    fn take(&mut self, key: i64) {
        self.last = Some(key);
        if let Some(n) = &mut self.left {
            *n -= 1;
        }
    }
}

/// Applies `policy` to `items` (any order); periods are calendar periods
/// of `tz`. Returns one decision per item, in the order given.
pub fn apply<Tz: TimeZone>(policy: &Policy, items: &[Item<'_>], tz: &Tz) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    // Newest first; equal times keep the given order reversed, so the
    // later-listed one counts as newer.
    order.sort_by(|&a, &b| items[b].time.cmp(&items[a].time).then(b.cmp(&a)));
    let mut out = vec![Decision::default(); items.len()];
    let Some(&newest) = order.first() else {
        return out;
    };
    let latest = items[newest].time;
    let left = |c: Count| match c {
        Count::Last(n) => Some(n),
        Count::Unlimited => None,
    };
    let mut buckets = Vec::new();
    if let Some(c) = policy.last {
        buckets.push(Bucket {
            what: Rule::Last,
            left: left(c),
            last: None,
        });
    }
    for p in Period::ALL {
        if let Some(c) = policy.periods[p as usize] {
            buckets.push(Bucket {
                what: Rule::Counted(p),
                left: left(c),
                last: None,
            });
        }
    }
    for p in Period::ALL {
        if let Some(s) = policy.within_periods[p as usize] {
            buckets.push(Bucket {
                what: Rule::Within(p, s.before(&latest)),
                left: None,
                last: None,
            });
        }
    }
    let within = policy.within.map(|s| s.before(&latest));
    let oldest_pos = order.len() - 1;
    for (pos, &i) in order.iter().enumerate() {
        let item = &items[i];
        let d = &mut out[i];
        for list in &policy.tags {
            if !list.is_empty() && list.iter().all(|t| item.tags.contains(t)) {
                d.reasons.push(format!("has tags {}", list.join(",")));
            }
        }
        if let Some(limit) = within {
            if item.time > limit {
                d.reasons.push("within the --keep-within span".to_string());
            }
        }
        for b in &mut buckets {
            if !b.has_room() {
                continue;
            }
            let (key, name) = match b.what {
                Rule::Last => (pos as i64, "last snapshot".to_string()),
                Rule::Counted(p) => (p.key(&item.time, tz), format!("{} snapshot", p.name())),
                Rule::Within(p, limit) => {
                    if item.time <= limit {
                        continue;
                    }
                    (
                        p.key(&item.time, tz),
                        format!("{} snapshot within the span", p.name()),
                    )
                }
            };
            if b.last != Some(key) {
                b.take(key);
                d.reasons.push(name);
            } else if pos == oldest_pos && !matches!(b.what, Rule::Last) {
                // Periods left over: the oldest item lengthens the history.
                b.take(key);
                d.reasons.push(format!("oldest {name}"));
            }
        }
        d.keep = !d.reasons.is_empty();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn kept(policy: &Policy, times: &[DateTime<Utc>]) -> Vec<usize> {
        let none: Vec<String> = Vec::new();
        let items: Vec<Item> = times
            .iter()
            .map(|&time| Item { time, tags: &none })
            .collect();
        apply(policy, &items, &Utc)
            .iter()
            .enumerate()
            .filter(|(_, d)| d.keep)
            .map(|(i, _)| i)
            .collect()
    }

    /// Hourly snapshots over two years (2024-01-01 00:00 .. 2025-12-31 23:00 UTC).
    fn two_years_hourly() -> Vec<DateTime<Utc>> {
        let start = t("2024-01-01T00:00:00Z");
        let end = t("2026-01-01T00:00:00Z");
        let mut v = Vec::new();
        let mut cur = start;
        while cur < end {
            v.push(cur);
            cur += Duration::hours(1);
        }
        v
    }

    #[test]
    fn parses_counts_and_spans() {
        assert_eq!(Count::parse("7"), Ok(Count::Last(7)));
        assert_eq!(Count::parse("unlimited"), Ok(Count::Unlimited));
        assert!(matches!(Count::parse("0"), Err(PolicyError::BadCount(_))));
        assert!(matches!(Count::parse("x"), Err(PolicyError::BadCount(_))));
        assert_eq!(
            Span::parse("1y5m7d2h"),
            Ok(Span {
                years: 1,
                months: 5,
                days: 7,
                hours: 2
            })
        );
        assert_eq!(Span::parse("36h").unwrap().to_string(), "36h");
        for bad in ["", "5", "1w", "1d1d", "d", "1.5d", "-1d"] {
            assert!(
                matches!(Span::parse(bad), Err(PolicyError::BadSpan(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn empty_policy_keeps_nothing_by_rule() {
        let p = Policy::default();
        assert!(p.is_empty());
        assert!(kept(&p, &two_years_hourly()[..10]).is_empty());
    }

    #[test]
    fn keep_last() {
        let times = two_years_hourly();
        let p = Policy {
            last: Some(Count::Last(5)),
            ..Policy::default()
        };
        let k = kept(&p, &times);
        assert_eq!(k, (times.len() - 5..times.len()).collect::<Vec<_>>());
    }

    #[test]
    fn keep_daily_keeps_newest_of_each_day() {
        let times = two_years_hourly();
        let mut p = Policy::default();
        p.set_period(Period::Daily, Count::Last(7));
        let k = kept(&p, &times);
        // 23:00 of the last seven days.
        let want: Vec<DateTime<Utc>> = (0..7)
            .rev()
            .map(|d| t("2025-12-31T23:00:00Z") - Duration::days(d))
            .collect();
        let got: Vec<DateTime<Utc>> = k.iter().map(|&i| times[i]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn restic_documented_example_shape() {
        // restic's docs: --keep-daily 7 --keep-weekly 5 --keep-monthly 12
        // --keep-yearly 75 over a long daily history keeps the last 7
        // days, the last day of the last 5 weeks, of the last 12 months and
        // of every year. Here with hourly snapshots over two years.
        let times = two_years_hourly();
        let mut p = Policy::default();
        p.set_period(Period::Daily, Count::Last(7));
        p.set_period(Period::Weekly, Count::Last(5));
        p.set_period(Period::Monthly, Count::Last(12));
        p.set_period(Period::Yearly, Count::Last(75));
        let got: BTreeSet<DateTime<Utc>> = kept(&p, &times).iter().map(|&i| times[i]).collect();
        let mut want = BTreeSet::new();
        for d in 0..7 {
            want.insert(t("2025-12-31T23:00:00Z") - Duration::days(d));
        }
        // ISO weeks end on Sunday: 2025-12-28, 21, 14, 7 and the week of
        // 2025-12-31 itself (already kept as a daily).
        for s in ["2025-12-28", "2025-12-21", "2025-12-14", "2025-12-07"] {
            want.insert(t(&format!("{s}T23:00:00Z")));
        }
        // Last hour of each month of 2025.
        for m in 1..=12u32 {
            let next = if m == 12 {
                t("2026-01-01T00:00:00Z")
            } else {
                t(&format!("2025-{:02}-01T00:00:00Z", m + 1))
            };
            want.insert(next - Duration::hours(1));
        }
        // Yearly: 2025 (already), 2024's last hour, and 2024's first hour as
        // the oldest yearly snapshot (73 yearly periods were left unused).
        want.insert(t("2024-12-31T23:00:00Z"));
        want.insert(t("2024-01-01T00:00:00Z"));
        assert_eq!(got, want);
        assert_eq!((got.len(), times.len()), (23, 17_544));
    }

    #[test]
    fn oldest_is_kept_when_periods_are_left() {
        // Three snapshots on one day, --keep-daily 3: the newest (daily) and
        // the oldest (oldest daily) are kept, the middle one goes.
        let times = vec![
            t("2025-06-01T01:00:00Z"),
            t("2025-06-01T02:00:00Z"),
            t("2025-06-01T03:00:00Z"),
        ];
        let none: Vec<String> = Vec::new();
        let items: Vec<Item> = times
            .iter()
            .map(|&time| Item { time, tags: &none })
            .collect();
        let mut p = Policy::default();
        p.set_period(Period::Daily, Count::Last(3));
        let d = apply(&p, &items, &Utc);
        assert!(d[2].keep && d[2].reasons == vec!["daily snapshot"]);
        assert!(!d[1].keep);
        assert!(d[0].keep && d[0].reasons == vec!["oldest daily snapshot"]);
        // --keep-last never keeps an extra oldest one.
        let p = Policy {
            last: Some(Count::Last(5)),
            ..Policy::default()
        };
        assert!(apply(&p, &items, &Utc).iter().all(|d| d.keep));
    }

    #[test]
    fn within_is_relative_to_the_newest_snapshot() {
        let times = two_years_hourly();
        let p = Policy {
            within: Some(Span::parse("2d").unwrap()),
            ..Policy::default()
        };
        let k = kept(&p, &times);
        // Newer than 2025-12-29T23:00 (strictly): 48 snapshots.
        assert_eq!(k.len(), 48);
        assert_eq!(times[k[0]], t("2025-12-30T00:00:00Z"));
        // Months are calendar months.
        let p = Policy {
            within: Some(Span::parse("1m").unwrap()),
            ..Policy::default()
        };
        let k = kept(&p, &times);
        assert_eq!(times[k[0]], t("2025-12-01T00:00:00Z"));
    }

    #[test]
    fn within_daily() {
        let times = two_years_hourly();
        let mut p = Policy::default();
        p.set_within_period(Period::Daily, Span::parse("3d").unwrap());
        let got: Vec<DateTime<Utc>> = kept(&p, &times).iter().map(|&i| times[i]).collect();
        // The newest of each day within 3 days of the newest; the oldest
        // snapshot of all is outside the span, so no extra one.
        assert_eq!(
            got,
            vec![
                t("2025-12-29T23:00:00Z"),
                t("2025-12-30T23:00:00Z"),
                t("2025-12-31T23:00:00Z"),
            ]
        );
    }

    #[test]
    fn tags_keep_without_using_counts() {
        let times = [
            t("2025-01-01T00:00:00Z"),
            t("2025-01-02T00:00:00Z"),
            t("2025-01-03T00:00:00Z"),
        ];
        let monthly = vec!["monthly".to_string(), "db".to_string()];
        let plain: Vec<String> = vec!["db".to_string()];
        let items = vec![
            Item {
                time: times[0],
                tags: &monthly,
            },
            Item {
                time: times[1],
                tags: &plain,
            },
            Item {
                time: times[2],
                tags: &plain,
            },
        ];
        let p = Policy {
            last: Some(Count::Last(1)),
            tags: vec![vec!["monthly".into(), "db".into()]],
            ..Policy::default()
        };
        let d = apply(&p, &items, &Utc);
        assert_eq!(d[0].reasons, vec!["has tags monthly,db"]);
        assert!(!d[1].keep);
        assert_eq!(d[2].reasons, vec!["last snapshot"]);
        // A list needs every tag.
        let p = Policy {
            tags: vec![vec!["monthly".into(), "web".into()]],
            ..Policy::default()
        };
        assert!(apply(&p, &items, &Utc).iter().all(|d| !d.keep));
    }

    #[test]
    fn periods_follow_the_given_time_zone() {
        // 23:30 UTC and 00:30 UTC the next day are the same day at UTC-2.
        let times = [t("2025-03-01T23:30:00Z"), t("2025-03-02T00:30:00Z")];
        let mut p = Policy::default();
        p.set_period(Period::Daily, Count::Last(1));
        let none: Vec<String> = Vec::new();
        let items: Vec<Item> = times
            .iter()
            .map(|&time| Item { time, tags: &none })
            .collect();
        let utc: Vec<bool> = apply(&p, &items, &Utc).iter().map(|d| d.keep).collect();
        assert_eq!(utc, vec![false, true]);
        let west = FixedOffset::west_opt(2 * 3600).unwrap();
        let mut p2 = Policy::default();
        p2.set_period(Period::Daily, Count::Last(2));
        let d = apply(&p2, &items, &west);
        // One day there: the newest kept as daily, the oldest as oldest daily.
        assert_eq!(d[1].reasons, vec!["daily snapshot"]);
        assert_eq!(d[0].reasons, vec!["oldest daily snapshot"]);
    }

    #[test]
    fn weekly_uses_iso_weeks_across_years() {
        // 2024-12-30 (Mon) belongs to ISO week 2025-W01, like 2025-01-05.
        let times = [
            t("2024-12-29T12:00:00Z"),
            t("2024-12-30T12:00:00Z"),
            t("2025-01-05T12:00:00Z"),
        ];
        let mut p = Policy::default();
        p.set_period(Period::Weekly, Count::Last(2));
        let k = kept(&p, &times);
        assert_eq!(k, vec![0, 2]);
    }
}
