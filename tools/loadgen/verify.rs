//! The query phase: asks the server about every app (or a random sample) and checks each
//! answer against what the kernel took for that app.
//!
//! [`check`] is pure: it compares one parsed [`Answer`] with one [`Expected`] and lists the
//! problems. The rule it applies: when nothing was lost and the home block is decidable from
//! the IPs sent, the answer must be exact; otherwise it must at least invent nothing.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use rand::rngs::SmallRng;
use serde::Deserialize;

use crate::api::{excerpt, Api, ApiError};
use crate::scenario::{Scenario, GOOD_HOSTS};
use crate::send::{AppSent, Tally};

/// Wrong answers printed in full; the rest are only counted.
const WRONG_ANSWERS_SHOWN: u64 = 10;

/// What the server should know about one app: what the kernel took for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The network address of the app's home /28.
    pub block: u32,
    /// Good IPs sent at least once, ascending.
    pub sent_good: Vec<u32>,
    /// Bad IPs sent at least once, ascending.
    pub sent_bad: Vec<u32>,
    /// Events sent for the app.
    pub events: u64,
}

impl Expected {
    pub fn of(scenario: &Scenario, app: usize, sent: AppSent) -> Expected {
        let mut expected = Expected {
            block: scenario.block(app),
            sent_good: Vec::new(),
            sent_bad: Vec::new(),
            events: sent.events,
        };
        for (i, &ip) in scenario.ips(app).iter().enumerate() {
            if sent.ips_mask & (1 << i) == 0 {
                continue;
            }
            if scenario.is_good(i) {
                expected.sent_good.push(ip);
            } else {
                expected.sent_bad.push(ip);
            }
        }
        expected.sent_good.sort_unstable();
        expected.sent_bad.sort_unstable();
        expected
    }

    /// Whether the server's choice of home block follows from the IPs sent alone. Every bad
    /// IP sits in a /28 of its own, so two good IPs make the home block the only one with more
    /// than one distinct IP. With one good IP and some bad IP, the server breaks the tie by
    /// event counts per IP, which the tally does not keep.
    fn home_is_decidable(&self) -> bool {
        self.sent_good.len() >= 2 || (self.sent_good.len() == 1 && self.sent_bad.is_empty())
    }
}

/// The 14 hosts (.1 to .14) of the /28 holding `ip`.
fn hosts_of_block(ip: u32) -> Vec<u32> {
    let network = ip & 0xFFFF_FFF0;
    (1..=GOOD_HOSTS as u32).map(|host| network | host).collect()
}

/// A parsed `GET /events/{sha}` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub count: u64,
    pub good_ips: Vec<u32>,
    pub bad_ips: Vec<u32>,
    pub ips_truncated: Option<bool>,
}

#[derive(Deserialize)]
struct AnswerJson {
    count: u64,
    good_ips: Vec<String>,
    bad_ips: Vec<String>,
    ips_truncated: Option<bool>,
}

/// Parses an answer body; any shape other than the documented one is a problem.
pub fn parse_answer(body: &str) -> Result<Answer, String> {
    let json: AnswerJson = serde_json::from_str(body)
        .map_err(|e| format!("body is not an answer ({e}): {}", excerpt(body)))?;
    let quads = |key: &str, quads: &[String]| -> Result<Vec<u32>, String> {
        quads
            .iter()
            .map(|quad| {
                quad.parse::<Ipv4Addr>()
                    .map(u32::from)
                    .map_err(|_| format!("{key} holds {quad:?}, not a dotted quad"))
            })
            .collect()
    };
    Ok(Answer {
        count: json.count,
        good_ips: quads("good_ips", &json.good_ips)?,
        bad_ips: quads("bad_ips", &json.bad_ips)?,
        ips_truncated: json.ips_truncated,
    })
}

/// Lists what is wrong with `answer`. `lossless` says the server received every datagram
/// sent and the kernel dropped none, so the answer must account for every event.
pub fn check(expected: &Expected, answer: &Answer, lossless: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(truncated) = answer.ips_truncated {
        problems.push(format!(
            "ips_truncated is present ({truncated}), but the app has at most 64 IPs"
        ));
    }
    if answer.count > expected.events {
        problems.push(format!(
            "count is {} but only {} events were sent",
            answer.count, expected.events
        ));
    } else if lossless && answer.count < expected.events {
        problems.push(format!(
            "count is {}, expected {}: nothing was lost",
            answer.count, expected.events
        ));
    }
    if !answer.bad_ips.windows(2).all(|pair| pair[0] < pair[1]) {
        problems.push(format!(
            "bad_ips is not in ascending numeric order: {}",
            quads(&answer.bad_ips)
        ));
    }

    if expected.events == 0 {
        if !answer.good_ips.is_empty() || !answer.bad_ips.is_empty() {
            problems.push("nothing was sent for the app, but the lists are not empty".to_owned());
        }
        return problems;
    }
    if lossless && expected.home_is_decidable() {
        compare(
            &mut problems,
            "good_ips",
            &answer.good_ips,
            &hosts_of_block(expected.block),
        );
        compare(
            &mut problems,
            "bad_ips",
            &answer.bad_ips,
            &expected.sent_bad,
        );
        return problems;
    }

    // The server may have seen less than was sent (loss), or had to break a tie by event
    // counts (undecidable): check only that it invented nothing and, without loss, that it
    // forgot nothing.
    let sent: BTreeSet<u32> = expected
        .sent_good
        .iter()
        .chain(&expected.sent_bad)
        .copied()
        .collect();
    if answer.good_ips.is_empty() {
        if !answer.bad_ips.is_empty() {
            problems.push("good_ips is empty, but bad_ips is not".to_owned());
        }
        if lossless {
            problems.push("good_ips is empty, but events were sent".to_owned());
        }
        return problems;
    }
    let block_sent = sent.iter().any(|&ip| hosts_of_block(ip) == answer.good_ips);
    if !block_sent {
        problems.push(format!(
            "good_ips is not the 14 hosts of a /28 holding a sent IP: {}",
            quads(&answer.good_ips)
        ));
    }
    let invented: Vec<u32> = answer
        .bad_ips
        .iter()
        .filter(|ip| !sent.contains(ip) || answer.good_ips.contains(ip))
        .copied()
        .collect();
    if !invented.is_empty() {
        problems.push(format!(
            "bad_ips holds IPs never sent or also good: {}",
            quads(&invented)
        ));
    }
    if lossless {
        let forgotten: Vec<u32> = sent
            .iter()
            .filter(|ip| !answer.good_ips.contains(ip) && !answer.bad_ips.contains(ip))
            .copied()
            .collect();
        if !forgotten.is_empty() {
            problems.push(format!("IPs sent but not reported: {}", quads(&forgotten)));
        }
    }
    problems
}

/// Compares a reported list with the expected one as sets, naming what is missing and what
/// is unexpected.
fn compare(problems: &mut Vec<String>, key: &str, actual: &[u32], expected: &[u32]) {
    let actual: BTreeSet<u32> = actual.iter().copied().collect();
    let expected: BTreeSet<u32> = expected.iter().copied().collect();
    if actual == expected {
        return;
    }
    let missing: Vec<u32> = expected.difference(&actual).copied().collect();
    let unexpected: Vec<u32> = actual.difference(&expected).copied().collect();
    let mut detail = Vec::new();
    if !missing.is_empty() {
        detail.push(format!("missing {}", quads(&missing)));
    }
    if !unexpected.is_empty() {
        detail.push(format!("unexpected {}", quads(&unexpected)));
    }
    problems.push(format!("{key} differs: {}", detail.join("; ")));
}

fn quads(ips: &[u32]) -> String {
    let quads: Vec<String> = ips
        .iter()
        .map(|&ip| Ipv4Addr::from(ip).to_string())
        .collect();
    quads.join(", ")
}

/// How the query phase went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Verification {
    pub apps_checked: u64,
    /// True when only a random sample of the apps was queried.
    pub sampled: bool,
    pub wrong_answers: u64,
}

/// Queries every app, or `sample` random apps when there are more, and checks each answer.
/// Wrong answers are printed to stderr, the first few in full.
pub fn verify(
    api: &Api,
    scenario: &Scenario,
    tally: &Tally,
    lossless: bool,
    sample: usize,
    rng: &mut SmallRng,
) -> Result<Verification, ApiError> {
    let apps: Vec<usize> = if scenario.apps() > sample {
        let mut chosen = rand::seq::index::sample(rng, scenario.apps(), sample).into_vec();
        chosen.sort_unstable();
        chosen
    } else {
        (0..scenario.apps()).collect()
    };
    let mut verification = Verification {
        sampled: apps.len() < scenario.apps(),
        ..Verification::default()
    };
    for app in apps {
        let sha = scenario.sha_hex(app);
        let reply = api.query(sha)?;
        let problems = if reply.status != 200 {
            vec![format!(
                "GET /events/{sha} answered {}, expected 200: {}",
                reply.status,
                excerpt(&reply.body)
            )]
        } else {
            match parse_answer(&reply.body) {
                Ok(answer) => {
                    let expected = Expected::of(scenario, app, tally.apps[app]);
                    check(&expected, &answer, lossless)
                }
                Err(problem) => vec![problem],
            }
        };
        verification.apps_checked += 1;
        if problems.is_empty() {
            continue;
        }
        verification.wrong_answers += 1;
        if verification.wrong_answers <= WRONG_ANSWERS_SHOWN {
            eprintln!(
                "loadgen: wrong answer for app {sha}: {}",
                problems.join("; ")
            );
        }
    }
    if verification.wrong_answers > WRONG_ANSWERS_SHOWN {
        eprintln!(
            "loadgen: {} more wrong answers not shown",
            verification.wrong_answers - WRONG_ANSWERS_SHOWN
        );
    }
    Ok(verification)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_be_bytes([a, b, c, d])
    }

    const BLOCK: u32 = 0x0a00_0010; // 10.0.0.16/28

    fn expected(good_hosts: &[u32], bad: &[u32], events: u64) -> Expected {
        Expected {
            block: BLOCK,
            sent_good: good_hosts.iter().map(|h| BLOCK | h).collect(),
            sent_bad: bad.to_vec(),
            events,
        }
    }

    fn answer(count: u64, good_block: Option<u32>, bad: &[u32]) -> Answer {
        Answer {
            count,
            good_ips: good_block.map_or_else(Vec::new, hosts_of_block),
            bad_ips: bad.to_vec(),
            ips_truncated: None,
        }
    }

    #[track_caller]
    fn check_problems(expected: &Expected, answer: &Answer, lossless: bool, want: &[&str]) {
        let problems = check(expected, answer, lossless);
        assert_eq!(
            problems.len(),
            want.len(),
            "problems {problems:?}, want {want:?}"
        );
        for (problem, want) in problems.iter().zip(want) {
            assert!(problem.contains(want), "{problem:?} does not say {want:?}");
        }
    }

    #[test]
    fn exact_answers() {
        let bad = [ip(1, 2, 3, 4), ip(200, 0, 0, 1)];
        let sent = expected(&[1, 2, 14], &bad, 10);
        check_problems(&sent, &answer(10, Some(BLOCK), &bad), true, &[]);
        check_problems(
            &sent,
            &answer(9, Some(BLOCK), &bad),
            true,
            &["count is 9, expected 10"],
        );
        check_problems(
            &sent,
            &answer(11, Some(BLOCK), &bad),
            false,
            &["only 10 events were sent"],
        );
        check_problems(
            &sent,
            &answer(10, Some(BLOCK), &bad[..1]),
            true,
            &["bad_ips differs: missing 200.0.0.1"],
        );
        check_problems(
            &sent,
            &answer(10, Some(BLOCK), &[bad[1], bad[0]]),
            true,
            &["not in ascending numeric order"],
        );
        check_problems(
            &sent,
            &answer(10, Some(bad[0]), &bad),
            true,
            &["good_ips differs"],
        );
        let mut truncated = answer(10, Some(BLOCK), &bad);
        truncated.ips_truncated = Some(true);
        check_problems(&sent, &truncated, true, &["ips_truncated"]);
        // Nothing sent: the server knows nothing.
        check_problems(&expected(&[], &[], 0), &answer(0, None, &[]), true, &[]);
        check_problems(
            &expected(&[], &[], 0),
            &answer(0, Some(BLOCK), &[]),
            true,
            &["lists are not empty"],
        );
    }

    #[test]
    fn undecidable_or_lossy_answers_invent_nothing() {
        let bad = [ip(1, 2, 3, 4)];
        // One good IP and one bad IP: either /28 may be home.
        let tie = expected(&[5], &bad, 2);
        check_problems(&tie, &answer(2, Some(BLOCK), &bad), true, &[]);
        check_problems(&tie, &answer(2, Some(bad[0]), &[BLOCK | 5]), true, &[]);
        check_problems(
            &tie,
            &answer(2, Some(bad[0]), &[]),
            true,
            &["sent but not reported: 10.0.0.21"],
        );
        check_problems(
            &tie,
            &answer(2, Some(ip(9, 9, 9, 9)), &[bad[0], BLOCK | 5]),
            true,
            &["not the 14 hosts"],
        );
        // With loss, the server may have missed IPs, but must not report unsent ones.
        let sent = expected(&[1, 2, 3], &bad, 30);
        check_problems(&sent, &answer(20, Some(BLOCK), &[]), false, &[]);
        check_problems(&sent, &answer(0, None, &[]), false, &[]);
        check_problems(
            &sent,
            &answer(20, Some(BLOCK), &[ip(8, 8, 8, 8)]),
            false,
            &["never sent"],
        );
    }

    #[test]
    fn parses_answers() {
        let body = r#"{"count":3,"good_ips":["10.0.0.1"],"bad_ips":["1.2.3.4"]}"#;
        assert_eq!(
            parse_answer(body),
            Ok(Answer {
                count: 3,
                good_ips: vec![ip(10, 0, 0, 1)],
                bad_ips: vec![ip(1, 2, 3, 4)],
                ips_truncated: None
            })
        );
        let truncated = r#"{"count":0,"good_ips":[],"bad_ips":[],"ips_truncated":true}"#;
        assert_eq!(parse_answer(truncated).unwrap().ips_truncated, Some(true));
        assert!(parse_answer(r#"{"count":-1,"good_ips":[],"bad_ips":[]}"#).is_err());
        assert!(parse_answer(r#"{"count":1,"good_ips":["10.0.0"],"bad_ips":[]}"#).is_err());
        assert!(parse_answer("not json").is_err());
    }
}
