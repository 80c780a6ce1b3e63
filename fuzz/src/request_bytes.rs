//! The byte format of the `http_request` target's input: [`decode`] reads a short sequence of
//! [`ApiRequest`]s from raw bytes through an [`Unstructured`], and [`Writer`] writes the same
//! format, so that the seeds are written as requests rather than as opaque bytes.
//!
//! Most fields are picked from a small table of values that mean something to the API (the
//! routes, a few apps, the media types it negotiates), with an escape to arbitrary text, so
//! that the fuzzer reaches the real handlers quickly and still tries everything else. The
//! format is ours and not `#[derive(Arbitrary)]`'s because the derived format has no writer.
//!
//! The input is one request after another until it runs out, at most [`MAX_REQUESTS`]. Each
//! request is, in order:
//!
//! ```text
//! method          choice(METHODS)
//! url             a count byte (mod MAX_URL_PARTS + 1), then that many url parts, joined:
//!                   choice(URL_PARTS), where the first escape value is 32 bytes to be
//!                   hex-encoded (an app no table names) and any higher one is a text
//! accept          optional(ACCEPTS)
//! content type    optional(CONTENT_TYPES)
//! authorization   optional(AUTHORIZATIONS)
//! body            0 empty | 1 event(sha, 10.0.x.y from two bytes) | 2 event(sha, i64 from 8
//!                 bytes) | 3 one byte over MAX_BODY_BYTES | 4+ a u16 length, then the bytes
//! content length  0 none | 1 the body's length | 2 over the limit | 3 zero | 4+ a u32
//! ```
//!
//! A *choice* is one byte: below the table's length it picks that entry, at or above it a
//! *text* follows, one length byte and that many bytes read as lossy UTF-8. An *optional* is
//! a choice whose value 0 means absent. Integers are little-endian, and bytes past the end of
//! the input read as zero, so every input decodes.

use arbitrary::Unstructured;
use ipevents::http::{ApiRequest, MAX_BODY_BYTES};

/// Requests read from one input; a longer input is cut. Enough for a sequence such as post,
/// post, query, reset one app, query, within one input that reproduces on its own.
pub const MAX_REQUESTS: usize = 8;

/// Parts one URL is built from.
pub const MAX_URL_PARTS: u8 = 6;

/// Two apps the tables name, so that events posted in one request are found by another.
pub const SHA_A: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
pub const SHA_B: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// [`SHA_A`] in capitals: the same app.
pub const SHA_A_UPPER: &str = "0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF";

pub const METHODS: &[&str] = &["GET", "POST", "DELETE", "PUT", "HEAD", "PATCH", "get"];

pub const URL_PARTS: &[&str] = &[
    "/events",
    "/events/",
    SHA_A,
    SHA_B,
    SHA_A_UPPER,
    "/healthz",
    "/metrics",
    "?q",
    "?pretty=1",
    "#top",
    "/",
    "%2F",
    "0",
];

pub const ACCEPTS: &[&str] = &[
    "application/json",
    "*/*",
    "application/*",
    "text/html",
    "application/json;q=0",
    "text/html, application/json;q=0.5",
    "",
];

pub const CONTENT_TYPES: &[&str] = &[
    "application/octet-stream",
    "Application/Octet-Stream; charset=binary",
    "text/plain",
    "application/json",
    "",
];

/// The admin token the target's API is built with: DELETE and POST need it.
pub const ADMIN_TOKEN: &str = "secret";

pub const AUTHORIZATIONS: &[&str] = &[
    "Bearer secret",
    "Bearer  secret ",
    "Bearer wrong",
    "Bearer ",
    "bearer secret",
    "Basic dXNlcjpwYXNz",
    "",
];

/// The apps an event body can name.
pub const EVENT_SHAS: &[&str] = &[SHA_A, SHA_B, SHA_A_UPPER];

/// The base of the IPs an event body names with two bytes: 10.0.0.0/16 holds 4096 /28
/// blocks, few enough that posted events share blocks and compete for the home block.
pub const EVENT_IP_BASE: u32 = 0x0a00_0000;

/// What a request carries as its body.
#[derive(Clone, Copy, Debug)]
pub enum Body<'a> {
    Empty,
    /// An encoded `IpEvent` for `sha` at `EVENT_IP_BASE + host`.
    Event {
        sha: &'a str,
        host: u16,
    },
    /// An encoded `IpEvent` with any `ip`, negative and out of range included.
    EventWithIp {
        sha: &'a str,
        ip: i64,
    },
    /// One byte more than the API takes.
    Oversized,
    Bytes(&'a [u8]),
}

/// What the request declares as its Content-Length.
#[derive(Clone, Copy, Debug)]
pub enum ContentLength {
    None,
    Actual,
    OverLimit,
    Zero,
    Declared(u32),
}

/// Reads the requests an input holds; never fails.
pub fn decode(data: &[u8]) -> Vec<ApiRequest> {
    let mut u = Unstructured::new(data);
    let mut requests = Vec::new();
    while !u.is_empty() && requests.len() < MAX_REQUESTS {
        requests.push(read_request(&mut u));
    }
    requests
}

fn read_request(u: &mut Unstructured) -> ApiRequest {
    let method = read_choice(u, METHODS);
    let mut url = String::new();
    for _ in 0..read_byte(u) % (MAX_URL_PARTS + 1) {
        let index = usize::from(read_byte(u));
        if let Some(part) = URL_PARTS.get(index) {
            url.push_str(part);
        } else if index == URL_PARTS.len() {
            let mut app = [0u8; 32];
            app.copy_from_slice(&read_bytes::<32>(u));
            url.push_str(&ipevents::wire::AppKey(app).to_hex());
        } else {
            url.push_str(&read_text(u));
        }
    }
    let accept = read_optional(u, ACCEPTS);
    let content_type = read_optional(u, CONTENT_TYPES);
    let authorization = read_optional(u, AUTHORIZATIONS);
    let body = match read_byte(u) {
        0 => Vec::new(),
        1 => {
            let sha = read_choice(u, EVENT_SHAS);
            let host = u16::from_le_bytes(read_bytes(u));
            ipevents::wire::encode(&sha, i64::from(EVENT_IP_BASE + u32::from(host)))
        }
        2 => {
            let sha = read_choice(u, EVENT_SHAS);
            ipevents::wire::encode(&sha, i64::from_le_bytes(read_bytes(u)))
        }
        3 => vec![0x0a; MAX_BODY_BYTES + 1],
        _ => {
            let len = u16::from_le_bytes(read_bytes(u));
            take(u, usize::from(len)).to_vec()
        }
    };
    let content_length = match read_byte(u) {
        0 => None,
        1 => Some(body.len()),
        2 => Some(MAX_BODY_BYTES + 1),
        3 => Some(0),
        _ => Some(u32::from_le_bytes(read_bytes(u)) as usize),
    };
    // Fields the format does not set keep their defaults, should `ApiRequest` gain any.
    #[allow(clippy::needless_update)]
    ApiRequest {
        method,
        url,
        accept,
        content_type,
        authorization,
        body,
        content_length,
        ..Default::default()
    }
}

fn read_byte(u: &mut Unstructured) -> u8 {
    u.arbitrary().unwrap_or(0)
}

/// Up to `len` bytes: fewer when the input ends first.
fn take<'a>(u: &mut Unstructured<'a>, len: usize) -> &'a [u8] {
    let len = len.min(u.len());
    u.bytes(len).unwrap_or_default()
}

/// Exactly `N` bytes, zero-filled past the end of the input.
fn read_bytes<const N: usize>(u: &mut Unstructured) -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = take(u, N);
    out[..bytes.len()].copy_from_slice(bytes);
    out
}

fn read_text(u: &mut Unstructured) -> String {
    let len = usize::from(read_byte(u));
    String::from_utf8_lossy(take(u, len)).into_owned()
}

fn read_choice(u: &mut Unstructured, table: &[&str]) -> String {
    match table.get(usize::from(read_byte(u))) {
        Some(value) => (*value).to_owned(),
        None => read_text(u),
    }
}

fn read_optional(u: &mut Unstructured, table: &[&str]) -> Option<String> {
    match usize::from(read_byte(u)) {
        0 => None,
        index => match table.get(index - 1) {
            Some(value) => Some((*value).to_owned()),
            None => Some(read_text(u)),
        },
    }
}

/// Writes inputs in the format [`decode`] reads.
#[derive(Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    /// Appends one request. `url_parts` are joined into the URL; a part no table names is
    /// written as text, or as 32 raw bytes when it is 64 lowercase hex digits.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        mut self,
        method: &str,
        url_parts: &[&str],
        accept: Option<&str>,
        content_type: Option<&str>,
        authorization: Option<&str>,
        body: Body,
        content_length: ContentLength,
    ) -> Writer {
        self.choice(METHODS, method);
        assert!(
            url_parts.len() <= usize::from(MAX_URL_PARTS),
            "too many url parts"
        );
        self.bytes.push(url_parts.len() as u8);
        for part in url_parts {
            let app = ipevents::wire::AppKey::from_hex(part.as_bytes())
                .filter(|app| app.to_hex() == *part && !URL_PARTS.contains(part));
            match app {
                Some(app) => {
                    self.bytes.push(URL_PARTS.len() as u8);
                    self.bytes.extend_from_slice(&app.0);
                }
                None => self.choice_with_escape(URL_PARTS, URL_PARTS.len() + 1, part),
            }
        }
        self.optional(ACCEPTS, accept);
        self.optional(CONTENT_TYPES, content_type);
        self.optional(AUTHORIZATIONS, authorization);
        match body {
            Body::Empty => self.bytes.push(0),
            Body::Event { sha, host } => {
                self.bytes.push(1);
                self.choice(EVENT_SHAS, sha);
                self.bytes.extend_from_slice(&host.to_le_bytes());
            }
            Body::EventWithIp { sha, ip } => {
                self.bytes.push(2);
                self.choice(EVENT_SHAS, sha);
                self.bytes.extend_from_slice(&ip.to_le_bytes());
            }
            Body::Oversized => self.bytes.push(3),
            Body::Bytes(bytes) => {
                let len = u16::try_from(bytes.len()).expect("a body of at most 65535 bytes");
                self.bytes.push(4);
                self.bytes.extend_from_slice(&len.to_le_bytes());
                self.bytes.extend_from_slice(bytes);
            }
        }
        match content_length {
            ContentLength::None => self.bytes.push(0),
            ContentLength::Actual => self.bytes.push(1),
            ContentLength::OverLimit => self.bytes.push(2),
            ContentLength::Zero => self.bytes.push(3),
            ContentLength::Declared(len) => {
                self.bytes.push(4);
                self.bytes.extend_from_slice(&len.to_le_bytes());
            }
        }
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn choice(&mut self, table: &[&str], value: &str) {
        self.choice_with_escape(table, table.len(), value);
    }

    fn optional(&mut self, table: &[&str], value: Option<&str>) {
        match value {
            None => self.bytes.push(0),
            Some(value) => match table.iter().position(|entry| *entry == value) {
                Some(index) => self.bytes.push(index as u8 + 1),
                None => {
                    self.bytes.push(table.len() as u8 + 1);
                    self.text(value);
                }
            },
        }
    }

    fn choice_with_escape(&mut self, table: &[&str], escape: usize, value: &str) {
        match table.iter().position(|entry| *entry == value) {
            Some(index) => self.bytes.push(index as u8),
            None => {
                self.bytes.push(escape as u8);
                self.text(value);
            }
        }
    }

    fn text(&mut self, value: &str) {
        let len = u8::try_from(value.len()).expect("a text of at most 255 bytes");
        self.bytes.push(len);
        self.bytes.extend_from_slice(value.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (method, url, accept, content type, body length): a decoded request, in brief.
    type Brief<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, usize);

    #[track_caller]
    fn check(input: Writer, want: &[Brief]) {
        let got: Vec<_> = decode(&input.into_bytes())
            .into_iter()
            .map(|r| {
                (
                    r.method,
                    r.url,
                    r.accept,
                    r.content_type,
                    r.body.len(),
                    r.content_length,
                )
            })
            .collect();
        let want: Vec<_> = want
            .iter()
            .map(|&(method, url, accept, content_type, body_len)| {
                (
                    method.to_owned(),
                    url.to_owned(),
                    accept.map(str::to_owned),
                    content_type.map(str::to_owned),
                    body_len,
                    Some(body_len),
                )
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn writer_and_decoder_agree() {
        let event_len = ipevents::wire::encode(SHA_A, i64::from(EVENT_IP_BASE + 1)).len();
        let other_app = "ff".repeat(32);
        check(
            Writer::new()
                .request(
                    "POST",
                    &["/events"],
                    None,
                    Some("application/octet-stream"),
                    None,
                    Body::Event {
                        sha: SHA_A,
                        host: 1,
                    },
                    ContentLength::Actual,
                )
                .request(
                    "BREW",
                    &["/events/", &other_app, "?x=1"],
                    Some("text/x-custom"),
                    Some("text/plain"),
                    Some("Bearer secret"),
                    Body::Bytes(b"abc"),
                    ContentLength::Actual,
                )
                .request(
                    "GET",
                    &["/events/", SHA_A_UPPER],
                    Some(""),
                    None,
                    Some("custom"),
                    Body::Oversized,
                    ContentLength::Actual,
                ),
            &[
                (
                    "POST",
                    "/events",
                    None,
                    Some("application/octet-stream"),
                    event_len,
                ),
                (
                    "BREW",
                    &format!("/events/{other_app}?x=1"),
                    Some("text/x-custom"),
                    Some("text/plain"),
                    3,
                ),
                (
                    "GET",
                    &format!("/events/{SHA_A_UPPER}"),
                    Some(""),
                    None,
                    MAX_BODY_BYTES + 1,
                ),
            ],
        );
    }

    #[test]
    fn every_input_decodes() {
        assert!(decode(&[]).is_empty());
        assert_eq!(decode(&[0xff]).len(), 1);
        assert_eq!(decode(&[0; 1000]).len(), MAX_REQUESTS);
    }
}
