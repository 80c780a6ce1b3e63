//! The code's shape, checked from the sources: the strict module order that `src/lib.rs`
//! states, the README's codemap, and the headers the gate forwards to the API.

use std::fs;
use std::path::{Path, PathBuf};

fn source(path: &str) -> String {
    let full: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// The modules `src/lib.rs` declares, in its order.
fn modules_in_order() -> Vec<String> {
    source("src/lib.rs")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub mod ")?.strip_suffix(';'))
        .map(str::to_owned)
        .collect()
}

/// Code lines of a file, without comment lines.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
}

/// The crate modules `text` names as `crate::name`, in `use` lines or inline paths.
fn crate_modules_used(text: &str) -> Vec<String> {
    let mut used = Vec::new();
    for line in code_lines(text) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            assert!(
                !rest.starts_with('{'),
                "write one `use crate::module::...` per module, not a group: {line}"
            );
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used.push(name);
        }
    }
    used
}

/// The rule `src/lib.rs` states: each module uses only modules listed above it.
fn upward_imports(order: &[String], uses: impl Fn(&str) -> Vec<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (position, module) in order.iter().enumerate() {
        for used in uses(module) {
            match order.iter().position(|m| *m == used) {
                Some(p) if p < position => {}
                Some(p) if p == position => {}
                Some(_) => problems.push(format!("{module} uses {used}, which is listed below it")),
                None => problems.push(format!("{module} uses {used}, which lib.rs does not list")),
            }
        }
    }
    problems
}

#[test]
fn modules_use_only_the_modules_above_them() {
    let order = modules_in_order();
    assert!(order.len() >= 10, "lib.rs lists {order:?}");
    let problems = upward_imports(&order, |module| {
        crate_modules_used(&source(&format!("src/{module}.rs")))
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_order_check_finds_cycles_and_upward_imports() {
    let order: Vec<String> = ["wire", "gate", "http"].map(String::from).to_vec();
    let sources = |module: &str| match module {
        "wire" => "",
        "gate" => "use crate::http::MAX_BODY_BYTES;\nlet x = crate::wire::parse(b);",
        "http" => "use crate::gate::Gate;\n// use crate::server::nothing_in_a_comment;",
        _ => unreachable!(),
    };
    let problems = upward_imports(&order, |module| crate_modules_used(sources(module)));
    assert_eq!(problems, ["gate uses http, which is listed below it"]);
}

#[test]
fn every_source_file_is_a_listed_module_and_in_the_codemap() {
    let order = modules_in_order();
    let readme = source("README.md");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|name| name.strip_suffix(".rs").map(str::to_owned))
        .collect();
    files.sort();
    for file in files {
        assert!(
            readme.contains(&format!("`src/{file}.rs`")),
            "the README's codemap lacks src/{file}.rs"
        );
        if file != "lib" && file != "main" {
            assert!(order.contains(&file), "lib.rs does not list {file}");
        }
    }
}

/// The gate forwards only the headers it lists; a header the API read beyond those would
/// always be missing behind the gate.
#[test]
fn the_api_reads_only_headers_the_gate_forwards() {
    let http = source("src/http.rs");
    let code: Vec<&str> = code_lines(&http).collect();
    let code = code.join("\n");
    let mut read = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("request_header(") {
        rest = &rest[at + "request_header(".len()..];
        let call = &rest[..rest.find(')').expect("a closed call")];
        if let Some(name) = call.split('"').nth(1) {
            read.push(name.to_owned());
        }
    }
    assert!(read.len() >= 3, "found only {read:?}");
    for name in &read {
        assert!(
            ipevents::gate::FORWARDED_HEADERS
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name)),
            "http.rs reads {name}, which the gate does not forward"
        );
    }
    // Every header lookup goes through request_header.
    assert_eq!(code.matches(".headers()").count(), 1, "{read:?}");
}
