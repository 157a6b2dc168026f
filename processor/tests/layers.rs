//! The processor's dependency direction, read from its sources: the domain imports nothing of
//! the crate but itself, no module below the top imports `api`, `outbox`, `worker` or the
//! commands, and neither the top-level modules nor the files of one module import each other
//! in a cycle. Test modules (from the first `#[cfg(test)]` of a file on) and comments are not
//! read. And no source file of the workspace's crates is over [`MAX_LINES`] lines before its
//! tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules only the top (`cli`, the commands, the servers) may import.
const TOP: &[&str] = &["api", "outbox", "worker", "cli", "reconcile", "service"];

/// Modules that are the top themselves: they may import each other in one direction.
fn is_top(module: &str) -> bool {
    TOP.contains(&module) || module == "dlq"
}

/// Longest a source file may be before its test module (a file of tests alone is not counted).
const MAX_LINES: usize = 800;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The code of a file without comments and without its test module.
fn code(source: &str) -> String {
    let source = source.split("#[cfg(test)]").next().unwrap_or_default();
    source
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segments after each `prefix::` in `code`, braces of `use` groups opened.
fn targets(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let needle = format!("{prefix}::");
    let mut rest = code;
    while let Some(at) = rest.find(&needle) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split on commas outside nested braces.
            let mut depth = 0;
            let mut name = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_first(&mut out, &name);
                        name.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    name.push(c);
                }
            }
            push_first(&mut out, &name);
        } else {
            push_first(&mut out, rest);
        }
    }
    out
}

fn push_first(out: &mut BTreeSet<String>, path: &str) {
    let first: String = path
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .collect();
    if !first.is_empty() && first != "self" {
        out.insert(first);
    }
}

/// `(top-level graph, per-module graphs of sibling files)` of the sources under `src`.
fn graphs(files: &[(String, String)]) -> (Graph, BTreeMap<String, Graph>) {
    let mut top = Graph::new();
    let mut inner: BTreeMap<String, Graph> = BTreeMap::new();
    for (path, source) in files {
        let module: Vec<&str> = path
            .trim_end_matches(".rs")
            .split('/')
            .filter(|s| *s != "mod")
            .collect();
        if matches!(module.as_slice(), ["lib" | "main"]) {
            continue;
        }
        let code = code(source);
        let first = module[0].to_owned();
        let entry = top.entry(first.clone()).or_default();
        entry.extend(targets(&code, "crate").into_iter().filter(|t| *t != first));
        // A file of a module (`dlq/index.rs`) and the siblings it names through `super::`.
        if module.len() == 2 && !path.ends_with("/mod.rs") {
            let siblings = inner.entry(first).or_default();
            siblings
                .entry(module[1].to_owned())
                .or_default()
                .extend(targets(&code, "super"));
        }
    }
    // Only edges between files of the module count (`super::Item` of mod.rs is the parent).
    for graph in inner.values_mut() {
        let names: BTreeSet<String> = graph.keys().cloned().collect();
        for targets in graph.values_mut() {
            targets.retain(|t| names.contains(t));
        }
    }
    (top, inner)
}

/// One cycle of `graph`, if it has one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if graph.contains_key(next)
                && let Some(found) = visit(next, graph, path, done)
            {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// Every violation of the direction, as readable lines.
fn violations(files: &[(String, String)]) -> Vec<String> {
    let (top, inner) = graphs(files);
    let mut out = Vec::new();
    for (module, imports) in &top {
        if module == "domain" {
            out.extend(
                imports
                    .iter()
                    .map(|t| format!("domain imports crate::{t}: the domain imports only shared")),
            );
        } else if !is_top(module) {
            out.extend(
                imports
                    .iter()
                    .filter(|t| TOP.contains(&t.as_str()))
                    .map(|t| format!("{module} imports crate::{t}, a module above it")),
            );
        }
    }
    if let Some(found) = cycle(&top) {
        out.push(format!("import cycle: {}", found.join(" -> ")));
    }
    for (module, graph) in &inner {
        if let Some(found) = cycle(graph) {
            out.push(format!("import cycle in {module}/: {}", found.join(" -> ")));
        }
    }
    out
}

#[test]
fn the_processor_has_no_import_cycle_and_no_arrow_up() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    assert!(files.len() > 40, "read {} files", files.len());
    let found = violations(&files);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_check_finds_cycles_arrows_up_and_domain_imports() {
    let file = |path: &str, source: &str| (path.to_owned(), source.to_owned());
    let files = vec![
        file("store/mod.rs", "use crate::{domain::view, outbox::cause};"),
        file(
            "outbox/mod.rs",
            "use crate::store::Row; // crate::worker in a comment",
        ),
        file("domain/mod.rs", "fn f() { crate::cache::get() }"),
        file("dlq/index.rs", "use super::pass::Action;"),
        file("dlq/pass.rs", "use super::{index::Index, Selector};"),
        file(
            "worker/batch.rs",
            "#[cfg(test)]\nmod tests { use super::settle::x; }",
        ),
        file("worker/settle.rs", "use super::batch::Item;"),
    ];
    let found = violations(&files);
    assert_eq!(
        found,
        [
            "domain imports crate::cache: the domain imports only shared",
            "store imports crate::outbox, a module above it",
            "import cycle: outbox -> store -> outbox",
            "import cycle in dlq/: index -> pass -> index",
        ],
        "{found:#?}"
    );
}

#[test]
fn no_source_file_is_over_800_lines_before_its_tests() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in ["processor", "shared", "ingress"] {
        let root = workspace.join(krate).join("src");
        let mut own = Vec::new();
        sources(&root, &root, &mut own);
        files.extend(
            own.into_iter()
                .map(|(path, source)| (format!("{krate}/src/{path}"), source)),
        );
    }
    assert!(files.len() > 60, "read {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter(|(path, _)| !path.ends_with("/tests.rs"))
        .filter_map(|(path, source)| {
            let before_tests = source.split("#[cfg(test)]").next().unwrap_or_default();
            let lines = before_tests.lines().count();
            (lines > MAX_LINES).then(|| format!("{path}: {lines} lines before its tests"))
        })
        .collect();
    assert!(long.is_empty(), "{}", long.join("\n"));
}
