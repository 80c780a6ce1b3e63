//! Integration tests: the real server binary on loopback, real UDP datagrams, real HTTP.
//! One test binary, so that it links once.

mod abuse;
mod api;
mod hardening;
mod hostile;
mod ingest;
mod lifecycle;
mod regressions;
mod restart;
mod support;
