//! Compiles `proto/ip_event.proto` with protox (pure Rust), so building needs no system `protoc`,
//! and records the compiler's version for `ipevents_build_info`.

use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ip_event.proto");
    let descriptors = protox::compile(["ip_event.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;

    // `rustc 1.88.0 (6b00bc388 2025-06-23)` -> `1.88.0`.
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=IPEVENTS_RUSTC_VERSION={version}");
    Ok(())
}
