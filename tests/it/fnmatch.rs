//! Every row of the CPython-generated fixture must match `fnmatchcase` exactly.

use std::path::Path;

use ge_orchestrator::core::fnmatch::fnmatchcase;

#[test]
fn every_fixture_row_matches_cpython() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fnmatch_cases.tsv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut rows = 0;
    let mut wrong = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "line {} has {} columns: {line:?}", n + 1, cols.len());
        let (pattern, subject, expected) = (cols[0], cols[1], cols[2] == "true");
        rows += 1;
        match fnmatchcase(subject, pattern) {
            Ok(got) if got == expected => {}
            Ok(got) => wrong.push(format!("line {}: fnmatchcase({subject:?}, {pattern:?}) = {got}, CPython says {expected}", n + 1)),
            Err(e) => wrong.push(format!("line {}: {e}", n + 1)),
        }
    }
    assert!(rows >= 2000, "only {rows} rows read from {}", path.display());
    assert!(wrong.is_empty(), "{} of {rows} rows differ from CPython:\n{}", wrong.len(), wrong.join("\n"));
}
