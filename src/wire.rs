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
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppKey(pub [u8; 32]);

impl AppKey {
    /// Parses 64 hex digits, in either case.
    pub fn from_hex(hex_digits: &[u8]) -> Option<AppKey> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut key).ok()?;
        Some(AppKey(key))
    }

    /// The key as 64 lowercase hex digits, the form the API prints.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
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
    if datagram.is_empty() {
        return Err(Reject::Empty);
    }
    if datagram.len() > MAX_DATAGRAM_BYTES {
        return Err(Reject::Oversized);
    }
    let mut buf = datagram;
    let mut sha: Option<&[u8]> = None;
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
                // prost refuses a string field that is not UTF-8, even one that a later field
                // overrides; so does this, so that parse never accepts what prost rejects.
                if std::str::from_utf8(value).is_err() {
                    return Err(Reject::Malformed);
                }
                sha = Some(value);
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
    let app = validate_sha(sha)?;
    let ip = u32::try_from(ip).map_err(|_| Reject::IpOutOfRange)?;
    Ok(Event { app, ip })
}

fn validate_sha(sha: &[u8]) -> Result<AppKey, Reject> {
    if sha.len() != 64 {
        return Err(Reject::BadSha);
    }
    AppKey::from_hex(sha).ok_or(Reject::BadSha)
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
    fn dotted_quads() {
        assert_eq!(dotted_quad(0), "0.0.0.0");
        assert_eq!(dotted_quad(0x0a00_0001), "10.0.0.1");
        assert_eq!(dotted_quad(u32::MAX), "255.255.255.255");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
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

            #[test]
            fn round_trips(sha in proptest::array::uniform32(any::<u8>()), ip in any::<u32>()) {
                let app = AppKey(sha);
                prop_assert_eq!(parse(&encode(&app.to_hex(), ip.into())), Ok(Event { app, ip }));
            }
        }
    }
}
