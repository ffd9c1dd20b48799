//! The layers of `src/` and their direction: core ← engine ← ops ← replica ← tools ← cli. A
//! module may use modules of its own layer or of the layers before it, never after, and the
//! graph of modules (from every `crate::` path in the source) has no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: [&str; 6] = ["core", "engine", "ops", "replica", "tools", "cli"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/engine/streams.rs` -> `engine::streams`; `src/tools/bench/mod.rs` -> `tools::bench`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [one] if one == "lib" || one == "main" => None,
        _ => Some(parts.join("::")),
    }
}

/// Every path a `crate::` prefix reaches, with `use crate::{a::b, c::{d, e}}` groups expanded.
fn crate_paths(source: &str) -> Vec<String> {
    fn expand(prefix: &str, group: &str, out: &mut Vec<String>) {
        let (mut depth, mut start) = (0, 0);
        let mut items = Vec::new();
        for (i, ch) in group.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&group[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items.push(&group[start..]);
        for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
            let item = item.split(" as ").next().unwrap_or(item).trim();
            match item.find('{') {
                Some(open) => {
                    let head = item[..open].trim_end_matches("::");
                    let inner = &item[open + 1..item.rfind('}').unwrap_or(item.len())];
                    expand(&join(prefix, head), inner, out);
                }
                None => out.push(join(prefix, item.trim_end_matches("::self"))),
            }
        }
    }
    fn join(a: &str, b: &str) -> String {
        match (a.is_empty(), b.is_empty() || b == "self") {
            (true, _) => b.to_string(),
            (false, true) => a.to_string(),
            (false, false) => format!("{a}::{b}"),
        }
    }
    let code: String = source.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let path_len = after.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(after.len());
        let path = after[..path_len].trim_end_matches("::");
        if after[path_len..].starts_with('{') {
            let body = &after[path_len + 1..];
            let mut depth = 1;
            let end = body
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(body.len());
            expand(path, &body[..end], &mut out);
        } else {
            out.push(path.to_string());
        }
        rest = &after[path_len..];
    }
    out
}

/// module -> the modules its `crate::` paths reach (the longest module prefix of each path).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: BTreeMap<String, String> =
        files.iter().filter_map(|f| Some((module_of(&src, f)?, std::fs::read_to_string(f).unwrap()))).collect();
    let resolve = |path: &str| {
        let segs: Vec<&str> = path.split("::").collect();
        (1..=segs.len()).rev().map(|n| segs[..n].join("::")).find(|m| sources.contains_key(m))
    };
    sources
        .iter()
        .map(|(module, text)| {
            let deps = crate_paths(text)
                .iter()
                .filter_map(|p| resolve(p))
                // A folder's mod.rs declares its children; that is not a use.
                .filter(|d| d != module && !module.starts_with(&format!("{d}::")))
                .collect();
            (module.clone(), deps)
        })
        .collect()
}

fn layer(module: &str) -> usize {
    let top = module.split("::").next().unwrap_or(module);
    LAYERS.iter().position(|l| *l == top).unwrap_or_else(|| panic!("module {module} is in no layer; add its folder to LAYERS"))
}

#[test]
fn the_parser_sees_grouped_and_nested_uses() {
    let paths = crate_paths("use crate::engine::{store, streams::{self, Trigger}};\nlet x = crate::ops::reads::counts(); // crate::cli");
    assert_eq!(paths, ["engine::store", "engine::streams", "engine::streams::Trigger", "ops::reads::counts"]);
}

#[test]
fn dependencies_point_down_the_layers() {
    let g = graph();
    assert!(g.len() > 30, "found only {} modules", g.len());
    let upward: Vec<String> =
        g.iter().flat_map(|(m, deps)| deps.iter().filter(|d| layer(d) > layer(m)).map(move |d| format!("{m} uses {d}"))).collect();
    assert!(upward.is_empty(), "uses against the layers ({}):\n{}", LAYERS.join(" <- "), upward.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|p| p == m) {
            cycles.push(format!("{} -> {m}", path[at..].join(" -> ")));
            return;
        }
        if !done.insert(m.to_string()) {
            return;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            visit(d, g, path, done, cycles);
        }
        path.pop();
    }
    let (mut done, mut cycles) = (BTreeSet::new(), Vec::new());
    for m in g.keys() {
        visit(m, &g, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}
