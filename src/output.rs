//! All user-facing output: human text, `--json` results, warnings and
//! progress bars. Nothing else in the crate prints.
//!
//! Write errors are ignored: a closed stdout pipe (`cbtvault snapshots |
//! head -1`) is the reader's choice, not a failure of the command.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::progress::Progress;

#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub json: bool,
    pub quiet: bool,
    pub progress_bars: bool,
    /// `-v` count: 0 default, 1 per-step detail, 2 debug detail.
    pub verbose: u8,
}

impl Ui {
    pub fn new(json: bool, quiet: bool) -> Self {
        Ui {
            json,
            quiet,
            progress_bars: !json && !quiet && std::io::stderr().is_terminal(),
            verbose: 0,
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
    /// debug detail); suppressed by --quiet. With --json it is a
    /// `{"message_type":"verbose",...}` object, so that stdout carries
    /// only the results and stderr stays machine-readable.
    pub fn detail(&self, level: u8, line: impl AsRef<str>) {
        if self.quiet || self.verbose < level {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.json {
            let v = serde_json::json!({
                "message_type": "verbose",
                "level": level,
                "message": line.as_ref(),
            });
            let _ = serde_json::to_writer(&mut err, &v);
            let _ = writeln!(err);
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

    /// A warning on stderr, always shown.
    pub fn warn(&self, line: impl AsRef<str>) {
        let _ = writeln!(std::io::stderr().lock(), "warning: {}", line.as_ref());
    }

    pub fn error(&self, line: impl AsRef<str>) {
        let _ = writeln!(std::io::stderr().lock(), "error: {}", line.as_ref());
    }

    /// The machine-readable result of a command (only with --json).
    pub fn json<T: Serialize>(&self, value: &T) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = serde_json::to_writer(&mut out, value);
            let _ = writeln!(out);
        }
    }

    /// The machine-readable result on stderr (only with --json), for a
    /// command whose stdout carries data (restore to `-`).
    pub fn json_stderr<T: Serialize>(&self, value: &T) {
        if self.json {
            let mut out = std::io::stderr().lock();
            let _ = serde_json::to_writer(&mut out, value);
            let _ = writeln!(out);
        }
    }

    /// A progress bar over `unit` ("bytes" or "items"), hidden when not a TTY.
    pub fn progress(&self, label: &str, bytes: bool) -> Bar {
        let bar = if self.progress_bars {
            let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let template = if bytes {
                "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{msg:>10} [{bar:30}] {pos}/{len} eta {eta}"
            };
            pb.set_style(
                ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            pb.set_message(label.to_string());
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        } else {
            ProgressBar::hidden()
        };
        Bar(bar)
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

/// A progress bar handed to library code as a [`Progress`].
pub struct Bar(ProgressBar);

impl Bar {
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
    fn set_message(&self, message: &str) {
        self.0.set_message(message.to_string());
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
