//! The crate's layers, checked from the source: every `crate::X` path in `src/**/*.rs` (in `use`
//! lines and inline paths alike) must point to the file's own module or to a layer below it.
//! An arrow pointing up fails this test, and with it CI.
//!
//! ```text
//!   main ─ cli ─ daemon ─ {csi, cluster, metrics} ─ node ─ spec ─ engine
//! ```
//!
//! Modules of one layer do not import each other, except in the directions listed in
//! [`SIDEWAYS`]. The pure layers ([`PURE`]: engine, spec, node) name no gRPC, Kubernetes, HTTP
//! or Prometheus crate.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules from the bottom up; modules on one line share a layer.
const LAYERS: &[&[&str]] = &[
    &["engine"],
    &["spec"],
    &["node"],
    // The adapters around the node's volumes. `metrics` sits here for now: it knows tonic codes
    // and hyper, so it is an adapter, not a base layer.
    &["csi", "cluster", "metrics"],
    &["daemon"],
    &["cli"],
    &["main", "lib"],
];

/// Imports allowed between modules of one layer: (from, to).
const SIDEWAYS: &[(&str, &str)] = &[
    // The CSI services call the cluster agent (locks, commits by pod phase) and read claim
    // annotations; the cluster side never calls the CSI services.
    ("csi", "cluster"),
    // Both adapters count what they do.
    ("csi", "metrics"),
    ("cluster", "metrics"),
];

/// Arrows up allowed for now, while a change that removes them lands: (file or directory under
/// src/, target module), each allowed only from exactly there. Empty: no arrow points up.
const ALLOWED_FOR_NOW: &[(&str, &str)] = &[];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file under `src/` belongs to: `node/mount.rs` → `node`,
/// `metrics.rs` → `metrics`.
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .expect("a path under src/")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.strip_suffix(".rs").unwrap_or(&first).to_string()
}

/// The top-level modules named by `crate::` paths in `source`, outside comments, with the line
/// of each.
fn crate_refs(source: &str) -> Vec<(usize, String)> {
    let mut refs = Vec::new();
    // Code only: line comments (doc comments included) may name any module.
    let code: Vec<(usize, String)> = source
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let code = match l.find("//") {
                // A `//` inside a string literal (a URL) is kept; good enough for this source.
                Some(at) if !l[..at].contains('"') => &l[..at],
                _ => l,
            };
            (i + 1, code.to_string())
        })
        .collect();
    let text: String = code
        .iter()
        .map(|(_, l)| format!("{l}\n"))
        .collect::<String>();
    let line_at = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut from = 0;
    while let Some(found) = text[from..].find("crate::") {
        let at = from + found;
        from = at + "crate::".len();
        // `cachevol::crate::` does not exist; but `foo_crate::` would: require a boundary.
        if text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &text[from..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the names at the group's top level.
            let mut depth = 0;
            let mut segment = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_ident(&mut refs, line_at(at), &segment);
                        segment.clear();
                        continue;
                    }
                    _ => {}
                }
                segment.push(c);
            }
            push_ident(&mut refs, line_at(at), &segment);
        } else {
            push_ident(&mut refs, line_at(at), rest);
        }
    }
    refs
}

fn push_ident(refs: &mut Vec<(usize, String)>, line: usize, s: &str) {
    let ident: String = s
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !ident.is_empty() {
        refs.push((line, ident));
    }
}

/// Every arrow of `rel` (a path under src/) that breaks the layers, as messages.
fn violations(rel: &Path, source: &str) -> Vec<String> {
    let from = module_of(rel);
    let Some(from_layer) = layer_of(&from) else {
        return vec![format!(
            "src/{}: module {from:?} is in no layer; add it to LAYERS in tests/layers.rs",
            rel.display()
        )];
    };
    let rel_str = rel.to_string_lossy();
    let mut out = Vec::new();
    for (line, to) in crate_refs(source) {
        if to == from {
            continue;
        }
        let Some(to_layer) = layer_of(&to) else {
            out.push(format!(
                "src/{rel_str}:{line}: crate::{to} is in no layer; add it to LAYERS"
            ));
            continue;
        };
        let allowed = to_layer < from_layer
            || (to_layer == from_layer && SIDEWAYS.contains(&(from.as_str(), to.as_str())))
            || ALLOWED_FOR_NOW
                .iter()
                .any(|(path, target)| rel_str.starts_with(path) && *target == to);
        if !allowed {
            let how = if to_layer == from_layer {
                "sideways"
            } else {
                "up"
            };
            out.push(format!(
                "src/{rel_str}:{line}: {from} imports crate::{to}, an arrow {how} \
                 ({from} is layer {from_layer}, {to} layer {to_layer})"
            ));
        }
    }
    out
}

/// Layers that stay free of the adapters' crates: gRPC, Kubernetes, HTTP, Prometheus.
const PURE: &[&str] = &["engine", "spec", "node"];
const ADAPTER_CRATES: &[&str] = &["tonic", "kube", "k8s_openapi", "hyper", "prometheus"];

/// Every use of an adapter crate in `rel` when it belongs to a pure layer, as messages.
fn impurities(rel: &Path, source: &str) -> Vec<String> {
    let module = module_of(rel);
    if !PURE.contains(&module.as_str()) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for krate in ADAPTER_CRATES {
            let path = format!("{krate}::");
            let found = code.match_indices(&path).any(|(at, _)| {
                !code[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            });
            if found {
                out.push(format!(
                    "src/{}:{}: {module} uses {krate}, an adapter's crate",
                    rel.display(),
                    n + 1
                ));
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_arrow_points_up() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {} files in src/", files.len());
    let mut modules = BTreeSet::new();
    let mut bad = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(&src).unwrap();
        modules.insert(module_of(rel));
        let source = std::fs::read_to_string(path).unwrap();
        bad.extend(violations(rel, &source));
        bad.extend(impurities(rel, &source));
    }
    assert!(
        bad.is_empty(),
        "arrows that break the layers (docs/architecture.md):\n{}",
        bad.join("\n")
    );
    // Every layer named here exists, so the table cannot silently drift from the tree.
    for module in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            modules.contains(*module),
            "LAYERS names {module}, which src/ lacks"
        );
    }
}

#[test]
fn the_check_sees_every_form_of_path() {
    let rel = Path::new("node/mod.rs");
    // Up, in a plain use, a group and an inline path.
    assert_eq!(
        violations(rel, "use crate::csi::volume::VolumeSpec;\n").len(),
        1
    );
    assert_eq!(
        violations(rel, "use crate::{engine, daemon::Tasks};\n").len(),
        1
    );
    assert_eq!(
        violations(rel, "    let x = crate::cluster::agent::commit_view();\n").len(),
        1
    );
    let multi = "use crate::{\n    engine::{self, Store},\n    cli::parse_size,\n};\n";
    let v = violations(rel, multi);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("src/node/mod.rs:1: node imports crate::cli"),
        "{v:?}"
    );
    // Down, its own module, comments: fine.
    assert!(violations(
        rel,
        "use crate::engine::{self, Store};\nuse crate::spec::Mode;\n"
    )
    .is_empty());
    assert!(violations(rel, "use crate::node::mount;\n").is_empty());
    assert!(violations(rel, "/// See [`crate::csi::node`].\n// crate::daemon\n").is_empty());
    // The node and the engine report through traits: metrics is above them.
    assert_eq!(violations(rel, "crate::metrics::restore();\n").len(), 1);
    assert_eq!(
        violations(Path::new("engine/store.rs"), "crate::metrics::x();\n").len(),
        1
    );
    // Sideways only as listed: the cluster adapter never calls the CSI services.
    assert!(violations(
        Path::new("csi/node.rs"),
        "use crate::cluster::agent::Agent;\n"
    )
    .is_empty());
    let v = violations(
        Path::new("cluster/gc.rs"),
        "use crate::csi::records::Records;\n",
    );
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("sideways"), "{v:?}");
    // The cycle this layering broke: the CSI side reaching into the command line.
    assert_eq!(
        violations(
            Path::new("csi/controller.rs"),
            "pub r: crate::cli::RetentionArgs,\n"
        )
        .len(),
        1
    );
    // The pure layers name no adapter crate.
    assert_eq!(
        impurities(Path::new("spec/volume.rs"), "use tonic::Status;\n").len(),
        1
    );
    assert_eq!(
        impurities(Path::new("node/mod.rs"), "let c: kube::Client;\n").len(),
        1
    );
    assert!(impurities(Path::new("csi/mod.rs"), "use tonic::Status;\n").is_empty());
    assert!(impurities(Path::new("spec/pod.rs"), "/// kubelet's tonic::Status\n").is_empty());
    // A new top-level module must be placed.
    assert_eq!(violations(Path::new("extra.rs"), "").len(), 1);
}
