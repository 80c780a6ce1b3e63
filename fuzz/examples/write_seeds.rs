//! Writes the seed corpora under `fuzz/seeds/`: valid and nearly valid datagrams for
//! `datagram`, and request sequences for `http_request` in its own byte format.
//!
//! The seeds are committed; run this after changing the wire format, the request format or
//! the cases below: `cargo run --example write_seeds` from `fuzz/`. It replaces every file in
//! both seed directories.

use std::fs;
use std::path::Path;

use ipevents::http::MAX_BODY_BYTES;
use ipevents::wire::{encode, MAX_DATAGRAM_BYTES};
use ipevents_fuzz::request_bytes::{Body, ContentLength, Writer, SHA_A, SHA_A_UPPER, SHA_B};
use ipevents_fuzz::DATAGRAM_SPLIT;
use prost::encoding::{encode_key, encode_varint, WireType};

const OCTET: Option<&str> = Some("application/octet-stream");
const JSON: Option<&str> = Some("application/json");
const ADMIN: Option<&str> = Some("Bearer secret");

fn main() -> std::io::Result<()> {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    write_all(&seeds.join("datagram"), datagram_seeds())?;
    write_all(&seeds.join("http_request"), http_seeds())?;
    Ok(())
}

fn write_all(dir: &Path, seeds: Vec<(&str, Vec<u8>)>) -> std::io::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    for (name, bytes) in &seeds {
        fs::write(dir.join(name), bytes)?;
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
    Ok(())
}

fn bytes_field(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, WireType::LengthDelimited, &mut out);
    encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}

fn varint_field(tag: u32, value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, WireType::Varint, &mut out);
    encode_varint(value, &mut out);
    out
}

fn key(tag: u32, wire_type: WireType) -> Vec<u8> {
    let mut out = Vec::new();
    encode_key(tag, wire_type, &mut out);
    out
}

/// Datagrams joined by the marker the target splits on.
fn joined(datagrams: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    datagrams
        .into_iter()
        .collect::<Vec<_>>()
        .join(DATAGRAM_SPLIT)
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> i64 {
    i64::from(u32::from_be_bytes([a, b, c, d]))
}

fn datagram_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let valid = encode(SHA_A, ip(10, 0, 0, 1));
    let mut max_size = valid.clone();
    // Three bytes of key and length, then padding up to exactly the limit.
    let padding = MAX_DATAGRAM_BYTES - max_size.len() - 3;
    max_size.extend(bytes_field(15, &vec![0; padding]));
    let mut over_size = valid.clone();
    over_size.extend(bytes_field(15, &vec![0; padding + 1]));
    let unknown_fields = [
        varint_field(3, 99),
        key(9, WireType::ThirtyTwoBit),
        vec![1, 2, 3, 4],
        valid.clone(),
        bytes_field(15, b"future"),
        key(10, WireType::SixtyFourBit),
        vec![0; 8],
        key(11, WireType::StartGroup),
        varint_field(1, 5),
        key(11, WireType::EndGroup),
    ]
    .concat();
    let other_apps = (0..70u8).map(|n| encode(&format!("{n:02x}").repeat(32), ip(10, 0, 0, 1)));
    vec![
        ("valid", valid.clone()),
        ("valid_upper_case_sha", encode(SHA_A_UPPER, ip(10, 0, 0, 2))),
        ("valid_ip_zero", encode(SHA_A, 0)),
        ("valid_ip_max", encode(SHA_A, ip(255, 255, 255, 255))),
        (
            "fields_reversed",
            [
                varint_field(2, ip(10, 0, 0, 3) as u64),
                bytes_field(1, SHA_A.as_bytes()),
            ]
            .concat(),
        ),
        ("unknown_fields", unknown_fields),
        (
            "repeated_fields_last_wins",
            [
                bytes_field(1, b"nope"),
                varint_field(2, u64::MAX),
                valid.clone(),
            ]
            .concat(),
        ),
        ("truncated", valid[..40].to_vec()),
        ("truncated_varint", vec![0x0a, 0xff, 0xff]),
        (
            "wrong_wire_types",
            [varint_field(1, 5), bytes_field(2, b"x")].concat(),
        ),
        ("missing_ip", bytes_field(1, SHA_A.as_bytes())),
        ("missing_sha", varint_field(2, 1)),
        ("negative_ip", encode(SHA_A, -1)),
        ("ip_over_u32", encode(SHA_A, i64::from(u32::MAX) + 1)),
        ("sha_65_chars", encode(&format!("{SHA_A}0"), 1)),
        ("sha_63_chars", encode(&SHA_A[..63], 1)),
        ("sha_not_hex", encode(&SHA_A.replace('a', "g"), 1)),
        (
            "sha_not_utf8",
            [bytes_field(1, &[0xff; 64]), varint_field(2, 1)].concat(),
        ),
        (
            // prost refuses a string that is not UTF-8 even when a later field overrides it.
            "sha_not_utf8_overridden",
            [bytes_field(1, &[0xff]), valid.clone()].concat(),
        ),
        ("max_size_512", max_size),
        ("oversized_513", over_size),
        ("empty", Vec::new()),
        ("group_end_without_start", vec![0x0c]),
        (
            "many_ips_one_app",
            joined((0..48u8).map(|d| encode(SHA_A, ip(10, 0, d / 16, d)))),
        ),
        (
            "home_block_and_strays",
            joined(
                (1..=14u8)
                    .map(|d| encode(SHA_B, ip(192, 168, 1, d)))
                    .chain([
                        encode(SHA_B, ip(192, 168, 1, 0)),
                        encode(SHA_B, ip(1, 2, 3, 4)),
                    ]),
            ),
        ),
        (
            "valid_then_forget",
            // The empty piece between two markers forgets the app of the event before it.
            [
                encode(SHA_A, 1),
                Vec::new(),
                encode(SHA_B, 2),
                encode(SHA_A, 3),
            ]
            .join(DATAGRAM_SPLIT),
        ),
        ("more_apps_than_the_budget", joined(other_apps)),
        (
            "mixed_valid_and_invalid",
            joined([
                encode(SHA_A, 5),
                encode(SHA_A, -5),
                vec![0xff],
                Vec::new(),
                encode(SHA_B, 6),
            ]),
        ),
    ]
}

fn http_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use Body::*;
    use ContentLength::{Actual, Declared, OverLimit};
    let app_url = ["/events/", SHA_A];
    let get = |w: Writer, url: &[&str], accept: Option<&str>| {
        w.request("GET", url, accept, None, None, Empty, ContentLength::None)
    };
    let post = |w: Writer, content_type: Option<&str>, body: Body| {
        w.request(
            "POST",
            &["/events"],
            None,
            content_type,
            ADMIN,
            body,
            Actual,
        )
    };
    let delete = |w: Writer, url: &[&str]| {
        w.request("DELETE", url, None, None, ADMIN, Empty, ContentLength::None)
    };
    let event = |sha, host| Event { sha, host };
    let seeds = vec![
        ("healthz", get(Writer::new(), &["/healthz"], None)),
        ("metrics", get(Writer::new(), &["/metrics"], Some("*/*"))),
        (
            "post_then_query",
            get(post(Writer::new(), OCTET, event(SHA_A, 1)), &app_url, JSON),
        ),
        (
            "home_block_and_strays",
            // Hosts 1, 2 and 3 of 10.0.0.0/28 and two strays, then the answer.
            get(
                [1, 2, 3, 0x0100, 15]
                    .into_iter()
                    .fold(Writer::new(), |w, host| post(w, OCTET, event(SHA_A, host))),
                &["/events/", SHA_A_UPPER, "?pretty=1"],
                Some("application/*"),
            ),
        ),
        (
            "ip_cap_truncates",
            get(
                (0..6).fold(Writer::new(), |w, host| {
                    post(w, OCTET, event(SHA_B, host * 16))
                }),
                &["/events/", SHA_B],
                None,
            ),
        ),
        (
            "app_budget_gives_507",
            [
                SHA_A,
                SHA_A,
                SHA_B,
                SHA_B,
                &"cd".repeat(32),
                &"ef".repeat(32),
            ]
            .into_iter()
            .fold(Writer::new(), |w, sha| {
                post(w, OCTET, EventWithIp { sha, ip: 1 })
            }),
        ),
        (
            "forget_one_app",
            get(
                delete(post(Writer::new(), OCTET, event(SHA_A, 1)), &app_url),
                &app_url,
                JSON,
            ),
        ),
        (
            "forget_everything",
            get(
                delete(post(Writer::new(), OCTET, event(SHA_A, 1)), &["/events"]),
                &app_url,
                JSON,
            ),
        ),
        (
            "unknown_app",
            get(Writer::new(), &["/events/", &"ab".repeat(32)], JSON),
        ),
        (
            "not_found_and_not_allowed",
            delete(
                Writer::new()
                    .request(
                        "PUT",
                        &app_url,
                        None,
                        None,
                        None,
                        Empty,
                        ContentLength::None,
                    )
                    .request(
                        "GET",
                        &["/events"],
                        None,
                        None,
                        None,
                        Empty,
                        ContentLength::None,
                    )
                    .request(
                        "GET",
                        &["/nope"],
                        None,
                        None,
                        None,
                        Empty,
                        ContentLength::None,
                    )
                    .request(
                        "get",
                        &["/healthz"],
                        None,
                        None,
                        None,
                        Empty,
                        ContentLength::None,
                    )
                    .request(
                        "BREW",
                        &["/metrics"],
                        None,
                        None,
                        None,
                        Empty,
                        ContentLength::None,
                    ),
                &["/metrics"],
            ),
        ),
        (
            "bad_shas",
            get(
                get(
                    get(Writer::new(), &["/events/", "abc"], None),
                    &["/events/", &"g".repeat(64)],
                    None,
                ),
                &["/events/", SHA_A, "0"],
                None,
            ),
        ),
        (
            "not_acceptable",
            get(
                get(Writer::new(), &app_url, Some("text/html")),
                &app_url,
                Some("application/json;q=0"),
            ),
        ),
        (
            "bad_bodies",
            [
                (Some("text/plain"), event(SHA_A, 1)),
                (None, event(SHA_A, 1)),
                (OCTET, Oversized),
                (OCTET, Bytes(&[0xff, 0xff])),
                (OCTET, EventWithIp { sha: SHA_A, ip: -1 }),
                (OCTET, EventWithIp { sha: "abc", ip: 1 }),
                (OCTET, Empty),
            ]
            .into_iter()
            .fold(Writer::new(), |w, (content_type, body)| {
                post(w, content_type, body)
            }),
        ),
        (
            "token_missing_or_wrong",
            [
                None,
                Some("Bearer wrong"),
                Some("bearer secret"),
                Some("Basic dXNlcjpwYXNz"),
            ]
            .into_iter()
            .fold(Writer::new(), |w, authorization| {
                w.request(
                    "POST",
                    &["/events"],
                    None,
                    OCTET,
                    authorization,
                    event(SHA_A, 1),
                    Actual,
                )
                .request(
                    "DELETE",
                    &app_url,
                    None,
                    None,
                    authorization,
                    Empty,
                    ContentLength::None,
                )
            }),
        ),
        (
            "declared_lengths",
            Writer::new()
                .request(
                    "POST",
                    &["/events"],
                    None,
                    OCTET,
                    ADMIN,
                    event(SHA_A, 1),
                    OverLimit,
                )
                .request(
                    "POST",
                    &["/events"],
                    None,
                    Some("Application/Octet-Stream; charset=binary"),
                    Some("Bearer  secret "),
                    event(SHA_A, 2),
                    Declared(MAX_BODY_BYTES as u32),
                ),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, writer)| (name, writer.into_bytes()))
        .collect()
}
