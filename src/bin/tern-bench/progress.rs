//! A one-line progress bar on stderr (`\r`-redrawn), shown on a terminal or with `--progress`;
//! redirected runs keep their plain log lines instead.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Redraws at most this often: a terminal does not need more, and a `--progress` log stays small.
const REDRAW: Duration = Duration::from_millis(200);
const WIDTH: u64 = 30;

pub struct Bar {
    enabled: bool,
    /// Length of the last line drawn (0 = nothing on the line).
    drawn: usize,
    last: Option<Instant>,
}

impl Bar {
    /// Enabled when `forced` (`--progress`) or stderr is a terminal.
    pub fn new(forced: bool) -> Bar {
        Bar {
            enabled: forced || std::io::stderr().is_terminal(),
            drawn: 0,
            last: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Redraw the line: `label [#####.....] done/target text`.
    pub fn draw(&mut self, label: &str, done: u64, target: u64, text: &str) {
        if !self.enabled || self.last.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        self.last = Some(Instant::now());
        let line = render(label, done, target, text);
        // Pad over the rest of a longer previous line.
        let pad = self.drawn.saturating_sub(line.chars().count());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}{:pad$}", "");
        let _ = err.flush();
        self.drawn = line.chars().count();
    }

    /// End the bar's line so the next output starts on a fresh one; the next `draw` starts anew.
    pub fn finish(&mut self) {
        if self.drawn > 0 {
            eprintln!();
        }
        self.drawn = 0;
        self.last = None;
    }
}

fn render(label: &str, done: u64, target: u64, text: &str) -> String {
    let filled = (done.min(target) * WIDTH).checked_div(target).unwrap_or(0) as usize;
    let pct = (done.min(target) * 100).checked_div(target).unwrap_or(0);
    format!(
        "{label} [{}{}] {done}/{target} {pct:>3}%  {text}",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fraction() {
        let line = render("logins", 50, 200, "x");
        assert!(
            line.starts_with("logins [#######......................."),
            "{line}"
        );
        assert!(line.ends_with("50/200  25%  x"), "{line}");
        assert!(render("logins", 0, 0, "").contains("0/0   0%"));
    }
}
