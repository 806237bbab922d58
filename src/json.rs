//! The `--json` contract, documented in `docs/json.md` (a test checks every
//! command's output against it): one compact JSON object per line, each
//! with a `message_type`. Long work prints `status` lines; every command
//! ends with one `summary` (the servers `serve` and `sim` print `listening`
//! and run until stopped); listings print one object per item before it;
//! warnings and errors go to stderr as `warning` and `error`.
//!
//! Names follow one scheme: ids end in `_id` (`_ids` for lists), sizes in
//! `_bytes`, durations in `_seconds`, times are `time` or end in `_time` and
//! are RFC 3339 UTC with `Z`, XenServer object references end in `_uuid`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use crate::progress::Progress;

/// `message_type` values.
pub mod kind {
    pub const STATUS: &str = "status";
    pub const SUMMARY: &str = "summary";
    pub const ERROR: &str = "error";
    pub const WARNING: &str = "warning";
    pub const VERBOSE: &str = "verbose";
    pub const LISTENING: &str = "listening";
}

/// One message: its type, the command that printed it (for `status`,
/// `summary`, `error`), then the body's fields.
#[derive(Serialize)]
struct Envelope<'a, T: Serialize + ?Sized> {
    message_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'a str>,
    #[serde(flatten)]
    body: &'a T,
}

/// Writes one message as one line. Write errors are ignored, as for all
/// output (a closed pipe is the reader's choice).
pub fn write_line<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    message_type: &str,
    command: Option<&str>,
    body: &T,
) {
    // Serialize to a buffer first so a line is written whole (status lines
    // come from several threads).
    let mut line = Vec::new();
    write_line_unflushed(&mut line, message_type, command, body);
    let _ = out.write_all(&line);
    let _ = out.flush();
}

/// [`write_line`] without the flush, for many lines into a buffer.
pub fn write_line_unflushed<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    message_type: &str,
    command: Option<&str>,
    body: &T,
) {
    let envelope = Envelope {
        message_type,
        command,
        body,
    };
    if serde_json::to_writer(&mut *out, &envelope).is_ok() {
        let _ = out.write_all(b"\n");
    }
}

/// A time as the contract writes it: RFC 3339, UTC, `Z`.
pub fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// `#[serde(serialize_with = "crate::json::duration_seconds")]`.
pub fn duration_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `#[serde(serialize_with = "crate::json::ms_as_seconds")]` on a
/// millisecond count.
pub fn ms_as_seconds<S: serde::Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(*ms as f64 / 1000.0)
}

/// The body of an `error` message.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The exit code the process ends with.
    pub exit_code: u8,
    /// The whole error on one line (what the text output prints).
    pub message: String,
    /// The chain, outermost first: what was being done, then why.
    pub causes: Vec<String>,
}

impl ErrorBody {
    pub fn of(e: &anyhow::Error, exit_code: u8) -> ErrorBody {
        ErrorBody {
            exit_code,
            message: one_line(e),
            causes: causes(e),
        }
    }
}

/// The chain of `e`, outermost first, each level saying only its own part.
/// Many error types below print their cause in their own message
/// (`"{step}: {source}"`) and also return it from `source()`, so anyhow's
/// `{:#}` would print that cause twice; a level ending in `": "` plus the
/// whole next level has that tail cut, and a level that only repeats the
/// next one is left out.
pub fn causes(e: &anyhow::Error) -> Vec<String> {
    let full: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let mut out = Vec::with_capacity(full.len());
    for (i, text) in full.iter().enumerate() {
        let Some(next) = full.get(i + 1) else {
            out.push(text.clone());
            break;
        };
        if text == next {
            continue;
        }
        let own = text
            .strip_suffix(next.as_str())
            .and_then(|head| head.strip_suffix(": "))
            .filter(|head| !head.is_empty())
            .unwrap_or(text);
        out.push(own.to_string());
    }
    // A step named only by what its cause already says ("VM.snapshot"
    // before "XenAPI VM.snapshot: SR_FULL") is said once.
    let mut k = 0;
    while k + 1 < out.len() {
        if contains_words(&out[k + 1], &out[k]) {
            out.remove(k);
        } else {
            k += 1;
        }
    }
    out
}

/// True when `needle` occurs in `hay` as whole words: bounded by the
/// start or end, a space, or a `:`.
fn contains_words(hay: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    let bound = |c: Option<char>| c.is_none_or(|c| c == ' ' || c == ':');
    hay.match_indices(needle).any(|(at, _)| {
        bound(hay[..at].chars().next_back()) && bound(hay[at + needle.len()..].chars().next())
    })
}

/// The whole error on one line, each cause once (what `error:` prints).
pub fn one_line(e: &anyhow::Error) -> String {
    causes(e).join(": ")
}

/// The body of a `warning` message.
#[derive(Debug, Serialize)]
pub struct WarningBody<'a> {
    pub message: &'a str,
}

/// The body of a `verbose` message (`-v` detail).
#[derive(Debug, Serialize)]
pub struct VerboseBody<'a> {
    /// 1 for `-v`, 2 for `-vv`.
    pub level: u8,
    pub message: &'a str,
}

/// The body of a `status` line.
#[derive(Debug, Serialize)]
struct StatusBody<'a> {
    /// What is being done ("backup", "restore", "check", "prune", ...).
    phase: &'a str,
    /// 0.0 ..= 1.0; null while the total is unknown.
    percent_done: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_items: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_items: Option<u64>,
    elapsed_seconds: f64,
    /// Null until enough is done to estimate.
    eta_seconds: Option<f64>,
}

/// How often `status` lines are printed at most (plus one when the total
/// becomes known and one at the end).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A [`Progress`] that prints `status` lines.
pub struct StatusLines {
    command: &'static str,
    phase: Mutex<String>,
    bytes: bool,
    to_stderr: bool,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    /// When the last line was printed (`None`: none yet).
    last: Mutex<Option<Instant>>,
    finished: AtomicBool,
}

impl StatusLines {
    pub fn new(command: &'static str, phase: &str, bytes: bool, to_stderr: bool) -> StatusLines {
        StatusLines {
            command,
            phase: Mutex::new(phase.to_string()),
            bytes,
            to_stderr,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            started: Instant::now(),
            last: Mutex::new(None),
            finished: AtomicBool::new(false),
        }
    }

    /// Prints a line now if `force` or if the last one is old enough.
    fn maybe_print(&self, force: bool) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|l| now.duration_since(l) < STATUS_EVERY) {
                return;
            }
            *last = Some(now);
        }
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        // Estimates may overshoot (compressed sizes); never past the total.
        let done = if total > 0 { done.min(total) } else { done };
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let percent = (total > 0).then(|| (done as f64 / total as f64).min(1.0));
        let eta = match percent {
            Some(p) if p >= 1.0 => Some(0.0),
            Some(p) if p > 0.0 && elapsed >= 1.0 => Some(elapsed * (1.0 - p) / p),
            _ => None,
        };
        let phase = self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (done_bytes, total_bytes, done_items, total_items) = if self.bytes {
            (Some(done), Some(total), None, None)
        } else {
            (None, None, Some(done), Some(total))
        };
        let body = StatusBody {
            phase: &phase,
            percent_done: percent,
            done_bytes,
            total_bytes,
            done_items,
            total_items,
            elapsed_seconds: elapsed,
            eta_seconds: eta,
        };
        if self.to_stderr {
            write_line(
                &mut std::io::stderr().lock(),
                kind::STATUS,
                Some(self.command),
                &body,
            );
        } else {
            write_line(
                &mut std::io::stdout().lock(),
                kind::STATUS,
                Some(self.command),
                &body,
            );
        }
    }

    /// The last line, at the end of the work.
    pub fn finish(&self) {
        if !self.finished.swap(true, Ordering::Relaxed) {
            self.maybe_print(true);
        }
    }
}

impl Progress for StatusLines {
    fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.maybe_print(true);
    }
    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if !self.finished.load(Ordering::Relaxed) {
            self.maybe_print(false);
        }
    }
    fn set_message(&self, message: &str) {
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if *phase != message {
            // A new phase counts its own work.
            *phase = message.to_string();
            self.done.store(0, Ordering::Relaxed);
            self.total.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{step}: {source}")]
    struct Step {
        step: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct Same(Step);

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(Step {
            step: "write pack",
            source: io(),
        })
        .context("back up vm");
        assert_eq!(causes(&e), ["back up vm", "write pack", "disk on fire"]);
        assert_eq!(one_line(&e), "back up vm: write pack: disk on fire");
        // anyhow's own `{:#}` repeats it; ours does not.
        assert_eq!(format!("{e:#}").matches("disk on fire").count(), 2);

        // Transparent wrapping, and a context that only names the cause.
        let e = anyhow::Error::new(Same(Step {
            step: "write pack",
            source: io(),
        }));
        assert_eq!(one_line(&e), "write pack: disk on fire");
        let e = anyhow::Error::new(io()).context("open: disk on fire");
        assert_eq!(causes(&e), ["open", "disk on fire"]);
        // A message that merely ends like its cause without the separator is kept.
        let e = anyhow::Error::new(io()).context("not disk on fire");
        assert_eq!(causes(&e), ["not disk on fire", "disk on fire"]);
        // A step its cause already names, as whole words, is said once;
        // part of a word is not a mention.
        let call = |m: &str| std::io::Error::other(m.to_string());
        let e = anyhow::Error::new(Step {
            step: "VM.snapshot",
            source: call("XenAPI VM.snapshot: SR_FULL"),
        })
        .context("back up xen://h:443/vm/u");
        assert_eq!(
            causes(&e),
            ["back up xen://h:443/vm/u", "XenAPI VM.snapshot: SR_FULL"]
        );
        let e = anyhow::Error::new(Step {
            step: "snapshot",
            source: call("snapshots are full"),
        });
        assert_eq!(causes(&e), ["snapshot", "snapshots are full"]);
    }

    #[test]
    fn a_message_is_one_line_with_its_type_first() {
        #[derive(Serialize)]
        struct Body {
            snapshot_id: &'static str,
            disk_size_bytes: u64,
        }
        let mut out = Vec::new();
        write_line(
            &mut out,
            kind::SUMMARY,
            Some("backup"),
            &Body {
                snapshot_id: "ab",
                disk_size_bytes: 5,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"message_type\":\"summary\",\"command\":\"backup\",\"snapshot_id\":\"ab\",\"disk_size_bytes\":5}\n"
        );
    }

    #[test]
    fn times_are_utc_with_z() {
        let t = DateTime::parse_from_rfc3339("2026-12-05T10:11:12+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(time(&t), "2026-12-05T08:11:12Z");
        // chrono's own serialisation agrees (fields typed DateTime<Utc>).
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2026-12-05T08:11:12Z\""
        );
    }
}
