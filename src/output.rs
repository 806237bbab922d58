//! All user-facing output: human text, `--json` results, warnings and
//! progress bars. Nothing else in the crate prints.
//!
//! Write errors are ignored: a closed stdout pipe (`cbtvault snapshots |
//! head -1`) is the reader's choice, not a failure of the command.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
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
}

impl Ui {
    pub fn new(json: bool, quiet: bool, command: &'static str) -> Self {
        Ui {
            json,
            quiet,
            progress_bars: !json && !quiet && std::io::stderr().is_terminal(),
            command,
            json_on_stderr: false,
        }
    }

    /// The same, with JSON messages on stderr.
    pub fn with_json_on_stderr(&self) -> Ui {
        Ui {
            json_on_stderr: true,
            ..*self
        }
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
        Bar::Bar(bar)
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
    Bar(ProgressBar),
    Status(StatusLines),
}

impl Bar {
    /// The work is done: the bar disappears; the last status line is
    /// printed (once).
    pub fn finish(&self) {
        match self {
            Bar::Bar(b) => b.finish_and_clear(),
            Bar::Status(s) => s.finish(),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Bar::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        match self {
            Bar::Bar(b) => b.set_length(total),
            Bar::Status(s) => s.set_total(total),
        }
    }
    fn advance(&self, n: u64) {
        match self {
            Bar::Bar(b) => b.inc(n),
            Bar::Status(s) => s.advance(n),
        }
    }
    fn set_message(&self, message: &str) {
        match self {
            Bar::Bar(b) => {
                b.set_message(message.to_string());
                b.set_position(0);
            }
            Bar::Status(s) => s.set_message(message),
        }
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
