//! Inputs the fuzz targets under `fuzz/` found crashing, kept as data so that each bug stays
//! fixed. Every case names the target that found it and is checked the way that target
//! checks it, through the library rather than the server.

use std::sync::Arc;

use ipevents::store::{AppBudget, AppTable, Limits};
use ipevents::wire::{self, Event, IpEvent, Reject};
use prost::Message;

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// What the `datagram` target checks of one datagram: `parse` gives `want`; it is never
/// looser than prost (what it accepts prost decodes to the same event, what it calls malformed
/// prost refuses); and an accepted event leaves a table whose invariants hold.
#[track_caller]
fn check(datagram: &[u8], want: Result<Event, Reject>) {
    let parsed = wire::parse(datagram);
    assert_eq!(parsed, want, "datagram {datagram:02x?}");
    let decoded = IpEvent::decode(datagram);
    match parsed {
        Ok(event) => {
            let decoded = decoded.expect("prost decodes what parse accepts");
            assert_eq!(decoded.app_sha256.to_lowercase(), event.app.to_hex());
            assert_eq!(decoded.ip, i64::from(event.ip));
            let budget = Arc::new(AppBudget::new(64));
            let mut table = AppTable::new(Limits { max_ips_per_app: 8 }, budget);
            table.apply(event);
            assert_eq!(table.check_invariants(), Ok(()));
        }
        Err(Reject::Malformed) => assert!(decoded.is_err(), "prost decodes {datagram:02x?}"),
        Err(_) => {}
    }
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn datagram_target() {
    let valid = wire::encode(SHA, 1);
    // Found by `datagram`: an app_sha256 field that is not UTF-8, overridden by a valid one.
    // parse kept only the last value and accepted the event; prost refuses any string field
    // that is not UTF-8, wherever it stands, so the datagram is malformed.
    check(
        &concat(&[&[0x0a, 0x01, 0xff], &valid]),
        Err(Reject::Malformed),
    );
    // The same bytes as the last app_sha256 are malformed too, not a bad sha.
    check(
        &concat(&[&valid, &[0x0a, 0x01, 0xff]]),
        Err(Reject::Malformed),
    );
    // An earlier sha that is UTF-8 but not hex is still overridden: the last value counts.
    check(
        &concat(&[&[0x0a, 0x04], b"nope", &valid]),
        Ok(Event {
            app: wire::AppKey::from_hex(SHA.as_bytes()).unwrap(),
            ip: 1,
        }),
    );
}
