//! The end-of-run summary: what was sent, what the server received and lost, how fast, and
//! how many answers were wrong; as human text, or as one JSON object for scripts. A
//! `--send-only` run knows only what it sent, and has a [`SendSummary`] of its own.

use std::fmt::Write;

use serde::Serialize;

use crate::probe::QueryStats;
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
    /// Latencies of the queries made during the send phase (`--query-every-ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queries: Option<QueryStats>,
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
        let mut out = sent_line(
            self.sent,
            self.elapsed_s,
            self.send_rate_per_s,
            self.target_rate_per_s,
            self.send_backoffs,
        );
        if let Some(queries) = &self.queries {
            let _ = writeln!(
                out,
                "queries:  {} during the send ({} failed): p50 {:.3} ms, p99 {:.3} ms, \
                 max {:.3} ms",
                queries.count, queries.errors, queries.p50_ms, queries.p99_ms, queries.max_ms
            );
        }
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

/// The `sent:` line, shared by both summaries.
fn sent_line(
    sent: u64,
    elapsed_s: f64,
    send_rate_per_s: f64,
    target_rate_per_s: f64,
    backoffs: u64,
) -> String {
    let rate = if target_rate_per_s > 0.0 {
        format!("target {}/s", si(target_rate_per_s))
    } else {
        "unpaced".to_owned()
    };
    format!(
        "sent:     {sent} datagrams in {elapsed_s:.2} s: {}/s ({rate}), {backoffs} send-buffer \
         back-offs\n",
        si(send_rate_per_s)
    )
}

/// What a `--send-only` run knows: only what the kernel took from the senders. The JSON keys
/// are the field names, the same as [`Summary`]'s.
#[derive(Clone, Debug, Serialize)]
pub struct SendSummary {
    pub scenario: &'static str,
    pub seed: u64,
    pub apps: usize,
    pub sent: u64,
    /// 0 when unpaced.
    pub target_rate_per_s: f64,
    pub send_rate_per_s: f64,
    pub elapsed_s: f64,
    pub send_backoffs: u64,
}

impl SendSummary {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the summary serializes")
    }

    pub fn to_text(&self) -> String {
        let mut out = sent_line(
            self.sent,
            self.elapsed_s,
            self.send_rate_per_s,
            self.target_rate_per_s,
            self.send_backoffs,
        );
        let _ = writeln!(
            out,
            "result:   sent only, nothing read from the server (scenario {}, seed {})",
            self.scenario, self.seed
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(queries: Option<QueryStats>) -> Summary {
        Summary {
            scenario: "reference",
            seed: 1,
            apps: 3,
            sent: 10,
            received: 10,
            ingested: Some(10),
            lost: 0,
            lost_percent: 0.0,
            kernel_drops: 0,
            invalid: Some(0),
            dropped_at_caps: Some(0),
            target_rate_per_s: 0.0,
            send_rate_per_s: 5.0,
            elapsed_s: 2.0,
            send_backoffs: 0,
            settled: true,
            verified: false,
            apps_checked: 0,
            apps_sampled: false,
            wrong_answers: 0,
            queries,
        }
    }

    #[test]
    fn queries_show_only_when_made() {
        let plain = summary(None);
        assert!(!plain.to_json().contains("queries"));
        assert!(!plain.to_text().contains("queries:"));
        let probed = summary(Some(QueryStats {
            count: 7,
            errors: 1,
            p50_ms: 0.25,
            p99_ms: 1.5,
            max_ms: 2.0,
        }));
        assert!(probed.to_json().contains(
            r#""queries":{"count":7,"errors":1,"p50_ms":0.25,"p99_ms":1.5,"max_ms":2.0}"#
        ));
        assert!(probed
            .to_text()
            .contains("queries:  7 during the send (1 failed): p50 0.250 ms, p99 1.500 ms"));
    }

    #[test]
    fn send_only_summary() {
        let sent = SendSummary {
            scenario: "reference",
            seed: 9,
            apps: 3,
            sent: 100,
            target_rate_per_s: 0.0,
            send_rate_per_s: 50.0,
            elapsed_s: 2.0,
            send_backoffs: 0,
        };
        assert!(sent
            .to_json()
            .starts_with(r#"{"scenario":"reference","seed":9,"apps":3,"sent":100,"#));
        assert!(sent
            .to_text()
            .starts_with("sent:     100 datagrams in 2.00 s: 50/s (unpaced)"));
    }
}
