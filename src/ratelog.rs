//! Log lines rate-limited per reason: the first [`PER_WINDOW`] events of a reason in a
//! [`WINDOW`] are logged, the rest counted and reported in one summary line when the
//! window ends (at the reason's next event, or at the next [`RateLog::flush`]).
//!
//! A refused socket is worth a log line (it is often a misconfiguration: an `Origin`
//! not listed, a typo in a flag), but a storm of refusals must not flood the log.
//! The state is one small map behind a std `Mutex`, held for a lookup and never
//! across an `.await`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::info;

/// Events of one reason logged per window.
pub const PER_WINDOW: u32 = 10;
/// The window the limit applies to.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One reason's current window.
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// What [`RateLog::admit`] decided about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Log this event.
    pub log: bool,
    /// The reason's previous window ended with this many events not logged.
    pub ended: Option<u64>,
}

/// Rate-limited log lines, per reason; one per kind of event.
pub struct RateLog {
    /// The log target of the lines (the module whose events they are).
    target: &'static str,
    /// Names what was counted in a summary line: `"refused for"` gives
    /// "… and 5 more refused for origin in the last minute".
    what: &'static str,
    windows: Mutex<HashMap<&'static str, Window>>,
}

impl RateLog {
    /// `target`: the log target of the lines (for `RUST_LOG`); `what`: see the field.
    pub fn new(target: &'static str, what: &'static str) -> RateLog {
        RateLog {
            target,
            what,
            windows: Mutex::default(),
        }
    }

    /// Decides whether the event of `reason` at `now` is logged.
    pub fn admit(&self, reason: &'static str, now: Instant) -> Admission {
        // unwrap: the lock is never held across a panic-prone call.
        let mut windows = self.windows.lock().unwrap();
        let window = windows.entry(reason).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        let mut ended = None;
        if now.saturating_duration_since(window.start) >= WINDOW {
            ended = (window.suppressed > 0).then_some(window.suppressed);
            *window = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        let log = window.logged < PER_WINDOW;
        if log {
            window.logged += 1;
        } else {
            window.suppressed += 1;
        }
        Admission { log, ended }
    }

    /// Ends the windows that are over at `now` and returns, per reason, how many of
    /// their events were not logged (reasons with none are left out).
    pub fn flush(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut windows = self.windows.lock().unwrap();
        let mut ended = Vec::new();
        windows.retain(|reason, w| {
            let over = now.saturating_duration_since(w.start) >= WINDOW;
            if over && w.suppressed > 0 {
                ended.push((*reason, w.suppressed));
            }
            !over
        });
        ended
    }

    /// The summary line of a window of `reason` that ended with `more` events not
    /// logged.
    pub fn summary(&self, reason: &str, more: u64) -> String {
        format!(
            "… and {more} more {} {reason} in the last minute",
            self.what
        )
    }

    /// Logs `line()` at `info` if the limit allows, after the summary of the reason's
    /// previous window if it ended.
    pub fn info(&self, reason: &'static str, line: impl FnOnce() -> String) {
        let admission = self.admit(reason, Instant::now());
        if let Some(more) = admission.ended {
            info!(target: self.target, "{}", self.summary(reason, more));
        }
        if admission.log {
            info!(target: self.target, "{}", line());
        }
    }

    /// Logs the summaries of the windows that are over (called periodically, so that a
    /// storm that stopped is still summed up).
    pub fn flush_to_log(&self) {
        for (reason, more) in self.flush(Instant::now()) {
            info!(target: self.target, "{}", self.summary(reason, more));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_per_minute_per_reason_then_a_summary() {
        let log = RateLog::new("test", "refused for");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let logged = (0..15)
            .filter(|i| log.admit("origin", at(i % 30)).log)
            .count();
        assert_eq!(logged, 10);
        // Another reason has its own limit.
        assert!(log.admit("policy", at(1)).log);
        // Within the minute: nothing ended yet.
        assert!(log.flush(at(59)).is_empty());
        // The next event after the minute reports the five not logged, and is logged.
        assert_eq!(
            log.admit("origin", at(60)),
            Admission {
                log: true,
                ended: Some(5)
            }
        );
        assert_eq!(
            log.summary("origin", 5),
            "… and 5 more refused for origin in the last minute"
        );
    }

    #[test]
    fn a_flush_sums_up_windows_that_are_over() {
        let log = RateLog::new("test", "refused for");
        let t0 = Instant::now();
        for _ in 0..12 {
            log.admit("origin", t0);
        }
        for _ in 0..3 {
            log.admit("policy", t0);
        }
        assert!(log.flush(t0 + Duration::from_secs(30)).is_empty());
        // Only the reason with events not logged is summed up; both windows end.
        assert_eq!(log.flush(t0 + WINDOW), [("origin", 2)]);
        assert!(log.flush(t0 + WINDOW * 2).is_empty());
        // A new window starts afresh.
        let admission = log.admit("origin", t0 + WINDOW * 2);
        assert_eq!(
            admission,
            Admission {
                log: true,
                ended: None
            }
        );
    }
}
