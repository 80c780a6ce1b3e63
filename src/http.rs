//! The REST API: routing, content negotiation, JSON bodies and `/metrics`, served by one
//! blocking tiny_http thread.
//!
//! [`Api::respond`] maps an [`ApiRequest`] to an [`ApiResponse`] with no socket involved, so
//! the handling is testable and fuzzable on its own; [`serve`] only moves requests between
//! tiny_http and it. The API never touches a worker's table: it goes through the [`Backend`].

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::backend::Backend;
use crate::cluster::{Cluster, Unavailable};
use crate::gate::{GateCounters, Refusal, FORWARDED_HEADERS};
use crate::metrics::{self, GateSample, SnapshotSample, Stats, Totals, WorkerSample};
use crate::process;
use crate::snapshot::SnapshotCounters;
use crate::store::{Applied, Verdict};
use crate::wire::{self, AppKey};
use crate::worker::{as_nanos, new_histogram};

/// The largest body `POST /events` takes. It is configured with the gate's limits, which
/// refuse a larger body before it reaches the API; the API checks it again for requests that
/// come by other means (the fuzzer drives [`Api::respond`] directly).
pub use crate::gate::MAX_BODY_BYTES;

/// The routes, as they are labelled in `/metrics`: a small fixed set, never a sha.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    App,
    Events,
    Healthz,
    Metrics,
    Unknown,
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::App => "/events/{app_sha256}",
            Route::Events => "/events",
            Route::Healthz => "/healthz",
            Route::Metrics => "/metrics",
            Route::Unknown => "other",
        }
    }

    fn of(path: &str) -> Route {
        match path {
            "/events" => Route::Events,
            "/healthz" => Route::Healthz,
            "/metrics" => Route::Metrics,
            // One more segment names an app; a path with more segments is unknown.
            _ if path
                .strip_prefix("/events/")
                .is_some_and(|app| !app.contains('/')) =>
            {
                Route::App
            }
            _ => Route::Unknown,
        }
    }

    /// The methods the route answers, for 405's `Allow` header.
    fn allow(self) -> &'static str {
        match self {
            Route::App => "GET, DELETE",
            Route::Events => "POST, DELETE",
            Route::Healthz | Route::Metrics => "GET",
            Route::Unknown => "",
        }
    }
}

/// A request, as far as the API cares.
#[derive(Clone, Debug, Default)]
pub struct ApiRequest {
    pub method: String,
    /// The request target: a path, possibly with a query string, which is ignored.
    pub url: String,
    pub accept: Option<String>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    /// The body, read up to one byte past [`MAX_BODY_BYTES`].
    pub body: Vec<u8>,
    /// The declared body length, when the client declared one.
    pub content_length: Option<usize>,
}

/// A response, before it is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub allow: Option<&'static str>,
    /// A 401 names the scheme it wants in `WWW-Authenticate`.
    pub www_authenticate: bool,
    pub body: Vec<u8>,
}

impl ApiResponse {
    fn json(status: u16, value: &impl Serialize) -> ApiResponse {
        ApiResponse {
            status,
            content_type: Some("application/json"),
            allow: None,
            www_authenticate: false,
            body: serde_json::to_vec(value).expect("API bodies serialize"),
        }
    }

    fn error(status: u16, message: impl Into<String>) -> ApiResponse {
        #[derive(Serialize)]
        struct Error {
            error: String,
        }
        ApiResponse::json(
            status,
            &Error {
                error: message.into(),
            },
        )
    }

    fn text(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> ApiResponse {
        ApiResponse {
            status,
            content_type: Some(content_type),
            allow: None,
            www_authenticate: false,
            body: body.into(),
        }
    }

    fn no_content() -> ApiResponse {
        ApiResponse {
            status: 204,
            content_type: None,
            allow: None,
            www_authenticate: false,
            body: Vec::new(),
        }
    }

    fn unavailable(error: Unavailable) -> ApiResponse {
        ApiResponse::error(503, error.0)
    }
}

/// The JSON answer of `GET /events/{app_sha256}`.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct AppAnswer {
    pub count: u64,
    pub good_ips: Vec<String>,
    pub bad_ips: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ips_truncated: bool,
}

impl From<&Verdict> for AppAnswer {
    fn from(verdict: &Verdict) -> AppAnswer {
        let quads = |ips: &[u32]| ips.iter().map(|&ip| wire::dotted_quad(ip)).collect();
        AppAnswer {
            count: verdict.count,
            good_ips: quads(&verdict.good_ips),
            bad_ips: quads(&verdict.bad_ips),
            ips_truncated: verdict.ips_truncated,
        }
    }
}

/// The state of the HTTP thread: the backend, and the request counts and latencies that only
/// this thread writes.
pub struct Api {
    backend: Backend,
    /// When set, DELETE and POST need `Authorization: Bearer <token>`.
    admin_token: Option<Vec<u8>>,
    /// The snapshot thread's counters, when there is a state file.
    pub snapshots: Option<Arc<SnapshotCounters>>,
    /// The HTTP gate's counters.
    pub gate: Option<Arc<GateCounters>>,
    pub requests: BTreeMap<(Route, u16), u64>,
    /// `GET /events/{app_sha256}` latency, nanoseconds.
    pub query_ns: Histogram<u64>,
    /// `DELETE /events` and `DELETE /events/{app_sha256}` latency, nanoseconds.
    pub reset_ns: Histogram<u64>,
    /// The workers' latency families, rendered from their merged histograms, and when those
    /// were fetched.
    worker_latencies: Option<(Instant, String)>,
    /// The last `process_*` figures and when they were read.
    process: Option<(Instant, process::ProcessSample)>,
    /// Other parts of the server with families of their own for `/metrics`.
    metric_sources: Vec<Box<dyn metrics::Source>>,
}

/// How old the workers' histograms in `/metrics` may be. Fetching them costs every worker a
/// copy of its histograms, so a client polling `/metrics` in a tight loop must not make the
/// workers copy on every request.
const WORKER_LATENCIES_MAX_AGE: Duration = Duration::from_secs(1);

/// How old the `process_*` figures in `/metrics` may be. Reading them takes four files and a
/// directory listing of /proc, about as much CPU as the rest of `/metrics`; a client polling
/// in a tight loop (the benchmark polls every 2 ms while the workers drain) must not take
/// that from the workers on every request.
const PROCESS_SAMPLE_MAX_AGE: Duration = Duration::from_secs(1);

impl Api {
    pub fn new(backend: Backend) -> Api {
        Api {
            backend,
            admin_token: None,
            snapshots: None,
            gate: None,
            requests: BTreeMap::new(),
            query_ns: new_histogram(),
            reset_ns: new_histogram(),
            worker_latencies: None,
            process: None,
            metric_sources: Vec::new(),
        }
    }

    /// Requires `Authorization: Bearer <token>` on the requests that change data.
    pub fn with_admin_token(mut self, token: Option<&str>) -> Api {
        self.admin_token = token.map(|t| t.as_bytes().to_vec());
        self
    }

    /// Reports the HTTP gate's counters in `/metrics`.
    pub fn with_gate(mut self, counters: Arc<GateCounters>) -> Api {
        self.gate = Some(counters);
        self
    }

    /// Reports the snapshot thread's counters in `/metrics`.
    pub fn with_snapshots(mut self, counters: Option<Arc<SnapshotCounters>>) -> Api {
        self.snapshots = counters;
        self
    }

    /// Adds families of another part of the server (a store backend, say) to `/metrics`.
    pub fn with_metric_source(mut self, source: Box<dyn metrics::Source>) -> Api {
        self.metric_sources.push(source);
        self
    }

    pub fn cluster(&self) -> &Cluster {
        self.backend.workers()
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// What `/metrics` shows, as plain values.
    pub fn stats(&mut self) -> Stats<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        let worker_latencies_fetched = self.fetch_worker_latencies();
        let process = self.process_sample();
        let snapshots = self.snapshots.as_ref().map(|c| SnapshotSample {
            taken: c.taken.load(Relaxed),
            failed: c.failed.load(Relaxed),
            last_apps: c.last_apps.load(Relaxed),
            last_duration_ns: c.last_duration_ns.load(Relaxed),
            last_success_unix_s: c.last_success_unix_s.load(Relaxed),
        });
        let gate = self.gate.as_ref().map(|c| GateSample {
            open_connections: c.open_connections.load(Relaxed),
            accepted: c.accepted.load(Relaxed),
            refused: Refusal::ALL.map(|r| (r.as_str(), c.refused(r))).to_vec(),
        });
        let extra = self
            .metric_sources
            .iter()
            .map(|source| {
                let mut families = String::new();
                source.render(&mut families);
                families
            })
            .collect();
        Stats {
            workers: WorkerSample::of(self.cluster()),
            totals: Totals::of(self.cluster()),
            app_entries: self.cluster().app_entries(),
            apps_distinct: self.cluster().apps(),
            snapshots,
            gate,
            requests: self
                .requests
                .iter()
                .map(|(&(route, status), &count)| (route.label(), status, count))
                .collect(),
            worker_latencies: self
                .worker_latencies
                .as_ref()
                .filter(|_| worker_latencies_fetched)
                .map(|(_, families)| families.as_str()),
            query_ns: &self.query_ns,
            reset_ns: &self.reset_ns,
            process,
            extra,
            store_backlog_drops: self
                .backend
                .node()
                .map_or(0, |node| node.counters.backlog_drops.load(Relaxed)),
        }
    }

    /// Fetches the workers' merged latency histograms and renders their families, at most
    /// once per [`WORKER_LATENCIES_MAX_AGE`]; false when a worker did not answer.
    fn fetch_worker_latencies(&mut self) -> bool {
        let fresh = self
            .worker_latencies
            .as_ref()
            .is_some_and(|(fetched, _)| fetched.elapsed() < WORKER_LATENCIES_MAX_AGE);
        if fresh {
            return true;
        }
        let Ok(stats) = self.cluster().stats() else {
            return false;
        };
        let families = metrics::worker_latency_families(&metrics::merge_latencies(&stats));
        self.worker_latencies = Some((Instant::now(), families));
        true
    }

    /// The process's figures, read from /proc at most once per [`PROCESS_SAMPLE_MAX_AGE`];
    /// `None` when /proc cannot be read.
    fn process_sample(&mut self) -> Option<process::ProcessSample> {
        let fresh = self
            .process
            .as_ref()
            .is_some_and(|(read, _)| read.elapsed() < PROCESS_SAMPLE_MAX_AGE);
        if !fresh {
            self.process = Some((Instant::now(), process::sample().ok()?));
        }
        self.process.as_ref().map(|(_, sample)| sample.clone())
    }

    /// Answers one request and counts it by route and status.
    pub fn respond(&mut self, request: &ApiRequest) -> ApiResponse {
        let started = Instant::now();
        let path = request.url.split(['?', '#']).next().unwrap_or("");
        let route = Route::of(path);
        let response = self.route(route, path, request);
        *self.requests.entry((route, response.status)).or_default() += 1;
        let elapsed_ns = as_nanos(started.elapsed());
        match (route, request.method.as_str(), response.status) {
            (Route::App, "GET", 200) => self.query_ns.saturating_record(elapsed_ns),
            (Route::App | Route::Events, "DELETE", 204) => {
                self.reset_ns.saturating_record(elapsed_ns)
            }
            _ => {}
        }
        response
    }

    fn route(&mut self, route: Route, path: &str, request: &ApiRequest) -> ApiResponse {
        let method = request.method.as_str();
        let changes_data = matches!(
            (route, method),
            (Route::App | Route::Events, "DELETE" | "POST")
        );
        if changes_data && !self.authorized(request.authorization.as_deref()) {
            let mut response = ApiResponse::error(
                401,
                "DELETE and POST need Authorization: Bearer <admin token>",
            );
            response.www_authenticate = true;
            return response;
        }
        match (route, method) {
            (Route::Unknown, _) => ApiResponse::error(404, format!("no route for {path}")),
            (Route::Healthz, "GET") => match self.backend.unhealthy() {
                None => ApiResponse::text(200, "text/plain", "ok"),
                Some(problem) => ApiResponse::text(503, "text/plain", problem),
            },
            (Route::Metrics, "GET") => {
                let text = metrics::render(&self.stats());
                ApiResponse::text(200, "text/plain; version=0.0.4", text)
            }
            (Route::Events, "DELETE") => match self.backend.reset_all() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => ApiResponse::unavailable(e),
            },
            (Route::Events, "POST") => self.post_event(request),
            (Route::App, "GET" | "DELETE") => {
                let Some(app) = parse_app(&path["/events/".len()..]) else {
                    return ApiResponse::error(400, "app_sha256 must be 64 hex digits");
                };
                if method == "DELETE" {
                    return match self.backend.reset_app(app) {
                        Ok(()) => ApiResponse::no_content(),
                        Err(e) => ApiResponse::unavailable(e),
                    };
                }
                if !accepts_json(request.accept.as_deref()) {
                    return ApiResponse::error(
                        406,
                        "this resource is only available as application/json",
                    );
                }
                match self.backend.query(app) {
                    Ok(verdict) => ApiResponse::json(200, &AppAnswer::from(&verdict)),
                    Err(e) => ApiResponse::unavailable(e),
                }
            }
            _ => {
                let mut response =
                    ApiResponse::error(405, format!("{method} is not allowed on {path}"));
                response.allow = Some(route.allow());
                response
            }
        }
    }

    /// Whether the request may change data. The token is compared in constant time, so the
    /// time to refuse says nothing about how much of a guess was right.
    fn authorized(&self, authorization: Option<&str>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(token) = &self.admin_token else {
            return true;
        };
        // The scheme is case-insensitive (RFC 7235): `bearer T` is `Bearer T`.
        let Some((scheme, presented)) = authorization.and_then(|value| value.split_once(' '))
        else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("Bearer") {
            return false;
        }
        bool::from(presented.trim().as_bytes().ct_eq(token))
    }

    fn post_event(&mut self, request: &ApiRequest) -> ApiResponse {
        let media_type = request.content_type.as_deref().map(media_type);
        if !media_type.is_some_and(|t| t.eq_ignore_ascii_case("application/octet-stream")) {
            return ApiResponse::error(
                415,
                "the body must be one IpEvent as application/octet-stream",
            );
        }
        if request.content_length.unwrap_or(0) > MAX_BODY_BYTES
            || request.body.len() > MAX_BODY_BYTES
        {
            return ApiResponse::error(
                413,
                format!("the body may hold at most {MAX_BODY_BYTES} bytes"),
            );
        }
        let event = match wire::parse(&request.body) {
            Ok(event) => event,
            Err(reason) => {
                return ApiResponse::error(400, format!("invalid IpEvent: {}", reason.as_str()))
            }
        };
        match self.backend.apply(event) {
            Ok(Applied::Stored | Applied::IpDropped) => ApiResponse::no_content(),
            Ok(Applied::AppDropped) => {
                ApiResponse::error(507, "the server is at its --max-apps limit")
            }
            Err(e) => ApiResponse::unavailable(e),
        }
    }
}

fn parse_app(segment: &str) -> Option<AppKey> {
    if segment.len() != 64 {
        return None;
    }
    AppKey::from_hex(segment.as_bytes())
}

/// The media type of a Content-Type or Accept entry, without parameters.
fn media_type(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

/// Whether an Accept header admits `application/json`. No header admits anything; a range
/// with `q=0` rules its types out.
pub fn accepts_json(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return true;
    };
    if accept.trim().is_empty() {
        return true;
    }
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let kind = parts.next().unwrap_or("").trim();
        let matches = ["application/json", "application/*", "*/*"]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(kind));
        let refused = parts.any(|param| {
            let param = param.trim();
            let Some((name, value)) = param.split_once('=') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("q")
                && value.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
        });
        matches && !refused
    })
}

/// Reads what the API needs from a tiny_http request; the body only up to one byte past the
/// limit, so a huge body costs no memory.
pub fn read_request(request: &mut tiny_http::Request) -> ApiRequest {
    let mut api_request = ApiRequest {
        method: request.method().as_str().to_owned(),
        url: request.url().to_owned(),
        accept: request_header(request, "Accept"),
        content_type: request_header(request, "Content-Type"),
        authorization: request_header(request, "Authorization"),
        body: Vec::new(),
        content_length: request.body_length(),
    };
    if api_request.content_length.unwrap_or(0) <= MAX_BODY_BYTES {
        let _ = request
            .as_reader()
            .take(MAX_BODY_BYTES as u64 + 1)
            .read_to_end(&mut api_request.body);
    }
    api_request
}

/// The value of a request header. Requests reach the API through the gate, which forwards
/// only [`FORWARDED_HEADERS`]: reading any other header would see nothing in production, so
/// it is refused here, and a test checks every call in this file against the gate's list.
fn request_header(request: &tiny_http::Request, name: &'static str) -> Option<String> {
    assert!(
        FORWARDED_HEADERS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name)),
        "the gate does not forward {name}"
    );
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().to_owned())
}

/// Answers requests until `server` is unblocked; returns the API for the final report.
pub fn serve(
    server: &tiny_http::Server,
    mut api: Api,
    stopping: &std::sync::atomic::AtomicBool,
) -> Api {
    use std::sync::atomic::Ordering;
    loop {
        let mut request = match server.recv() {
            Ok(request) => request,
            Err(_) if stopping.load(Ordering::Acquire) => return api,
            Err(e) => {
                log::error!("http: {e}");
                continue;
            }
        };
        let api_request = read_request(&mut request);
        let response = api.respond(&api_request);
        let _ = request.respond(to_tiny_http(response));
    }
}

fn to_tiny_http(response: ApiResponse) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    // A known length, never chunked: the gate relays by Content-Length.
    let mut out = tiny_http::Response::from_data(response.body)
        .with_status_code(response.status)
        .with_chunked_threshold(usize::MAX);
    if let Some(content_type) = response.content_type {
        out.add_header(response_header("Content-Type", content_type));
    }
    if let Some(allow) = response.allow {
        out.add_header(response_header("Allow", allow));
    }
    if response.www_authenticate {
        out.add_header(response_header("WWW-Authenticate", "Bearer"));
    }
    out
}

fn response_header(name: &'static str, value: &'static str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name, value).expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let cases = [
            (None, true),
            (Some(""), true),
            (Some("application/json"), true),
            (Some("Application/JSON; charset=utf-8"), true),
            (Some("text/html, application/*;q=0.5"), true),
            (Some("*/*"), true),
            (Some("text/html"), false),
            (Some("text/plain, image/png"), false),
            (Some("application/json;q=0"), false),
            (Some("application/json; q=0.0, text/html"), false),
            (Some("application/xml"), false),
        ];
        for (accept, want) in cases {
            assert_eq!(accepts_json(accept), want, "Accept: {accept:?}");
        }
    }

    #[test]
    fn answer_json_shape() {
        let verdict = Verdict {
            count: 3,
            good_ips: (1..=14).map(|d| 0x0a00_0000 | d).collect(),
            bad_ips: vec![0x0102_0304],
            ips_truncated: false,
        };
        let json = serde_json::to_value(AppAnswer::from(&verdict)).unwrap();
        let good: Vec<String> = (1..=14).map(|d| format!("10.0.0.{d}")).collect();
        assert_eq!(
            json,
            serde_json::json!({"count": 3, "good_ips": good, "bad_ips": ["1.2.3.4"]})
        );
        let empty = Verdict {
            count: 0,
            good_ips: vec![],
            bad_ips: vec![],
            ips_truncated: false,
        };
        assert_eq!(
            serde_json::to_string(&AppAnswer::from(&empty)).unwrap(),
            r#"{"count":0,"good_ips":[],"bad_ips":[]}"#
        );
        let truncated = Verdict {
            ips_truncated: true,
            ..empty
        };
        assert_eq!(
            serde_json::to_value(AppAnswer::from(&truncated)).unwrap()["ips_truncated"],
            true
        );
    }

    /// The gate relays an answer by its Content-Length, so tiny_http must never chunk one,
    /// however large (its own threshold is 32 KiB).
    #[test]
    fn responses_are_never_chunked() {
        for (status, body_bytes) in [(200, 0), (200, 1 << 20), (404, 100), (204, 0)] {
            let response = ApiResponse::text(status, "text/plain", vec![b'x'; body_bytes]);
            let mut raw = Vec::new();
            to_tiny_http(response)
                .raw_print(&mut raw, (1, 1).into(), &[], false, None)
                .unwrap();
            let text = String::from_utf8_lossy(&raw);
            let head = &text[..text.find("\r\n\r\n").expect("a complete head")];
            assert!(
                !head.to_ascii_lowercase().contains("transfer-encoding"),
                "{head}"
            );
            if status != 204 {
                assert!(
                    head.contains(&format!("Content-Length: {body_bytes}")),
                    "{head}"
                );
            }
        }
    }

    #[test]
    fn routes() {
        assert_eq!(Route::of("/events"), Route::Events);
        assert_eq!(Route::of("/events/abc"), Route::App);
        assert_eq!(Route::of("/events/"), Route::App);
        assert_eq!(
            Route::of(&format!("/events/{}/extra", "ab".repeat(32))),
            Route::Unknown
        );
        assert_eq!(Route::of("/events//"), Route::Unknown);
        assert_eq!(Route::of("/eventsx"), Route::Unknown);
        assert_eq!(Route::of("/"), Route::Unknown);
        assert_eq!(parse_app(&"Ab".repeat(32)), Some(AppKey([0xab; 32])));
        assert_eq!(parse_app(&"ab".repeat(33)), None);
        assert_eq!(parse_app(&"zz".repeat(32)), None);
    }
}
