//! The protocol layer (every module directly under `src/`) never uses the node layer
//! (`src/node/`): an application may replace the node layer and keep the protocol.
//! `lib.rs` only re-exports both.

use std::{fs, path::Path};

/// The node layer's public names: what `src/node/mod.rs` re-exports and declares.
fn node_layer_names() -> Vec<String> {
    let text =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/node/mod.rs")).unwrap();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut names = vec!["node::".to_owned()];
    let mut rest = text.as_str();
    while let Some(at) = rest.find("pub use ") {
        let statement = &rest[at..rest[at..].find(';').map_or(rest.len(), |end| at + end)];
        let braces = statement
            .split_once('{')
            .map_or(statement, |(_, inner)| inner);
        names.extend(
            braces
                .split(|c: char| !is_word(c))
                .filter(|w| !w.is_empty() && *w != "self")
                .map(str::to_owned),
        );
        rest = &rest[at + statement.len()..];
    }
    for line in text.lines() {
        for keyword in [
            "pub struct ",
            "pub trait ",
            "pub enum ",
            "pub mod ",
            "pub fn ",
        ] {
            if let Some(tail) = line.strip_prefix(keyword) {
                names.push(tail.split(|c: char| !is_word(c)).next().unwrap().to_owned());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_protocol_layer_does_not_use_the_node_layer() {
    let names = node_layer_names();
    assert!(names.iter().any(|n| n == "NodeState"), "{names:?}");
    assert!(names.iter().any(|n| n == "Membership"), "{names:?}");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() || file == "lib.rs" {
            continue;
        }
        checked += 1;
        let text = fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for name in &names {
                let found = code.match_indices(name.as_str()).any(|(at, _)| {
                    let before = code[..at].chars().next_back();
                    let after = code[at + name.len()..].chars().next();
                    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                    !word(before) && (name.ends_with("::") || !word(after))
                });
                assert!(
                    !found,
                    "{file}:{}: the protocol layer uses {name}: {line}",
                    n + 1
                );
            }
        }
    }
    assert!(checked >= 10, "only {checked} protocol files found");
}

/// The part of a source file outside its unit-test module.
fn outside_tests(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests")
        .map_or(text, |at| &text[..at])
}

#[test]
fn time_comes_from_one_place_in_each_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    for (dir, allowed) in [(src.clone(), "time.rs"), (src.join("node"), "clock.rs")] {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() || file == allowed {
                continue;
            }
            checked += 1;
            let text = fs::read_to_string(&path).unwrap();
            for (n, line) in outside_tests(&text).lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for clock in ["Instant::now()", "SystemTime::now()"] {
                    assert!(
                        !line.contains(clock),
                        "{}/{file}:{}: {clock} outside {allowed}: {line}",
                        dir.display(),
                        n + 1
                    );
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} files checked");
}

#[test]
fn the_build_under_test_is_the_one_users_get() {
    let manifest =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let (_, dev) = manifest.split_once("[dev-dependencies]").unwrap();
    let dev = dev.split("\n[").next().unwrap();
    assert!(
        !dev.lines()
            .any(|l| l.trim_start().starts_with("gantry-coord")),
        "the crate is a dev-dependency of itself"
    );
    let (_, features) = manifest.split_once("[features]").unwrap();
    let features = features.split("\n[").next().unwrap();
    assert!(
        !features.contains("fuzzing"),
        "a feature that opens internals: {features}"
    );
}

#[test]
fn the_wire_contract_lives_in_the_repository_and_names_every_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let contract = fs::read_to_string(root.join("docs/protocol.md")).unwrap();
    let schema = fs::read_to_string(root.join("proto/coord.proto")).unwrap();
    let mut named = 0;
    for line in schema.lines() {
        let code = line.split("//").next().unwrap().trim();
        let Some((left, number)) = code.split_once('=') else {
            continue;
        };
        let number = number.trim().trim_end_matches(';').trim();
        if number.parse::<u32>().is_err() {
            continue;
        }
        let name = left.split_whitespace().last().unwrap();
        let name = ["KIND_", "OUTCOME_", "FAILURE_CLASS_"]
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
            .unwrap_or(name);
        let entry = format!("{name} = {number}");
        assert!(
            contract.contains(&entry),
            "docs/protocol.md lacks `{entry}`"
        );
        named += 1;
    }
    assert!(named >= 35, "only {named} schema entries found");
    // Code and docs point at the contract in the repository, not at pages outside it.
    for dir in ["src", "src/node", "tests", "proto", "examples"] {
        for entry in fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_default();
            for outside in [["PROTOCOL", ".md"], ["DESIGN", ".md"], ["AGENT", ".md"]] {
                let outside = outside.concat();
                assert!(
                    !text.contains(&outside),
                    "{} cites {outside}",
                    path.display()
                );
            }
        }
    }
}
