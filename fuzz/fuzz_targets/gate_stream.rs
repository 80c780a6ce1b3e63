//! Fuzzes the HTTP gate's own parsing and forwarding: `gate::Framer` over a raw client byte
//! stream, pipelined requests included, fed whole and split at points the input chooses.
//!
//! Input: the first byte says how many piece sizes follow (1 to 8), each byte one piece size
//! (1 to 256 bytes); the rest is the client's stream. Checked for every input:
//!
//! - nothing panics, and the framer never asks for more bytes while it has no room;
//! - the stream split into pieces gives the same requests, and ends in the same refusal, as
//!   the stream given whole: requests never merge or split with the pieces;
//! - the framer holds at most one request's worth of bytes;
//! - each forwarded request is the head the gate parsed from exactly its own bytes of the
//!   stream: parsed alone, those bytes give the same head; the forwarded bytes parse back
//!   (with the gate's parser and with plain `httparse`) to one whole request with the same
//!   method, target and body, declaring exactly its body's length, and carrying only the
//!   headers the API reads.
#![no_main]

use ipevents::gate::{self, Forward, Framer, GateLimits, Refusal, Step};
use libfuzzer_sys::fuzz_target;

/// The headers a forwarded request may carry.
const FORWARDED: [&str; 5] = ["Host", "Accept", "Content-Type", "Authorization", "Content-Length"];

/// Feeds `stream` in pieces of `pieces` bytes (cycled, each at most what the framer takes);
/// returns the requests forwarded and the refusal that ended the stream, if any.
fn frame(stream: &[u8], pieces: &[usize], limits: GateLimits) -> (Vec<Forward>, Option<Refusal>) {
    let mut framer = Framer::new(limits);
    let mut forwarded = Vec::new();
    let mut fed = 0;
    let mut consumed = 0;
    let mut piece = pieces.iter().copied().cycle();
    loop {
        match framer.step() {
            Err(refusal) => return (forwarded, Some(refusal)),
            Ok(Step::Continue) => {}
            Ok(Step::Request(forward)) => {
                consumed += forward.head.head_len + forward.head.body_len;
                forwarded.push(forward);
            }
            Ok(Step::NeedMore) => {
                if fed == stream.len() {
                    return (forwarded, None);
                }
                let room = framer.room();
                assert!(room > 0, "the framer asks for more but takes nothing");
                let n = piece.next().unwrap_or(1).min(room).min(stream.len() - fed);
                framer.push(&stream[fed..fed + n]);
                fed += n;
                assert!(
                    fed - consumed <= limits.max_head_bytes + limits.max_body_bytes,
                    "the framer holds {} bytes",
                    fed - consumed
                );
            }
        }
    }
}

fn check_forwarded(stream: &[u8], forwarded: &[Forward], limits: &GateLimits) {
    let mut offset = 0;
    for forward in forwarded {
        let head = &forward.head;
        let own = &stream[offset..offset + head.head_len + head.body_len];
        offset += own.len();
        // Its own bytes, parsed alone, give the same head: nothing of a neighbour leaked in.
        let alone = gate::parse_head(own, limits)
            .expect("a forwarded request's own bytes parse")
            .expect("and are complete");
        assert_eq!(&alone, head);
        assert!(head.body_len <= limits.max_body_bytes);
        let body = &own[head.head_len..];

        // The forwarded bytes parse back to one whole request that says the same.
        let again = gate::parse_head(&forward.request, limits)
            .expect("the forwarded request parses")
            .expect("and is complete");
        assert_eq!(again.head_len + again.body_len, forward.request.len());
        assert_eq!(again.method, head.method);
        assert_eq!(again.target, head.target);
        assert_eq!(again.body_len, head.body_len);
        assert_eq!(&forward.request[again.head_len..], body);
        assert!(again.target.is_ascii());

        // And so does plain httparse, with only the headers the API reads.
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut request = httparse::Request::new(&mut headers);
        let status = request.parse(&forward.request).expect("httparse parses it");
        assert_eq!(status, httparse::Status::Complete(again.head_len));
        assert_eq!(request.method, Some(head.method.as_str()));
        assert_eq!(request.path, Some(head.target.as_str()));
        assert_eq!(request.version, Some(1));
        let mut lengths = Vec::new();
        for header in request.headers.iter() {
            assert!(
                FORWARDED.iter().any(|h| h.eq_ignore_ascii_case(header.name)),
                "forwarded {}",
                header.name
            );
            if header.name.eq_ignore_ascii_case("Content-Length") {
                lengths.push(std::str::from_utf8(header.value).unwrap().to_owned());
            }
        }
        match lengths.as_slice() {
            [] => assert!(head.body_len == 0 && head.method != "POST"),
            [one] => assert_eq!(one, &head.body_len.to_string()),
            more => panic!("forwarded {} lengths", more.len()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8) + 1;
    if rest.len() < count {
        return;
    }
    let (sizes, stream) = rest.split_at(count);
    let pieces: Vec<usize> = sizes.iter().map(|&b| usize::from(b) + 1).collect();
    // Small limits, so that inputs reach them.
    let limits = GateLimits {
        max_head_bytes: 512,
        max_headers: 8,
        max_body_bytes: 64,
        ..GateLimits::default()
    };
    let (whole, whole_refusal) = frame(stream, &[stream.len().max(1)], limits);
    let (split, split_refusal) = frame(stream, &pieces, limits);
    assert_eq!(whole, split, "the split changed the requests");
    assert_eq!(whole_refusal, split_refusal, "the split changed the refusal");
    check_forwarded(stream, &whole, &limits);
});
