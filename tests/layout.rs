//! The layout's rules, checked on the source itself (README, Architecture):
//! each adapter crate is named only in its adapter, modules depend only
//! downwards with no cycle, and no source file is over 800 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

/// Top-level modules by layer, top (0) to bottom.
const LAYERS: &[(&str, u8)] = &[
    ("cli", 0),
    ("demo", 0),
    ("daemon", 1),
    ("tools", 1),
    ("sandbox", 1),
    ("broker", 2),
    ("audit", 2),
    ("aom", 2),
    ("domain", 3),
    ("retry", 3),
    ("limit", 3),
    ("settings", 3),
    ("metrics", 3),
    ("telemetry", 3),
];

/// Which files may name each crate (paths relative to `src/`).
const CRATES: &[(&str, &[&str])] = &[
    ("lapin", &["broker/"]),
    ("sqlx", &["audit/"]),
    ("reqwest", &["aom/", "broker/management.rs", "sandbox/"]),
    ("hyper", &["aom/direct.rs"]),
    ("hyper_util", &["aom/direct.rs"]),
    ("hyper_rustls", &["aom/direct.rs"]),
    ("prometheus_client", &["metrics.rs"]),
    ("rustix", &["settings/open_files.rs"]),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each file under `src/`, relative path and code lines (comments removed;
/// unit tests, which may reach across layers to build a world, cut off).
fn code() -> Vec<(String, Vec<String>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let rel = path
                .strip_prefix(&root)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&path).expect("read source");
            let lines = text
                .lines()
                .take_while(|l| rel.ends_with("tests.rs") || l.trim() != "#[cfg(test)]")
                .map(|l| l.split("//").next().unwrap_or("").to_owned())
                .collect();
            (rel, lines)
        })
        .collect()
}

#[test]
fn each_adapter_crate_is_named_in_its_adapter_only() {
    let mut offences = Vec::new();
    for (file, lines) in code() {
        if file.ends_with("tests.rs") {
            continue;
        }
        for (krate, allowed) in CRATES {
            if allowed.iter().any(|a| file.starts_with(a)) {
                continue;
            }
            for (n, line) in lines.iter().enumerate() {
                if line.contains(&format!("{krate}::")) || line.contains(&format!("use {krate}")) {
                    offences.push(format!("src/{file}:{}: {krate}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(offences.is_empty(), "\n{}", offences.join("\n"));
}

fn top_module(file: &str) -> Option<&str> {
    let first = file.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS.iter().any(|(m, _)| *m == name).then_some(name)
}

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map_or(u8::MAX, |(_, l)| *l)
}

#[test]
fn modules_depend_only_downwards_and_without_a_cycle() {
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for (file, lines) in code() {
        let Some(from) = top_module(&file) else {
            continue; // main.rs, lib.rs
        };
        if file.ends_with("tests.rs") {
            continue;
        }
        for line in &lines {
            for (to, _) in LAYERS {
                if *to != from && line.contains(&format!("crate::{to}")) {
                    uses.entry(from.to_owned())
                        .or_default()
                        .insert((*to).to_owned());
                    if layer(to) < layer(from) || (layer(to) == layer(from) && layer(from) < 3) {
                        upward.push(format!("src/{file}: {from} uses {to}: {}", line.trim()));
                    }
                }
            }
        }
    }
    assert!(upward.is_empty(), "\n{}", upward.join("\n"));
    // No cycle, even among the plain modules at the bottom.
    fn visit(
        m: &str,
        uses: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|p| p == m) {
            let mut cycle = path[start..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        path.push(m.to_owned());
        for next in uses.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(next, uses, path) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    for (m, _) in LAYERS {
        if let Some(cycle) = visit(m, &uses, &mut Vec::new()) {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn no_source_file_is_over_800_lines() {
    let mut dirs = vec![
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches"),
    ];
    let mut files = Vec::new();
    for dir in dirs.drain(..) {
        sources(&dir, &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).ok()?.lines().count();
            (n > MAX_LINES).then(|| format!("{} has {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "{long:?}");
}
