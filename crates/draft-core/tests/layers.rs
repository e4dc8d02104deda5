//! The core's house plan, checked on its sources: every file belongs to a layer
//! (foundation < ops < memory < model < reward < train < data, its folder under `src/`), a
//! file uses only its own layer and the ones below it, and no two files use each other.
//! A use is a `crate::…` or `super::…` path in code (comments and unit-test modules aside);
//! the crate root's re-exports (`crate::Pipeline`, …) count as the files they come from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: [&str; 7] = ["", "ops", "memory", "model", "reward", "train", "data"];

/// The crate root's re-exports and the files that define them.
const ROOT_ITEMS: [(&str, &str); 5] = [
    ("Error", "error"),
    ("Result", "error"),
    ("Pipeline", "model/pipeline"),
    ("ModelFiles", "model/files"),
    ("read_f32", "tensor"),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A source file as a module path: `model/models/unet/mod.rs` → `model/models/unet`.
fn module_of(rel: &str) -> String {
    let m = rel.strip_suffix(".rs").unwrap();
    let m = m.strip_suffix("/mod").unwrap_or(m);
    if m == "lib" { String::new() } else { m.into() }
}

fn layer_of(module: &str) -> usize {
    let top = module.split('/').next().unwrap_or("");
    LAYERS.iter().position(|l| *l == top).unwrap_or(0)
}

/// The code of a file: without comments and without its `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `a::b::c` paths after each `crate::` / `super::` in `code`, as module paths.
fn uses(code: &str, module: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (start, prefix) in [("crate::", ""), ("super::", "super")] {
        let mut rest = code;
        while let Some(i) = rest.find(start) {
            let before = rest[..i].chars().last();
            rest = &rest[i + start.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = rest.chars().take_while(|c| ident(*c)).collect();
            let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let mut base: Vec<String> = if prefix == "super" {
                let mut m: Vec<String> = module.split('/').map(String::from).collect();
                // `super` of a file module is its folder's module.
                m.pop();
                m
            } else {
                Vec::new()
            };
            if prefix.is_empty()
                && let Some((_, file)) = ROOT_ITEMS.iter().find(|(n, _)| Some(n) == segs.first())
            {
                out.insert(file.to_string());
                continue;
            }
            // The longest prefix of the path that is a module.
            let mut found = None;
            for s in &segs {
                base.push(s.to_string());
                let m = base.join("/");
                if modules.contains(&m) {
                    found = Some(m);
                } else {
                    break;
                }
            }
            if let Some(m) = found
                && m != module
            {
                out.insert(m);
            }
        }
    }
    out
}

#[test]
fn no_file_uses_a_higher_layer_and_no_two_files_use_each_other() {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let rel = |p: &Path| {
        p.strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/")
    };
    let modules: BTreeSet<String> = files.iter().map(|p| module_of(&rel(p))).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &files {
        let m = module_of(&rel(p));
        let text = std::fs::read_to_string(p).unwrap();
        graph.insert(m.clone(), uses(&code(&text), &m, &modules));
    }
    assert!(
        graph.len() > 40,
        "found {} modules under {root:?}",
        graph.len()
    );
    let mut wrong = Vec::new();
    for (m, used) in &graph {
        // The crate root and the layers' `mod.rs` declare what they hold.
        let is_index = m.is_empty() || LAYERS.contains(&m.as_str());
        for u in used {
            if is_index && u.starts_with(&format!("{m}/")) {
                continue;
            }
            if layer_of(u) > layer_of(m) {
                wrong.push(format!(
                    "{m} ({}) uses {u} ({})",
                    LAYERS[layer_of(m)],
                    LAYERS[layer_of(u)]
                ));
            }
            // A folder's module may use its own files (unet/mod.rs uses unet/blocks).
            let parent_of = |a: &str, b: &str| b.starts_with(&format!("{a}/"));
            if graph.get(u).is_some_and(|back| back.contains(m))
                && m < u
                && !parent_of(m, u)
                && !parent_of(u, m)
            {
                wrong.push(format!("{m} and {u} use each other"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the layering is broken:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_sees_a_use_upward_and_a_circle() {
    let modules: BTreeSet<String> = [
        "ops",
        "ops/attention",
        "model",
        "model/nn",
        "model/lora",
        "train",
        "train/engine",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let u = uses(
        &code(
            "use crate::train::engine::Method; // crate::model::nn\nfn f() { crate::Pipeline::x() }",
        ),
        "ops/attention",
        &modules,
    );
    assert_eq!(
        u,
        ["model/pipeline", "train/engine"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert!(layer_of("train/engine") > layer_of("ops/attention"));
    let u = uses("use super::lora::LoraSlot;", "model/nn", &modules);
    assert!(u.contains("model/lora"), "{u:?}");
}
