//! What the fuzz targets share with the seed writer (`examples/write_seeds.rs`): the marker
//! the `datagram` target splits its input on, and the byte format the `http_request` target
//! reads its requests from.
//!
//! This crate holds no checks: the properties live in `fuzz_targets/`, next to the harness
//! that drives the real library.

pub mod request_bytes;

/// The `datagram` target applies its whole input as one datagram, then once more as the pieces
/// between occurrences of these two bytes. Neither byte ends a varint and neither is a hex
/// digit, so the pair never appears in a valid event except inside the varint of a rare IP,
/// and valid events joined by it split back into the same events.
pub const DATAGRAM_SPLIT: &[u8] = b"\xff\xfe";
