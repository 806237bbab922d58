//! All user-facing output: human text, `--json` results, warnings and
//! progress bars. Nothing else in the crate prints.
//!
//! Write errors are ignored: a closed stdout pipe (`cbtvault snapshots |
//! head -1`) is the reader's choice, not a failure of the command.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde::Serialize;

use crate::json::{self, StatusLines};
use crate::progress::Progress;

#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub json: bool,
    pub quiet: bool,
    pub progress_bars: bool,
    /// The command's name in JSON messages.
    pub command: &'static str,
    /// JSON messages go to stderr: stdout carries data (`restore --target -`).
    pub json_on_stderr: bool,
    /// `-v` count: 0 default, 1 per-step detail, 2 debug detail.
    pub verbose: u8,
}

impl Ui {
    pub fn new(json: bool, quiet: bool, command: &'static str) -> Self {
        Ui {
            json,
            quiet,
            progress_bars: !json && !quiet && std::io::stderr().is_terminal(),
            command,
            json_on_stderr: false,
            verbose: 0,
        }
    }

    /// The same, with JSON messages on stderr.
    pub fn with_json_on_stderr(&self) -> Ui {
        Ui {
            json_on_stderr: true,
            ..*self
        }
    }

    /// The same Ui showing [`Ui::detail`] lines up to `level`.
    pub fn with_verbose(self, level: u8) -> Self {
        Ui {
            verbose: level,
            ..self
        }
    }

    /// A detail line on stderr, shown from `-v` (level 1: which
    /// connections, which parent, how many blocks) or `-vv` (level 2:
    /// debug detail); suppressed by --quiet.
    ///
    /// With --json it is a `verbose` message on stderr (documented in
    /// docs/json.md beside `warning`), not dropped: whoever asks for both
    /// `--json` and `-v` wants the detail, and a log collector reading
    /// stderr can keep it. It goes to stderr like `warning` so that stdout
    /// keeps only status, items and the one summary.
    pub fn detail(&self, level: u8, line: impl AsRef<str>) {
        if !self.shows_detail(level) {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.json {
            let body = json::VerboseBody {
                level,
                message: line.as_ref(),
            };
            json::write_line(&mut err, json::kind::VERBOSE, None, &body);
        } else {
            let _ = writeln!(err, "{}", line.as_ref());
        }
    }

    /// Whether [`Ui::detail`] at `level` prints (to skip costly detail).
    pub fn shows_detail(&self, level: u8) -> bool {
        !self.quiet && self.verbose >= level
    }

    /// A line of human output on stdout (suppressed by --json and --quiet).
    pub fn info(&self, line: impl AsRef<str>) {
        if !self.json && !self.quiet {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", line.as_ref());
        }
    }

    /// Human output that belongs on stdout even with --quiet (e.g. a table
    /// the user asked for); suppressed only by --json.
    pub fn print(&self, line: impl AsRef<str>) {
        if !self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", line.as_ref());
        }
    }

    /// A document the command exists to print (e.g. `cat`), on stdout
    /// whatever the flags.
    pub fn document(&self, text: impl AsRef<str>) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", text.as_ref());
    }

    /// Bytes the command exists to print as they are (a completion
    /// script), on stdout whatever the flags.
    pub fn document_bytes(&self, bytes: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }

    /// Lines of a document the command exists to print (`cat`), one JSON
    /// object each, on stdout whatever the flags.
    pub fn document_lines<T: Serialize>(
        &self,
        message_type: &str,
        items: impl IntoIterator<Item = T>,
    ) {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        for item in items {
            json::write_line_unflushed(&mut out, message_type, None, &item);
        }
        let _ = out.flush();
    }

    /// A warning on stderr, always shown (a `warning` message with --json).
    pub fn warn(&self, line: impl AsRef<str>) {
        let mut err = std::io::stderr().lock();
        if self.json {
            let body = json::WarningBody {
                message: line.as_ref(),
            };
            json::write_line(&mut err, json::kind::WARNING, None, &body);
        } else {
            let _ = writeln!(err, "warning: {}", line.as_ref());
        }
    }

    /// An error line on stderr (with --json, errors that end the command
    /// are printed by [`Ui::fatal`]; these are the ones it goes on after,
    /// as `warning` messages of their own kind).
    pub fn error(&self, line: impl AsRef<str>) {
        if self.json {
            self.warn(line);
        } else {
            let _ = writeln!(std::io::stderr().lock(), "error: {}", line.as_ref());
        }
    }

    /// The error that ends the command, with the exit code it gives.
    pub fn fatal(&self, e: &anyhow::Error, exit_code: u8) {
        let mut err = std::io::stderr().lock();
        if self.json {
            let body = json::ErrorBody::of(e, exit_code);
            json::write_line(&mut err, json::kind::ERROR, Some(self.command), &body);
        } else {
            let _ = writeln!(err, "error: {}", json::one_line(e));
        }
    }

    /// Writes one JSON message (only with --json).
    fn message<T: Serialize + ?Sized>(&self, message_type: &str, command: bool, body: &T) {
        if !self.json {
            return;
        }
        let command = command.then_some(self.command);
        if self.json_on_stderr {
            json::write_line(&mut std::io::stderr().lock(), message_type, command, body);
        } else {
            json::write_line(&mut std::io::stdout().lock(), message_type, command, body);
        }
    }

    /// The command's result, its last line (only with --json).
    pub fn summary<T: Serialize + ?Sized>(&self, body: &T) {
        self.message(json::kind::SUMMARY, true, body);
    }

    /// One item of a listing, before the summary (only with --json).
    pub fn item<T: Serialize + ?Sized>(&self, message_type: &str, body: &T) {
        self.message(message_type, false, body);
    }

    /// A server's address, once it accepts connections (only with --json).
    pub fn listening<T: Serialize + ?Sized>(&self, body: &T) {
        self.message(json::kind::LISTENING, true, body);
    }

    /// Progress of long work: a bar on a terminal, `status` lines with
    /// --json, else nothing. `bytes`: the unit is bytes (else items).
    pub fn progress(&self, label: &str, bytes: bool) -> Bar {
        if self.json {
            return Bar::Status(StatusLines::new(
                self.command,
                label,
                bytes,
                self.json_on_stderr,
            ));
        }
        let bar = if self.progress_bars {
            // No length yet: a spinner and the time, until `set_total`
            // switches to the bar (no "0 B/0 B" before the total is known).
            let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            pb.set_style(waiting_style());
            pb.set_message(label.to_string());
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        } else {
            ProgressBar::hidden()
        };
        Bar::Bar { bar, bytes }
    }

    /// Prints rows as an aligned table.
    pub fn table(&self, headers: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        self.print(line(headers.iter().map(|h| h.to_string()).collect()));
        self.print("-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1)));
        for row in rows {
            self.print(line(row.clone()));
        }
    }
}

/// Progress handed to library code as a [`Progress`]: a bar (hidden when
/// not on a terminal) or JSON `status` lines.
pub enum Bar {
    /// `bytes`: the unit is bytes (else items).
    Bar {
        bar: ProgressBar,
        bytes: bool,
    },
    Status(StatusLines),
}

impl Bar {
    /// The work is done: the bar disappears; the last status line is
    /// printed (once).
    pub fn finish(&self) {
        match self {
            Bar::Bar { bar, .. } => bar.finish_and_clear(),
            Bar::Status(s) => s.finish(),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Bar::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        match self {
            Bar::Bar { bar, bytes } => {
                if bar.length().is_none() {
                    bar.set_style(bar_style(*bytes));
                }
                bar.set_length(total);
            }
            Bar::Status(s) => s.set_total(total),
        }
    }
    fn advance(&self, n: u64) {
        match self {
            Bar::Bar { bar, .. } => bar.inc(n),
            Bar::Status(s) => s.advance(n),
        }
    }
    fn set_message(&self, message: &str) {
        match self {
            Bar::Bar { bar, .. } => {
                bar.set_message(message.to_string());
                bar.set_position(0);
            }
            Bar::Status(s) => s.set_message(message),
        }
    }
}

/// `n` and the noun, plural unless `n` is 1: (1, "snapshot") -> "1
/// snapshot", (3, "pack") -> "3 packs". Regular English plurals only.
pub fn plural(n: impl Count, noun: &str) -> String {
    let n = n.count();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A count for [`plural`] (usize, u32 and u64 alike).
pub trait Count {
    fn count(self) -> u64;
}

macro_rules! count {
    ($($t:ty),*) => {$(
        impl Count for $t {
            fn count(self) -> u64 {
                self as u64
            }
        }
    )*};
}
count!(usize, u32, u64);

/// Before the amount of work is known: the label, a spinner, the time.
fn waiting_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg:>10} {spinner} {elapsed}")
        .expect("valid template")
        .tick_chars("-\\|/ ")
}

/// How long a bar runs before it shows an estimate: the first second's
/// rate (caches, connection set-up) says little ("eta 7w").
const ETA_AFTER: Duration = Duration::from_secs(3);

/// The bar, once the total is known. Sizes as [`human_bytes`] writes them
/// everywhere else; the rate and the estimate appear only once they mean
/// something (see [`ETA_AFTER`]).
fn bar_style(bytes: bool) -> ProgressStyle {
    let template = if bytes {
        "{msg:>10} [{bar:30}] {percent:>3}% {done}/{total}{rate}{eta}"
    } else {
        "{msg:>10} [{bar:30}] {percent:>3}% {pos}/{len}{eta}"
    };
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
        .with_key("done", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&human_bytes(s.pos()));
        })
        .with_key("total", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&human_bytes(s.len().unwrap_or(0)));
        })
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let secs = s.elapsed().as_secs_f64();
            if secs >= 1.0 {
                let _ = write!(w, " {}/s", human_bytes((s.pos() as f64 / secs) as u64));
            }
        })
        .with_key("eta", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            if let Some(eta) = eta_of(s.elapsed(), s.pos(), s.len()) {
                let _ = write!(w, " eta {}", human_duration(eta));
            }
        })
}

/// The time left at the average rate so far, once [`ETA_AFTER`] has passed
/// and some work is done; `None` before (and when nothing is left to
/// estimate).
fn eta_of(elapsed: Duration, done: u64, total: Option<u64>) -> Option<Duration> {
    let total = total?;
    if elapsed < ETA_AFTER || done == 0 || done >= total {
        return None;
    }
    let left = (total - done) as f64 * elapsed.as_secs_f64() / done as f64;
    Some(Duration::from_secs_f64(left.min(1e9)))
}

/// 75 s -> "1m15s"; 3 h 5 min -> "3h05m"; 42 s -> "42s".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// 1536 -> "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_estimate_in_the_first_seconds_or_without_progress() {
        let s = Duration::from_secs;
        assert_eq!(eta_of(Duration::from_millis(200), 1, Some(1 << 40)), None);
        assert_eq!(eta_of(s(2), 1 << 20, Some(1 << 30)), None);
        assert_eq!(eta_of(s(10), 0, Some(100)), None);
        assert_eq!(eta_of(s(10), 100, Some(100)), None);
        assert_eq!(eta_of(s(10), 10, None), None);
        assert_eq!(eta_of(s(10), 25, Some(100)), Some(s(30)));
    }

    #[test]
    fn durations_and_sizes_read_one_way() {
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(75)), "1m15s");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 300)), "3h05m");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 << 20), "8.0 MiB");
    }

    #[test]
    fn plurals() {
        assert_eq!(plural(1usize, "snapshot"), "1 snapshot");
        assert_eq!(plural(0u64, "snapshot"), "0 snapshots");
        assert_eq!(plural(3u32, "pack"), "3 packs");
    }
}
