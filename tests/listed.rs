//! Every test file in `tests/` is listed as a `[[test]]` in `vmm/Cargo.toml`. The tests live
//! outside the package, where the users were told they are, so cargo finds none by itself
//! (`autotests = false`): a file nobody listed would never build nor run, and nobody would
//! notice. This fails instead, naming the file and the lines to add. (A check in
//! `vmm/build.rs` would fail the build, but watching `tests/` there would rebuild `vmm` on
//! every edit of a test.) `tests/common/` is the tests' helper module, not a test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

use std::collections::BTreeSet;
use std::path::Path;

/// The file names (`cli.rs`) of the `[[test]]` targets in a manifest whose path is in `tests/`.
fn listed(manifest: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut in_test = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_test = line == "[[test]]";
        } else if in_test {
            let Some(value) = line.strip_prefix("path").map(str::trim_start) else {
                continue;
            };
            let Some(value) = value.strip_prefix('=') else {
                continue;
            };
            let path = value.trim().trim_matches('"');
            if let Some(file) = path.strip_prefix("../tests/") {
                found.insert(file.to_string());
            }
        }
    }
    found
}

/// What to add to `vmm/Cargo.toml` for `tests/<file>`.
fn entry(file: &str) -> String {
    let name = file.trim_end_matches(".rs");
    format!("[[test]]\nname = \"{name}\"\npath = \"../tests/{file}\"\n")
}

#[test]
fn every_test_file_is_listed_in_the_manifest() {
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(package.join("Cargo.toml")).unwrap();
    let listed = listed(&manifest);
    let tests = package.join("../tests");
    let files: BTreeSet<String> = std::fs::read_dir(&tests)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "rs"))
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.contains("listed.rs"),
        "read the wrong folder: {}",
        tests.display()
    );
    let unlisted: Vec<&String> = files.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "{} never runs: vmm/Cargo.toml does not list it (autotests = false). Add to vmm/Cargo.toml:\n\n{}",
        unlisted
            .iter()
            .map(|f| format!("tests/{f}"))
            .collect::<Vec<_>>()
            .join(", "),
        unlisted.iter().map(|f| entry(f)).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn reads_the_test_targets_of_a_manifest() {
    let manifest = "[package]\nname = \"vmm\"\npath = \"../tests/no.rs\"\n\n[[test]]\nname = \"cli\"\n\
                    path = \"../tests/cli.rs\"\n\n[[bench]]\nname = \"b\"\npath = \"../tests/bench.rs\"\n\n\
                    [[test]]\npath=\"../tests/modes.rs\"\nname = \"modes\"\n[dependencies]\n";
    let found: Vec<String> = listed(manifest).into_iter().collect();
    assert_eq!(found, ["cli.rs", "modes.rs"]);
    assert_eq!(
        entry("new.rs"),
        "[[test]]\nname = \"new\"\npath = \"../tests/new.rs\"\n"
    );
}
