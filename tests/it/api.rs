//! The REST API against the real HTTP server: POST mode, every error status, and a 503 when
//! a worker does not answer.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{self, Response, Server};

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn posted_events_are_counted_before_the_answer() {
    let server = Server::start(&["--workers", "2"]);
    let octet = [("Content-Type", "application/octet-stream")];
    for i in 0..40u32 {
        let ip = 0x0a00_0000 + (i % 16);
        let response = server.request(
            "POST",
            "/events",
            &octet,
            &ipevents::wire::encode(SHA, ip.into()),
        );
        assert_eq!(response.status, 204, "{}", response.text());
    }
    // Upper-case digits name the same app.
    let answer = server.answer(&SHA.to_uppercase());
    assert_eq!(answer["count"], 40);
    assert_eq!(
        answer["bad_ips"],
        serde_json::json!(["10.0.0.0", "10.0.0.15"])
    );
    assert_eq!(server.metric("ipevents_events_ingested_total"), 40);
}

#[track_caller]
fn check(response: Response, status: u16, error_contains: &str) {
    assert_eq!(response.status, status, "body {}", response.text());
    if status >= 400 {
        assert_eq!(response.header("Content-Type"), Some("application/json"));
        let body: serde_json::Value =
            serde_json::from_slice(&response.body).expect("JSON error body");
        let error = body["error"].as_str().expect("an error field");
        assert!(
            error.contains(error_contains),
            "error {error:?} lacks {error_contains:?}"
        );
    }
}

/// (method, path, headers, body, expected status, text the error must contain).
type Case<'a> = (
    &'a str,
    String,
    Vec<(&'a str, &'a str)>,
    Vec<u8>,
    u16,
    &'a str,
);

#[test]
fn every_error_status() {
    let server = Server::start(&["--workers", "1"]);
    let app = format!("/events/{SHA}");
    let octet = ("Content-Type", "application/octet-stream");
    let valid = ipevents::wire::encode(SHA, 1);
    let cases: Vec<Case> = vec![
        ("GET", "/healthz".into(), vec![], vec![], 200, ""),
        (
            "GET",
            app.clone(),
            vec![("Accept", "application/json")],
            vec![],
            200,
            "",
        ),
        (
            "GET",
            format!("{app}?pretty=1"),
            vec![("Accept", "*/*")],
            vec![],
            200,
            "",
        ),
        (
            "GET",
            "/events/abc".into(),
            vec![],
            vec![],
            400,
            "64 hex digits",
        ),
        (
            "GET",
            format!("/events/{}", "g".repeat(64)),
            vec![],
            vec![],
            400,
            "64 hex digits",
        ),
        (
            "DELETE",
            format!("/events/{SHA}0"),
            vec![],
            vec![],
            400,
            "64 hex digits",
        ),
        ("GET", "/".into(), vec![], vec![], 404, "no route"),
        // A path with more segments than /events/{app_sha256} is an unknown path (issue 10).
        ("GET", "/events/x/y".into(), vec![], vec![], 404, "no route"),
        (
            "GET",
            format!("/events/{SHA}/extra"),
            vec![],
            vec![],
            404,
            "no route",
        ),
        ("GET", "/nope".into(), vec![], vec![], 404, "no route"),
        ("PUT", app.clone(), vec![], vec![], 405, "not allowed"),
        ("GET", "/events".into(), vec![], vec![], 405, "not allowed"),
        (
            "POST",
            "/healthz".into(),
            vec![octet],
            valid.clone(),
            405,
            "not allowed",
        ),
        (
            "DELETE",
            "/metrics".into(),
            vec![],
            vec![],
            405,
            "not allowed",
        ),
        (
            "GET",
            app.clone(),
            vec![("Accept", "text/html")],
            vec![],
            406,
            "application/json",
        ),
        (
            "GET",
            app.clone(),
            vec![("Accept", "application/json;q=0")],
            vec![],
            406,
            "application/json",
        ),
        (
            "POST",
            "/events".into(),
            vec![("Content-Type", "text/plain")],
            valid.clone(),
            415,
            "octet-stream",
        ),
        (
            "POST",
            "/events".into(),
            vec![],
            valid.clone(),
            415,
            "octet-stream",
        ),
        (
            "POST",
            "/events".into(),
            vec![octet],
            vec![0x0a; 5000],
            413,
            "4096",
        ),
        (
            "POST",
            "/events".into(),
            vec![octet],
            vec![0xff, 0xff],
            400,
            "malformed",
        ),
        (
            "POST",
            "/events".into(),
            vec![octet],
            ipevents::wire::encode("abc", 1),
            400,
            "bad_sha",
        ),
        (
            "POST",
            "/events".into(),
            vec![octet],
            ipevents::wire::encode(SHA, -1),
            400,
            "ip_out_of_range",
        ),
        ("POST", "/events".into(), vec![octet], vec![], 400, "empty"),
    ];
    for (method, path, headers, body, status, error) in cases {
        let response = server.request(method, &path, &headers, &body);
        assert_eq!(
            response.status,
            status,
            "{method} {path} {headers:?}: {}",
            response.text()
        );
        check(response, status, error);
    }
    let allow = |method: &str, path: &str| {
        server
            .request(method, path, &[], b"")
            .header("Allow")
            .map(str::to_owned)
    };
    assert_eq!(allow("PUT", &app).as_deref(), Some("GET, DELETE"));
    assert_eq!(allow("GET", "/events").as_deref(), Some("POST, DELETE"));
    assert_eq!(allow("PATCH", "/healthz").as_deref(), Some("GET"));
    assert_eq!(server.get("/healthz").text(), "ok");
    // Every request above was counted by route and status.
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("ipevents_http_requests_total{route=\"/events\",code=\"415\"} 2"),
        "{metrics}"
    );
}

/// A worker that never answers makes a request fail with 503 within the reply timeout, and
/// never hang. The worker is built but not run, so it cannot answer.
#[test]
fn a_silent_worker_gives_503_not_a_hang() {
    use ipevents::store::{AppBudget, AppTable, Limits};
    let (sockets, _) =
        ipevents::socket::bind_reuseport_group("127.0.0.1:0".parse().unwrap(), 1, 1 << 20).unwrap();
    let budget = Arc::new(AppBudget::new(10));
    let table = AppTable::new(
        Limits {
            max_ips_per_app: 10,
        },
        budget.clone(),
    );
    let (_silent_worker, handle) =
        ipevents::worker::Worker::new(0, sockets.into_iter().next().unwrap(), table, 8).unwrap();
    let cluster = ipevents::cluster::Cluster::new(vec![handle], budget, Duration::from_millis(50));
    let mut api = ipevents::http::Api::new(ipevents::backend::Backend::Standalone(cluster));
    for (method, url, body) in [
        ("GET", format!("/events/{SHA}"), vec![]),
        ("DELETE", "/events".to_owned(), vec![]),
        ("POST", "/events".to_owned(), ipevents::wire::encode(SHA, 1)),
    ] {
        let request = ipevents::http::ApiRequest {
            method: method.into(),
            url,
            content_type: Some("application/octet-stream".into()),
            body,
            ..Default::default()
        };
        let response = api.respond(&request);
        assert_eq!(response.status, 503, "{method}");
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("did not answer"),
            "{body}"
        );
    }
    // The counters need no worker, so /metrics still answers.
    let metrics = api.respond(&ipevents::http::ApiRequest {
        method: "GET".into(),
        url: "/metrics".into(),
        ..Default::default()
    });
    assert_eq!(metrics.status, 200);
}

/// Answers always carry a Content-Length and are never chunked, even when the client asks
/// for chunks with TE: the gate relays an answer by its length.
#[test]
fn responses_are_never_chunked() {
    let server = Server::start(&["--workers", "2"]);
    let app = format!("/events/{SHA}");
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", app.as_str()),
        ("GET", "/nowhere"),
        ("PUT", "/events"),
        ("DELETE", "/events"),
    ] {
        let response = server.request(method, path, &[("TE", "chunked, trailers")], b"");
        assert_eq!(
            response.header("Transfer-Encoding"),
            None,
            "{method} {path}"
        );
        if response.status != 204 {
            let length: usize = response.header("Content-Length").unwrap().parse().unwrap();
            assert_eq!(length, response.body.len(), "{method} {path}");
        }
    }
}

/// The admin token comes from a file or the environment, never from the command line, and
/// the server never prints it.
#[test]
fn admin_token_from_a_file_and_never_echoed() {
    let dir = std::env::temp_dir().join(format!("ipevents-it-{}-token", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, "f1le-t0ken\n").unwrap();
    let token_path = token_file.to_str().unwrap();
    let server = Server::start(&["--workers", "1", "--admin-token-file", token_path]);
    let octet = ("Content-Type", "application/octet-stream");
    let event = ipevents::wire::encode(SHA, 1);
    let refused = server.request("POST", "/events", &[octet], &event);
    assert_eq!(refused.status, 401);
    let bearer = ("Authorization", "Bearer f1le-t0ken");
    let accepted = server.request("POST", "/events", &[octet, bearer], &event);
    assert_eq!(accepted.status, 204);
    let startup = server.startup_log.clone();
    let exit = server.stop();
    assert!(exit.status.success(), "{}", exit.stderr);
    let printed = format!("{startup}{}{}", exit.stderr, exit.stdout);
    assert!(!printed.contains("f1le-t0ken"), "{printed}");

    let loopback = ["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-pin"];
    let with_file = [&loopback[..], &["--admin-token-file", token_path]].concat();
    let empty_file = dir.join("empty");
    std::fs::write(&empty_file, "\n").unwrap();
    let with_empty = [
        &loopback[..],
        &["--admin-token-file", empty_file.to_str().unwrap()],
    ]
    .concat();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            with_file.clone(),
            vec![("IPEVENTS_ADMIN_TOKEN", "3nv-t0ken")],
            "keep one",
        ),
        (with_empty, vec![], "the admin token is empty"),
    ];
    for (args, env, message) in cases {
        let exit = support::run_to_exit_with_env(&args, &env);
        assert_eq!(exit.status.code(), Some(1), "{args:?}: {}", exit.stderr);
        assert!(exit.stderr.contains(message), "{args:?}: {}", exit.stderr);
        assert_eq!(exit.stderr.lines().count(), 1, "{}", exit.stderr);
        for secret in ["3nv-t0ken", "f1le-t0ken"] {
            assert!(!exit.stderr.contains(secret), "{}", exit.stderr);
        }
    }
    // There is no flag that takes the token itself.
    let exit = support::run_to_exit(&[&loopback[..], &["--admin-token", "cl1-t0ken"]].concat());
    assert_eq!(exit.status.code(), Some(2), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("unexpected argument '--admin-token'"),
        "{}",
        exit.stderr
    );
    assert!(!exit.stderr.contains("cl1-t0ken"), "{}", exit.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn admin_token_guards_changes_but_not_reads() {
    let server = Server::start_with_env(
        &["--workers", "1"],
        &[("IPEVENTS_ADMIN_TOKEN", "s3cret-token")],
    );
    let octet = ("Content-Type", "application/octet-stream");
    let event = ipevents::wire::encode(SHA, 1);
    let app = format!("/events/{SHA}");
    let cases: Vec<(&str, &str, Option<&str>, u16)> = vec![
        ("POST", "/events", None, 401),
        ("POST", "/events", Some("Bearer wrong"), 401),
        ("POST", "/events", Some("Bearer s3cret-toke"), 401),
        ("POST", "/events", Some("Basic s3cret-token"), 401),
        ("POST", "/events", Some("Bearer s3cret-token"), 204),
        ("GET", &app, None, 200),
        ("GET", "/metrics", None, 200),
        ("DELETE", &app, None, 401),
        ("DELETE", "/events", Some("Bearer nope"), 401),
    ];
    for (method, path, authorization, status) in cases {
        let mut headers = vec![octet];
        if let Some(value) = authorization {
            headers.push(("Authorization", value));
        }
        let body: &[u8] = if method == "POST" { &event } else { b"" };
        let response = server.request(method, path, &headers, body);
        assert_eq!(response.status, status, "{method} {path} {authorization:?}");
        if status == 401 {
            assert_eq!(response.header("WWW-Authenticate"), Some("Bearer"));
            check(response, 401, "Bearer");
        }
    }
    // Nothing a refused request asked for happened.
    assert_eq!(server.answer(SHA)["count"], 1);
    let authorized = [("Authorization", "Bearer s3cret-token")];
    assert_eq!(
        server.request("DELETE", "/events", &authorized, b"").status,
        204
    );
    assert_eq!(server.answer(SHA)["count"], 0);
}
