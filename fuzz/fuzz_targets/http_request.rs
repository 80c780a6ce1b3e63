//! Fuzzes the REST API in process: `Api::respond` over a `Cluster` of two real, running
//! workers, with requests read from the input in the format of `ipevents_fuzz::request_bytes`.
//!
//! Each input starts from an empty server (`DELETE /events`) and sends up to eight requests,
//! so a sequence such as post, post, query reproduces from its input alone. Every response is
//! checked against what the API promises whatever the request:
//!
//! - the status is one the API documents, and only known route and method pairs succeed;
//! - every error is `application/json` with a string `error` field, a 405 has an `Allow`
//!   header that does not name the refused method, a 401 asks for the token with
//!   `WWW-Authenticate`, and a 204 has no body;
//! - nothing changes data without the admin token the API is built with;
//! - a 200 for `GET /events/{sha}` is JSON whose `good_ips` are empty or the 14 hosts .1 to
//!   .14 of one /28, whose `bad_ips` are sorted and disjoint from them, and whose count and
//!   IPs match the events the earlier requests of the input posted with a 204.
//!
//! The workers and the API are built once per process: a worker is a thread with a socket,
//! and building two per input would cost more than the requests.
#![no_main]

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipevents::cluster::Cluster;
use ipevents::http::{Api, ApiRequest, ApiResponse, MAX_BODY_BYTES};
use ipevents::store::{AppBudget, AppTable, Limits};
use ipevents::wire::{self, AppKey};
use ipevents::worker::Worker;
use ipevents_fuzz::request_bytes::ADMIN_TOKEN;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const WORKERS: usize = 2;
/// Distinct apps for the whole server: few, so that an input reaches the cap (507).
const MAX_APPS: usize = 6;
/// Distinct IPs one worker keeps for one app: small, so that `ips_truncated` shows up.
const MAX_IPS_PER_APP: usize = 4;
/// Generous, so that a busy machine does not turn into 503s; a 503 is allowed all the same.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const BATCH_SIZE: usize = 8;

const STATUSES: [u16; 11] = [200, 204, 400, 401, 404, 405, 406, 413, 415, 503, 507];

/// What the input's requests have told the server so far.
#[derive(Default)]
struct AppModel {
    /// Events posted with a 204, each counted by the server whether or not its IP was kept.
    count: u64,
    ips: BTreeSet<u32>,
}

struct Harness {
    api: Api,
    apps: HashMap<AppKey, AppModel>,
    /// False after a 503 until the next reset: a request that timed out may still be applied
    /// later, so the counts are no longer known.
    known: bool,
}

impl Harness {
    fn start() -> Harness {
        let addr = "127.0.0.1:0".parse().expect("a socket address");
        let (sockets, _) = ipevents::socket::bind_reuseport_group(addr, WORKERS, 1 << 20)
            .expect("bind the worker sockets");
        let budget = Arc::new(AppBudget::new(MAX_APPS));
        let limits = Limits {
            max_ips_per_app: MAX_IPS_PER_APP,
        };
        let mut handles = Vec::with_capacity(WORKERS);
        for (id, socket) in sockets.into_iter().enumerate() {
            let table = AppTable::new(limits, budget.clone());
            let (worker, handle) =
                Worker::new(id, socket, table, BATCH_SIZE).expect("build a worker");
            // The worker runs until the process exits: every handle lives in the API.
            std::thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || worker.run())
                .expect("spawn a worker");
            handles.push(handle);
        }
        Harness {
            api: Api::new(ipevents::backend::Backend::Standalone(Cluster::new(
                handles,
                budget,
                REPLY_TIMEOUT,
            )))
                .with_admin_token(Some(ADMIN_TOKEN)),
            apps: HashMap::new(),
            known: false,
        }
    }

    fn run(&mut self, data: &[u8]) {
        let reset = ApiRequest {
            method: "DELETE".into(),
            url: "/events".into(),
            authorization: Some(format!("Bearer {ADMIN_TOKEN}")),
            ..Default::default()
        };
        let response = self.api.respond(&reset);
        self.apps.clear();
        self.known = response.status == 204;
        for request in ipevents_fuzz::request_bytes::decode(data) {
            let counted_before: u64 = self.api.requests.values().sum();
            let response = self.api.respond(&request);
            let counted_after: u64 = self.api.requests.values().sum();
            assert_eq!(counted_after, counted_before + 1, "requests counted");
            self.check(&request, &response);
        }
    }

    fn check(&mut self, request: &ApiRequest, response: &ApiResponse) {
        let method = request.method.as_str();
        let path = request.url.split(['?', '#']).next().unwrap_or("");
        let app_segment = path.strip_prefix("/events/");
        let status = response.status;
        let context = format!("{method} {:?} -> {status}", request.url);
        assert!(STATUSES.contains(&status), "{context}: unexpected status");

        if status >= 400 {
            assert_eq!(
                response.content_type,
                Some("application/json"),
                "{context}: error content type"
            );
            let body: Value = serde_json::from_slice(&response.body)
                .unwrap_or_else(|e| panic!("{context}: error body is not JSON: {e}"));
            assert!(
                body["error"].is_string(),
                "{context}: no string error field in {body}"
            );
        }
        match status {
            405 => {
                let allow = response.allow.expect("405 has an Allow header");
                assert!(!allow.is_empty(), "{context}: empty Allow");
                assert!(
                    allow.split(", ").all(|allowed| allowed != method),
                    "{context}: Allow {allow:?} names the refused method"
                );
            }
            204 => {
                assert!(response.body.is_empty(), "{context}: 204 with a body");
                assert_eq!(response.content_type, None, "{context}: 204 content type");
            }
            401 => {
                assert!(
                    response.www_authenticate,
                    "{context}: 401 without WWW-Authenticate"
                );
                assert!(
                    matches!(method, "POST" | "DELETE") && path.starts_with("/events"),
                    "{context}: a token asked of a request that changes nothing"
                );
            }
            503 => self.known = false,
            _ => {}
        }
        if matches!(status, 204 | 200) && matches!(method, "POST" | "DELETE") {
            // The scheme is case-insensitive (RFC 7235).
            let token = request
                .authorization
                .as_deref()
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
                .map(|(_, token)| token.trim());
            assert_eq!(
                token,
                Some(ADMIN_TOKEN),
                "{context}: changed data without the token"
            );
        }

        match (status, method) {
            (200, "GET") if path == "/healthz" => assert_eq!(response.body, b"ok"),
            (200, "GET") if path == "/metrics" => {
                assert!(!response.body.is_empty(), "{context}: empty metrics")
            }
            (200, "GET") if app_segment.is_some() => {
                let app = parse_app(app_segment.unwrap_or_default(), &context);
                self.check_answer(app, response, &context);
            }
            (204, "POST") if path == "/events" => {
                assert!(
                    request.body.len() <= MAX_BODY_BYTES
                        && request.content_length.unwrap_or(0) <= MAX_BODY_BYTES,
                    "{context}: took a body over the limit"
                );
                let event = wire::parse(&request.body)
                    .unwrap_or_else(|reason| panic!("{context}: took an invalid body: {reason:?}"));
                let app = self.apps.entry(event.app).or_default();
                app.count += 1;
                app.ips.insert(event.ip);
            }
            (204, "DELETE") if path == "/events" => self.apps.clear(),
            (204, "DELETE") if app_segment.is_some() => {
                let app = parse_app(app_segment.unwrap_or_default(), &context);
                self.apps.remove(&app);
            }
            (200 | 204, _) => panic!("{context}: success on a route that has no such method"),
            _ => {}
        }
    }

    /// Checks the JSON answer for one app, and against the model while it is known.
    fn check_answer(&self, app: AppKey, response: &ApiResponse, context: &str) {
        assert_eq!(response.content_type, Some("application/json"), "{context}");
        let body: Value = serde_json::from_slice(&response.body)
            .unwrap_or_else(|e| panic!("{context}: answer is not JSON: {e}"));
        let count = body["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("{context}: no count in {body}"));
        let good = ips(&body["good_ips"], context);
        let bad = ips(&body["bad_ips"], context);
        let truncated = match &body["ips_truncated"] {
            Value::Null => false,
            Value::Bool(truncated) => *truncated,
            other => panic!("{context}: ips_truncated is {other}"),
        };
        if let Some(&first) = good.first() {
            let network = first & !0xf;
            let hosts: Vec<u32> = (1..=14).map(|host| network | host).collect();
            assert_eq!(good, hosts, "{context}: good_ips are not .1-.14 of one /28");
        }
        assert!(
            bad.windows(2).all(|pair| pair[0] < pair[1]),
            "{context}: bad_ips are not sorted and distinct: {body}"
        );
        assert!(
            bad.iter().all(|ip| !good.contains(ip)),
            "{context}: an ip is good and bad: {body}"
        );
        if count == 0 {
            assert!(
                good.is_empty() && bad.is_empty(),
                "{context}: ips for no events"
            );
        }
        if !self.known {
            return;
        }
        let empty = AppModel::default();
        let model = self.apps.get(&app).unwrap_or(&empty);
        assert_eq!(count, model.count, "{context}: count");
        assert!(
            bad.iter().all(|ip| model.ips.contains(ip)),
            "{context}: a bad ip that was never posted: {body}"
        );
        if !truncated {
            assert!(
                model
                    .ips
                    .iter()
                    .all(|ip| good.contains(ip) || bad.contains(ip)),
                "{context}: a posted ip is missing: {body}"
            );
        }
    }
}

fn parse_app(segment: &str, context: &str) -> AppKey {
    assert_eq!(
        segment.len(),
        64,
        "{context}: took a sha that is not 64 digits"
    );
    AppKey::from_hex(segment.as_bytes())
        .unwrap_or_else(|| panic!("{context}: took a sha that is not hex"))
}

fn ips(value: &Value, context: &str) -> Vec<u32> {
    let list = value
        .as_array()
        .unwrap_or_else(|| panic!("{context}: {value} is not a list"));
    list.iter()
        .map(|ip| {
            let text = ip.as_str().unwrap_or_else(|| panic!("{context}: ip {ip}"));
            let ip: Ipv4Addr = text
                .parse()
                .unwrap_or_else(|e| panic!("{context}: ip {text:?}: {e}"));
            u32::from(ip)
        })
        .collect()
}

thread_local! {
    static HARNESS: RefCell<Harness> = RefCell::new(Harness::start());
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|harness| harness.borrow_mut().run(data));
});
