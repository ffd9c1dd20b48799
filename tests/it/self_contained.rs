//! The repository stands on its own: no file it tracks reaches into a checkout beside it, so a
//! clone with nothing next to it builds and passes (`.ci/run` runs the tests in such a clone).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

#[test]
fn no_tracked_file_points_at_a_shared_checkout_beside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Put together here, so that this file does not contain what it looks for.
    let needle = ["..", "shared"].join("/");
    let out = Command::new("git").args(["ls-files", "-z"]).current_dir(root).output().expect("run git ls-files");
    assert!(out.status.success(), "git ls-files: {}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<&Path> =
        out.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()).map(|f| Path::new(std::ffi::OsStr::from_bytes(f))).collect();
    assert!(files.iter().any(|f| f.ends_with("Cargo.toml")), "git ls-files listed the repository: {files:?}");

    let mut found = Vec::new();
    for file in &files {
        let bytes = match std::fs::read(root.join(file)) {
            Ok(b) => b,
            // Deleted in the working tree and not yet committed: nothing to read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("reading {}: {e}", file.display()),
        };
        // Binary files (those with a NUL byte) are the only ones left out.
        if bytes.contains(&0) {
            continue;
        }
        for (n, line) in String::from_utf8_lossy(&bytes).lines().enumerate() {
            if line.contains(&needle) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "tracked files refer to {needle}, which a clone does not have:\n{}", found.join("\n"));
}
