//! The wire format: the generated `IpEvent` and the parser that turns one datagram into a
//! validated [`Event`] or a counted [`Reject`].
//!
//! The parser walks the protobuf fields with prost's `encoding` primitives instead of
//! `IpEvent::decode`, for two reasons: prost does not enforce proto2 `required` (an empty
//! buffer decodes to an empty sha and ip 0), and walking borrows the sha bytes from the
//! datagram, so parsing never touches the heap. This module does no I/O and never panics.

use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};

/// The messages generated from `proto/ip_event.proto`.
pub mod proto {
    include!(concat!(
        env!("OUT_DIR"),
        "/lookout.backend_coding_questions.q1.rs"
    ));
}

pub use proto::IpEvent;

/// The largest datagram that can hold a valid event. A valid `IpEvent` needs 79 bytes; the
/// slack leaves room for unknown fields added by newer clients.
pub const MAX_DATAGRAM_BYTES: usize = 512;

/// An app's identity: the SHA-256 of its package, as 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AppKey(pub [u8; 32]);

impl AppKey {
    /// Parses 64 hex digits, in either case: checked and decoded in one pass, with SIMD
    /// where the CPU has it (hex-simd; `microbench` compares it with the other crates).
    pub fn from_hex(hex_digits: &[u8]) -> Option<AppKey> {
        let mut key = AppKey([0; 32]);
        key.decode(hex_digits).then_some(key)
    }

    /// [`from_hex`](AppKey::from_hex) into this key, in place; false, leaving the key
    /// undefined, when `hex_digits` are not 64 hex digits.
    #[inline]
    fn decode(&mut self, hex_digits: &[u8]) -> bool {
        // The length is checked first: the decoder takes any even number of digits that fits.
        hex_digits.len() == 64
            && hex_simd::decode(hex_digits, hex_simd::Out::from_slice(&mut self.0)).is_ok()
    }

    /// The key as 64 lowercase hex digits, the form the API prints.
    pub fn to_hex(self) -> String {
        hex_simd::encode_to_string(self.0, hex_simd::AsciiCase::Lower)
    }
}

// The table is keyed by the 32 bytes alone: the derived `Hash` of an array would add its
// length, eight more bytes to hash for every datagram.
impl std::hash::Hash for AppKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppKey({})", self.to_hex())
    }
}

/// One valid observation: `app` connected to the IPv4 address `ip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub app: AppKey,
    pub ip: u32,
}

impl Event {
    /// A slot for [`parse_into`] to fill.
    pub const UNSET: Event = Event {
        app: AppKey([0; 32]),
        ip: 0,
    };
}

labelled_enum! {
    /// Why a datagram was dropped. Each reason has its own counter in `/metrics`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Reject {
        /// A zero-length datagram.
        Empty => "empty",
        /// Longer than [`MAX_DATAGRAM_BYTES`].
        Oversized => "oversized",
        /// Not a protobuf message, a known field with the wrong wire type, or an `app_sha256`
        /// that is not UTF-8.
        Malformed => "malformed",
        /// No `app_sha256` field.
        MissingSha => "missing_sha",
        /// No `ip` field.
        MissingIp => "missing_ip",
        /// `app_sha256` is not exactly 64 hex digits.
        BadSha => "bad_sha",
        /// `ip` is negative or above 255.255.255.255.
        IpOutOfRange => "ip_out_of_range",
    }
}

const APP_SHA256_TAG: u32 = 1;
const IP_TAG: u32 = 2;

/// Parses and validates one datagram.
///
/// Unknown fields are skipped, and a field that appears more than once takes its last value,
/// as protobuf requires. Validation happens after the walk, so only the last value counts.
pub fn parse(datagram: &[u8]) -> Result<Event, Reject> {
    let mut event = Event::UNSET;
    parse_into(datagram, &mut event)?;
    Ok(event)
}

/// [`parse`], writing the event into `event`, which holds anything on an error. A worker
/// parses a batch straight into its slots this way: the common datagram's sha is decoded
/// where the table will read it, not built on the stack and copied there.
#[inline]
pub fn parse_into(datagram: &[u8], event: &mut Event) -> Result<(), Reject> {
    // A datagram in the common layout is read inline, in the worker's loop, with the general
    // walk's result. Anything else takes the general walk.
    match common_fields(datagram) {
        Some(fields) => fields.parse_into(event),
        None => parse_fields(datagram, event),
    }
}

/// The two fields of a datagram in the layout every client sends: the sha first, as a 64-byte
/// field (key 0x0a, length 0x40), and the ip (key 0x10) right after it as the last field. Such
/// a datagram is at most 72 bytes, so never oversized.
#[derive(Clone, Copy, Debug)]
pub struct CommonFields<'a> {
    datagram: &'a [u8],
    /// The sha's bytes, not yet checked to be hex digits.
    pub digits: &'a [u8; 64],
    /// The ip's varint, read; at most 35 bits.
    ip: u64,
}

impl CommonFields<'_> {
    /// The ip, as the general walk judges it.
    #[inline]
    pub fn ip(&self) -> Result<u32, Reject> {
        u32::try_from(self.ip).map_err(|_| Reject::IpOutOfRange)
    }

    /// [`parse_into`] of the datagram these fields are from, without finding them again: the
    /// digits decoded into `event`, or, when they do not decode, the general walk's verdict.
    #[inline]
    pub fn parse_into(&self, event: &mut Event) -> Result<(), Reject> {
        if event.app.decode(self.digits) {
            event.ip = self.ip()?;
            return Ok(());
        }
        parse_fields(self.datagram, event)
    }
}

/// The fields of `datagram` when it is in the common layout and its ip's varint is one that
/// the fast path reads (at most five bytes); `None` for any other datagram. Once the digits
/// decode, the datagram means what [`parse`] makes of it: the sha those digits give and
/// [`CommonFields::ip`].
#[inline(always)]
pub fn common_fields(datagram: &[u8]) -> Option<CommonFields<'_>> {
    let [0x0a, 0x40, rest @ ..] = datagram else {
        return None;
    };
    let (digits, [0x10, varint @ ..]) = rest.split_first_chunk::<64>()? else {
        return None;
    };
    let ip = tail_varint(datagram, varint.len())?;
    Some(CommonFields {
        datagram,
        digits,
        ip,
    })
}

/// The general walk of [`parse_into`]: every field in order, whatever the layout.
#[inline(never)]
fn parse_fields(datagram: &[u8], event: &mut Event) -> Result<(), Reject> {
    if datagram.is_empty() {
        return Err(Reject::Empty);
    }
    if datagram.len() > MAX_DATAGRAM_BYTES {
        return Err(Reject::Oversized);
    }
    let mut buf = datagram;
    // `Some(None)`: the last `app_sha256` was not 64 hex digits.
    let mut sha: Option<Option<AppKey>> = None;
    let mut ip: Option<i64> = None;
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf).map_err(|_| Reject::Malformed)?;
        match (tag, wire_type) {
            (APP_SHA256_TAG, WireType::LengthDelimited) => {
                let len = decode_varint(&mut buf).map_err(|_| Reject::Malformed)?;
                let len = usize::try_from(len).map_err(|_| Reject::Malformed)?;
                if len > buf.len() {
                    return Err(Reject::Malformed);
                }
                let (value, rest) = buf.split_at(len);
                sha = Some(match AppKey::from_hex(value) {
                    Some(key) => Some(key),
                    // prost refuses a string field that is not UTF-8, even one that a later
                    // field overrides; so does this, so that parse never accepts what prost
                    // rejects. Hex digits are ASCII, so only a value that is not 64 of them
                    // needs the check.
                    None if std::str::from_utf8(value).is_err() => return Err(Reject::Malformed),
                    None => None,
                });
                buf = rest;
            }
            (IP_TAG, WireType::Varint) => {
                // int64 is a plain varint reinterpreted as two's complement, as prost does.
                ip = Some(decode_varint(&mut buf).map_err(|_| Reject::Malformed)? as i64);
            }
            (APP_SHA256_TAG | IP_TAG, _) => return Err(Reject::Malformed),
            _ => skip_field(wire_type, tag, &mut buf, DecodeContext::default())
                .map_err(|_| Reject::Malformed)?,
        }
    }
    let sha = sha.ok_or(Reject::MissingSha)?;
    let ip = ip.ok_or(Reject::MissingIp)?;
    let app = sha.ok_or(Reject::BadSha)?;
    let ip = u32::try_from(ip).map_err(|_| Reject::IpOutOfRange)?;
    *event = Event { app, ip };
    Ok(())
}

/// The value of the varint made of the last `len` bytes of `datagram`, at most five of them
/// (enough for any IPv4 address); `None` for anything else, which the general walk then
/// reads. Like prost, it accepts a varint padded with continuation bytes (0x80 0x00 is 0).
///
/// The datagram's last eight bytes are read as one little-endian word, whatever `len`, and
/// the varint is its top `len` bytes: checked and folded without a branch per byte, every
/// byte but the last must have its continuation bit set, the last must not.
#[inline]
fn tail_varint(datagram: &[u8], len: usize) -> Option<u64> {
    if !(1..=5).contains(&len) {
        return None;
    }
    let tail = datagram.last_chunk::<8>()?;
    let word = u64::from_le_bytes(*tail) >> (8 * (8 - len));
    // The continuation bits of bytes 0 to len - 2; the bytes above the varint read as 0.
    let continued = 0x80_8080_8080 & ((1u64 << (8 * (len - 1))) - 1);
    if word & 0x80_8080_8080 != continued {
        return None;
    }
    let digits = word & 0x7f_7f7f_7f7f;
    Some(
        (digits & 0x7f)
            | ((digits >> 1) & (0x7f << 7))
            | ((digits >> 2) & (0x7f << 14))
            | ((digits >> 3) & (0x7f << 21))
            | ((digits >> 4) & (0x7f << 28)),
    )
}

/// Encodes an event as one datagram; used by the tools and tests, never by the server.
pub fn encode(app_sha256: &str, ip: i64) -> Vec<u8> {
    use prost::Message;
    IpEvent {
        app_sha256: app_sha256.to_owned(),
        ip,
    }
    .encode_to_vec()
}

/// Formats an IPv4 address held as an integer as a dotted quad.
pub fn dotted_quad(ip: u32) -> String {
    std::net::Ipv4Addr::from(ip).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::encoding::{encode_key, encode_varint};

    const SHA: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn key() -> AppKey {
        AppKey::from_hex(SHA.as_bytes()).unwrap()
    }

    #[track_caller]
    fn check(datagram: &[u8], want: Result<Event, Reject>) {
        assert_eq!(parse(datagram), want, "datagram {datagram:02x?}");
    }

    fn field_bytes(tag: u32, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_key(tag, WireType::LengthDelimited, &mut out);
        encode_varint(value.len() as u64, &mut out);
        out.extend_from_slice(value);
        out
    }

    fn field_varint(tag: u32, value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_key(tag, WireType::Varint, &mut out);
        encode_varint(value, &mut out);
        out
    }

    fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn valid_events() {
        let ok = |ip| Ok(Event { app: key(), ip });
        check(&encode(SHA, 0), ok(0));
        check(&encode(SHA, 0x0a00_0001), ok(0x0a00_0001));
        check(&encode(SHA, u32::MAX as i64), ok(u32::MAX));
        // Upper-case digits name the same app.
        check(&encode(&SHA.to_uppercase(), 7), ok(7));
        // Fields in the other order.
        check(
            &concat(&[field_varint(2, 7), field_bytes(1, SHA.as_bytes())]),
            ok(7),
        );
        // Unknown fields of every wire type are skipped.
        let mut fixed32 = Vec::new();
        encode_key(9, WireType::ThirtyTwoBit, &mut fixed32);
        fixed32.extend_from_slice(&[1, 2, 3, 4]);
        let mut fixed64 = Vec::new();
        encode_key(10, WireType::SixtyFourBit, &mut fixed64);
        fixed64.extend_from_slice(&[0; 8]);
        check(
            &concat(&[
                field_varint(3, 99),
                fixed32,
                encode(SHA, 7),
                field_bytes(15, b"future"),
                fixed64,
            ]),
            ok(7),
        );
        // A repeated field takes its last value, even when an earlier one was invalid.
        check(
            &concat(&[
                field_bytes(1, b"nope"),
                field_varint(2, u64::MAX),
                encode(SHA, 9),
            ]),
            ok(9),
        );
    }

    #[test]
    fn rejects_by_reason() {
        let cases: Vec<(Vec<u8>, Reject)> = vec![
            (vec![], Reject::Empty),
            (vec![0u8; MAX_DATAGRAM_BYTES + 1], Reject::Oversized),
            (vec![0xff], Reject::Malformed),
            (vec![0x0a, 0x40, b'a'], Reject::Malformed),
            (
                vec![
                    0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ],
                Reject::Malformed,
            ),
            // Field 1 as a varint, field 2 as bytes: wrong wire types.
            (
                concat(&[field_varint(1, 5), field_varint(2, 5)]),
                Reject::Malformed,
            ),
            (
                concat(&[field_bytes(1, SHA.as_bytes()), field_bytes(2, b"x")]),
                Reject::Malformed,
            ),
            // A group end with no start.
            (vec![0x0c], Reject::Malformed),
            (field_varint(2, 5), Reject::MissingSha),
            (field_varint(3, 5), Reject::MissingSha),
            (field_bytes(1, SHA.as_bytes()), Reject::MissingIp),
            (encode(&SHA[..63], 1), Reject::BadSha),
            (encode(&format!("{SHA}0"), 1), Reject::BadSha),
            (encode(&format!("0x{SHA}"), 1), Reject::BadSha),
            (encode(&SHA.replace('a', "g"), 1), Reject::BadSha),
            (encode("", 1), Reject::BadSha),
            (encode(SHA, -1), Reject::IpOutOfRange),
            (encode(SHA, i64::MIN), Reject::IpOutOfRange),
            (encode(SHA, u32::MAX as i64 + 1), Reject::IpOutOfRange),
            (encode(SHA, i64::MAX), Reject::IpOutOfRange),
        ];
        for (datagram, reason) in cases {
            check(&datagram, Err(reason));
        }
    }

    #[test]
    fn the_common_layout_reads_like_the_general_walk() {
        // The sha field, then the ip field as the last one: the fast path's own cases.
        let with_ip_bytes = |varint: &[u8]| {
            let mut datagram = field_bytes(1, SHA.as_bytes());
            datagram.push(0x10);
            datagram.extend_from_slice(varint);
            datagram
        };
        let ok = |ip| Ok(Event { app: key(), ip });
        check(&with_ip_bytes(&[0x07]), ok(7));
        // Padded with continuation bytes, as prost accepts.
        check(&with_ip_bytes(&[0x80, 0x00]), ok(0));
        check(
            &with_ip_bytes(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            ok(u32::MAX),
        );
        check(&with_ip_bytes(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x00]), ok(0));
        check(
            &with_ip_bytes(&[0x80, 0x80, 0x80, 0x80, 0x10]),
            Err(Reject::IpOutOfRange),
        );
        check(&with_ip_bytes(&[0x80]), Err(Reject::Malformed));
        check(&with_ip_bytes(&[]), Err(Reject::Malformed));
        // Another field after the ip, or a later sha, goes on with the general walk.
        let mut later_sha = with_ip_bytes(&[0x07]);
        later_sha.extend(field_bytes(1, b"nope"));
        check(&later_sha, Err(Reject::BadSha));
        let mut unknown = with_ip_bytes(&[0x07]);
        unknown.extend(field_varint(3, 1));
        check(&unknown, ok(7));
    }

    #[test]
    fn max_size_datagram_is_accepted() {
        let mut datagram = encode(SHA, 1);
        let padding = MAX_DATAGRAM_BYTES - datagram.len() - 3;
        datagram.extend(field_bytes(15, &vec![0u8; padding]));
        assert_eq!(datagram.len(), MAX_DATAGRAM_BYTES);
        check(&datagram, Ok(Event { app: key(), ip: 1 }));
    }

    #[test]
    fn every_reason_is_listed_once_in_order() {
        let labels: std::collections::BTreeSet<&str> =
            Reject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Reject::ALL.len());
        for (i, reason) in Reject::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
    }

    #[test]
    fn hex_digits_decode_like_the_hex_crate() {
        // Every byte value at every position, in a valid sha otherwise.
        let mut digits = *b"00112233445566778899aabbccddeeffAABBCCDDEEFF00112233445566778899";
        for position in 0..64 {
            let original = digits[position];
            for byte in 0..=255u8 {
                digits[position] = byte;
                let mut want = [0u8; 32];
                let want = hex::decode_to_slice(digits, &mut want)
                    .ok()
                    .map(|()| AppKey(want));
                assert_eq!(
                    AppKey::from_hex(&digits),
                    want,
                    "byte {byte:#04x} at {position}"
                );
            }
            digits[position] = original;
        }
        for len in [0, 1, 2, 62, 63, 65, 66, 128] {
            assert_eq!(AppKey::from_hex(&vec![b'a'; len]), None, "{len} digits");
        }
        // A prefix some hex decoders strip is not part of a sha.
        let prefixed = format!("0x{}", "a".repeat(64));
        assert_eq!(
            AppKey::from_hex(prefixed.as_bytes()),
            None,
            "0x and 64 digits"
        );
    }

    #[test]
    fn dotted_quads() {
        assert_eq!(dotted_quad(0), "0.0.0.0");
        assert_eq!(dotted_quad(0x0a00_0001), "10.0.0.1");
        assert_eq!(dotted_quad(u32::MAX), "255.255.255.255");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// One field as (tag, bytes): an `app_sha256` of some kind, an `ip`, or an unknown one.
        fn field() -> impl Strategy<Value = (u32, Vec<u8>)> {
            let sha = prop_oneof![
                proptest::array::uniform32(any::<u8>())
                    .prop_map(|k| AppKey(k).to_hex().into_bytes()),
                proptest::array::uniform32(any::<u8>())
                    .prop_map(|k| AppKey(k).to_hex().to_uppercase().into_bytes()),
                (
                    proptest::array::uniform32(any::<u8>()),
                    0usize..64,
                    any::<u8>()
                )
                    .prop_map(|(k, at, byte)| {
                        let mut digits = AppKey(k).to_hex().into_bytes();
                        digits[at] = byte;
                        digits
                    }),
                proptest::collection::vec(any::<u8>(), 0..70),
            ];
            prop_oneof![
                sha.prop_map(|value| (1, field_bytes(1, &value))),
                prop_oneof![any::<u64>(), 0u64..=u32::MAX as u64]
                    .prop_map(|ip| (2, field_varint(2, ip))),
                (3u32..20, any::<u64>()).prop_map(|(tag, v)| (tag, field_varint(tag, v))),
                (3u32..20, proptest::collection::vec(any::<u8>(), 0..8))
                    .prop_map(|(tag, v)| (tag, field_bytes(tag, &v))),
            ]
        }

        /// [`tail_varint`] of `bytes` at the end of a datagram: eight bytes of padding, all
        /// with their continuation bit set, so that a read past the varint would show.
        fn tail_varint_of(bytes: &[u8]) -> Option<u64> {
            let datagram: Vec<u8> = [0xff; 8].iter().chain(bytes).copied().collect();
            tail_varint(&datagram, bytes.len())
        }

        proptest! {
            /// The fast path's varint reader agrees with prost's on every run of one to five
            /// bytes: the same value when the run is exactly one varint, `None` otherwise.
            #[test]
            fn short_varints_read_as_prost_reads_them(bytes in proptest::collection::vec(any::<u8>(), 0..7)) {
                let mut buf = bytes.as_slice();
                let prost = decode_varint(&mut buf).ok().filter(|_| buf.is_empty());
                let want = prost.filter(|_| (1..=5).contains(&bytes.len()));
                prop_assert_eq!(tail_varint_of(&bytes), want);
            }

            /// The same for runs shaped like varints (every byte but the last continued), the
            /// ones random bytes rarely make, with one continuation bit flipped in some.
            #[test]
            fn varint_shaped_runs_read_as_prost_reads_them(
                payload in proptest::collection::vec(any::<u8>(), 1..7),
                flip in proptest::option::of(0usize..7),
            ) {
                let last = payload.len() - 1;
                let mut bytes: Vec<u8> = payload
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| if i == last { b & 0x7f } else { b | 0x80 })
                    .collect();
                if let Some(at) = flip.filter(|&at| at < bytes.len()) {
                    bytes[at] ^= 0x80;
                }
                let mut buf = bytes.as_slice();
                let prost = decode_varint(&mut buf).ok().filter(|_| buf.is_empty());
                let want = prost.filter(|_| (1..=5).contains(&bytes.len()));
                prop_assert_eq!(tail_varint_of(&bytes), want);
            }

            /// Parsing never panics, and whatever it accepts prost decodes to the same event.
            #[test]
            fn agrees_with_prost(datagram in proptest::collection::vec(any::<u8>(), 0..600)) {
                use prost::Message;
                if let Ok(event) = parse(&datagram) {
                    let decoded = IpEvent::decode(datagram.as_slice()).expect("prost decodes it");
                    prop_assert_eq!(decoded.ip, i64::from(event.ip));
                    prop_assert_eq!(decoded.app_sha256.to_lowercase(), event.app.to_hex());
                }
            }

            /// Structured datagrams (repeated, reordered and unknown fields; shas valid, short,
            /// not hex, not UTF-8): parse accepts exactly what prost decodes to a 64-hex-digit
            /// sha and an IPv4 address, when both fields are present.
            #[test]
            fn accepts_exactly_what_prost_does(fields in proptest::collection::vec(field(), 0..6)) {
                use prost::Message;
                let datagram: Vec<u8> = fields.iter().flat_map(|(_, bytes)| bytes.clone()).collect();
                let has = |tag| fields.iter().any(|&(t, _)| t == tag);
                let decoded = IpEvent::decode(datagram.as_slice());
                let want_ok = match &decoded {
                    Ok(event) => has(1) && has(2)
                        && AppKey::from_hex(event.app_sha256.as_bytes()).is_some()
                        && u32::try_from(event.ip).is_ok(),
                    Err(_) => false,
                };
                let got = parse(&datagram);
                prop_assert_eq!(got.is_ok(), want_ok, "{:?} {:?}", got, decoded);
                if let (Ok(event), Ok(decoded)) = (got, decoded) {
                    prop_assert_eq!(i64::from(event.ip), decoded.ip);
                    prop_assert_eq!(event.app.to_hex(), decoded.app_sha256.to_lowercase());
                }
            }

            #[test]
            fn round_trips(sha in proptest::array::uniform32(any::<u8>()), ip in any::<u32>()) {
                let app = AppKey(sha);
                prop_assert_eq!(parse(&encode(&app.to_hex(), ip.into())), Ok(Event { app, ip }));
            }
        }
    }
}
