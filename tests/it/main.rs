//! Integration tests: the real server binary on loopback, real UDP datagrams, real HTTP.
//! One test binary, so that it links once.

mod abuse;
mod api;
mod cluster_mode;
mod hardening;
mod hostile;
mod ingest;
mod layout;
mod lifecycle;
mod metrics;
mod redis_cluster;
mod regressions;
mod restart;
mod stealing;
mod steering;
mod support;
mod systemd;
