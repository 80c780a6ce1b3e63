//! The end-of-run summary: what was sent, what the server received and lost, how fast, and
//! how many answers were wrong; as human text, or as one JSON object for scripts.

use std::fmt::Write;

use serde::Serialize;

use crate::progress::si;

/// Everything a run measured. The JSON keys are the field names.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub scenario: &'static str,
    pub seed: u64,
    pub apps: usize,
    /// Datagrams the kernel took from the senders.
    pub sent: u64,
    /// Datagrams the server read from its sockets during the run (`/metrics` delta).
    pub received: u64,
    /// Valid events the server counted during the run; absent from a receiver that does not
    /// parse (discard).
    pub ingested: Option<u64>,
    /// `sent - received`.
    pub lost: u64,
    pub lost_percent: f64,
    /// Datagrams the kernel dropped at the server's full sockets during the run.
    pub kernel_drops: u64,
    /// Datagrams the server rejected as invalid during the run; absent from discard.
    pub invalid: Option<u64>,
    /// Valid events the server received but did not count because it was at its
    /// `--max-apps` cap; absent from discard.
    pub dropped_at_caps: Option<u64>,
    /// 0 when unpaced.
    pub target_rate_per_s: f64,
    pub send_rate_per_s: f64,
    /// Length of the send phase.
    pub elapsed_s: f64,
    /// Times a sender found its send buffer full and waited.
    pub send_backoffs: u64,
    /// False when the server's received count was still moving at the settle deadline.
    pub settled: bool,
    /// Whether the query phase ran.
    pub verified: bool,
    pub apps_checked: u64,
    /// True when a random sample of the apps was checked rather than all of them.
    pub apps_sampled: bool,
    pub wrong_answers: u64,
}

impl Summary {
    /// Whether the run passed: every answer checked was right.
    pub fn ok(&self) -> bool {
        self.wrong_answers == 0
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the summary serializes")
    }

    /// The human summary, a few lines.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let rate = if self.target_rate_per_s > 0.0 {
            format!("target {}/s", si(self.target_rate_per_s))
        } else {
            "unpaced".to_owned()
        };
        let _ = writeln!(
            out,
            "sent:     {} datagrams in {:.2} s: {}/s ({rate}), {} send-buffer back-offs",
            self.sent,
            self.elapsed_s,
            si(self.send_rate_per_s),
            self.send_backoffs
        );
        let ingested = self
            .ingested
            .map_or_else(String::new, |n| format!(", ingested {n}"));
        let invalid = self
            .invalid
            .map_or_else(String::new, |n| format!(", invalid {n}"));
        let dropped = self
            .dropped_at_caps
            .map_or_else(String::new, |n| format!(", dropped at --max-apps {n}"));
        let _ = writeln!(
            out,
            "server:   received {}{ingested}, lost {} ({:.3}%), kernel drops {}{invalid}{dropped}{}",
            self.received,
            self.lost,
            self.lost_percent,
            self.kernel_drops,
            if self.settled {
                ""
            } else {
                " (still receiving at the deadline)"
            }
        );
        if self.verified {
            let scope = if self.apps_sampled {
                format!(
                    "a random sample of {} of {} apps",
                    self.apps_checked, self.apps
                )
            } else {
                format!("{} of {} apps", self.apps_checked, self.apps)
            };
            let _ = writeln!(
                out,
                "answers:  checked {scope}: {} wrong",
                self.wrong_answers
            );
        } else {
            let _ = writeln!(out, "answers:  not checked (--no-verify)");
        }
        let _ = writeln!(
            out,
            "result:   {} (scenario {}, seed {})",
            if self.ok() { "PASS" } else { "FAIL" },
            self.scenario,
            self.seed
        );
        out
    }
}
