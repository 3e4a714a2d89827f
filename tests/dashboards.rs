//! The chart's Grafana dashboard (`charts/cachevol/dashboards/cachevol.json`) and its alerts
//! (`templates/prometheusrule.yaml`) ask only for series cachevol exports: every metric they
//! name is one the registry of `cachevol::metrics` renders (a histogram through its `_bucket`,
//! `_sum` and `_count`), every label they match or group by is one of its labels (or a label
//! Prometheus gives the target), every label value they match is one it exports, quantiles
//! group by `le`, and legends name labels the query keeps. A renamed metric or label would
//! otherwise leave an empty panel or an alert that never fires. That the queries are PromQL is
//! .ci/chart-check's to check (promql-parser).

use std::collections::{BTreeMap, BTreeSet};

use cachevol::metrics::{CommitOutcome, Metrics, RestoreLevel, RestoreOutcome};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Labels the scrape gives every series (kubernetes_sd and the chart's ServiceMonitor, which
/// relabels `node`), not the metrics themselves.
const TARGET_LABELS: &[&str] = &[
    "namespace",
    "pod",
    "instance",
    "job",
    "node",
    "service",
    "endpoint",
    "container",
];

/// What the registry exports: each family's type, and each series' labels (by series name).
struct Exported {
    types: BTreeMap<String, String>,
    series: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exported {
    /// The registry after one observation of everything whose label sets are not created up
    /// front (CSI calls), so that their labels and values show.
    fn new() -> Exported {
        let m = Metrics::new();
        m.grpc("NodePublishVolume", tonic::Code::Ok, 0.2);
        m.restore(RestoreLevel::Key, RestoreOutcome::Restored, 1, 0.1);
        m.commit(CommitOutcome::Committed, 1, 0.1);
        let mut types = BTreeMap::new();
        let mut series: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
        for line in m.render().lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (name, labels) = match line.split_once('{') {
                Some((name, rest)) => (name, matchers(&rest[..rest.rfind('}').unwrap()])),
                None => (line.split(' ').next().unwrap(), Vec::new()),
            };
            let labels = labels.into_iter().map(|(l, _, v)| (l, v)).collect();
            series.entry(name.to_string()).or_default().push(labels);
        }
        Exported { types, series }
    }

    /// The family a series name belongs to and whether it is a histogram's `_bucket`.
    fn family<'a>(&self, series: &'a str) -> Option<(&'a str, bool)> {
        if self.types.contains_key(series) {
            return Some((series, false));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = series.strip_suffix(suffix) {
                if self.types.get(base).map(String::as_str) == Some("histogram") {
                    return Some((base, suffix == "_bucket"));
                }
            }
        }
        None
    }

    /// The values label `label` takes in the exported series of `name`.
    fn values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.series
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|s| s.get(label).cloned())
            .collect()
    }
}

/// `a="x", b=~"y|z"` → [(a, =, x), (b, =~, y|z)]; values may hold commas and escaped quotes.
fn matchers(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let q = rest
            .find('"')
            .unwrap_or_else(|| panic!("no value in {text:?}"));
        let head = rest[..q].trim();
        let op_at = head
            .find(['=', '!'])
            .unwrap_or_else(|| panic!("no operator in {text:?}"));
        let (label, op) = (head[..op_at].trim(), head[op_at..].trim());
        let mut value = String::new();
        let mut chars = rest[q + 1..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '"' => {
                    end = Some(q + 1 + i + 1);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unclosed value in {text:?}"));
        out.push((label.to_string(), op.to_string(), value));
        rest = rest[end..].trim_start().trim_start_matches(',').trim();
    }
    out
}

/// A metric a query names, with its matchers.
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

/// The metrics `expr` names (identifiers starting `cachevol_` or `process_`), and the labels
/// of its `by`/`without`/`on`/`ignoring` lists.
fn scan(expr: &str) -> (Vec<Selector>, BTreeSet<String>) {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let (mut selectors, mut grouping) = (Vec::new(), BTreeSet::new());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            // A quoted string outside a selector (label_values' arguments have none).
            i += 1 + expr[i + 1..].find('"').unwrap() + 1;
            continue;
        }
        if !ident(b[i]) || (i > 0 && ident(b[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && ident(b[i]) {
            i += 1;
        }
        let word = &expr[start..i];
        let after = expr[i..].trim_start();
        if ["by", "without", "on", "ignoring"].contains(&word) && after.starts_with('(') {
            let list = &after[1..after.find(')').unwrap()];
            grouping.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        } else if word.starts_with("cachevol_") || word.starts_with("process_") {
            let matchers = match after.strip_prefix('{') {
                Some(inner) => {
                    // The closing brace outside quotes.
                    let mut quoted = false;
                    let close = inner
                        .char_indices()
                        .find(|&(_, c)| {
                            if c == '"' {
                                quoted = !quoted;
                            }
                            c == '}' && !quoted
                        })
                        .unwrap()
                        .0;
                    matchers(&inner[..close])
                }
                None => Vec::new(),
            };
            selectors.push(Selector {
                name: word.to_string(),
                matchers,
            });
        }
    }
    (selectors, grouping)
}

/// Checks one query; `legend` is a Grafana legend format (`{{label}} …`), if any.
fn check(exported: &Exported, expr: &str, legend: Option<&str>, at: &str) {
    let (selectors, grouping) = scan(expr);
    assert!(
        !selectors.is_empty(),
        "{at}: names no cachevol metric: {expr}"
    );
    let mut labels_seen = BTreeSet::new();
    let mut buckets = false;
    for s in &selectors {
        let (family, bucket) = exported.family(&s.name).unwrap_or_else(|| {
            panic!(
                "{at}: {} is not a metric cachevol exports (src/metrics.rs)",
                s.name
            )
        });
        buckets |= bucket;
        let own: BTreeSet<String> = exported
            .series
            .get(&s.name)
            .into_iter()
            .flatten()
            .flat_map(|l| l.keys().cloned())
            .collect();
        labels_seen.extend(own.iter().cloned());
        for (label, op, value) in &s.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            assert!(
                own.contains(label),
                "{at}: {family} has no label {label} (it has {own:?})"
            );
            let known = exported.values(&s.name, label);
            let wanted: Vec<&str> = if op.contains('~') {
                value.split('|').collect()
            } else {
                vec![value.as_str()]
            };
            for w in wanted {
                assert!(
                    known.contains(w),
                    "{at}: {}{{{label}{op}\"{value}\"}}: {w:?} is not a value cachevol exports \
                     ({known:?})",
                    s.name
                );
            }
        }
    }
    for g in &grouping {
        assert!(
            TARGET_LABELS.contains(&g.as_str()) || labels_seen.contains(g),
            "{at}: groups by {g}, a label none of its metrics has: {expr}"
        );
    }
    if buckets {
        assert!(
            grouping.contains("le"),
            "{at}: a quantile of buckets that are not grouped by le: {expr}"
        );
    }
    if let Some(legend) = legend {
        for part in legend.split("{{").skip(1) {
            let label = part.split("}}").next().unwrap().trim();
            assert!(
                grouping.contains(label),
                "{at}: the legend names {label}, which the query does not keep: {expr}"
            );
        }
    }
}

#[test]
fn every_dashboard_query_asks_for_series_cachevol_exports() {
    let exported = Exported::new();
    let path = format!("{ROOT}/charts/cachevol/dashboards/cachevol.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for t in panel["targets"].as_array().into_iter().flatten() {
            queries += 1;
            check(
                &exported,
                t["expr"].as_str().unwrap(),
                t["legendFormat"].as_str(),
                &format!("dashboard panel {title:?}"),
            );
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            check(
                &exported,
                q,
                None,
                &format!("dashboard variable {}", v["name"]),
            );
        }
    }
    // Every family the dashboard is about (restores, commits, locks, bases, store, GC, CSI).
    for family in [
        "cachevol_restores_total",
        "cachevol_commits_total",
        "cachevol_lock_waiting_pods",
        "cachevol_node_base_bytes",
        "cachevol_store_request_errors_total",
        "cachevol_gc_runs_total",
        "cachevol_grpc_requests_total",
    ] {
        assert!(
            std::fs::read_to_string(&path).unwrap().contains(family),
            "the dashboard has no panel on {family}"
        );
    }
    assert!(queries >= 20, "only {queries} queries");
}

/// The alerts' expressions as the template writes them, with the chart's template actions
/// replaced by what they render to: the namespace matcher, and a duration for the values.
fn rule_expressions() -> Vec<(String, String)> {
    let path = format!("{ROOT}/charts/cachevol/templates/prometheusrule.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if let Some(a) = t.strip_prefix("- alert: ") {
            alert = a.to_string();
        }
        if t == "expr: |" {
            let indent = line.len() - t.len();
            let mut expr = String::new();
            while let Some(next) = lines.peek() {
                if next.len() - next.trim_start().len() <= indent {
                    break;
                }
                expr.push_str(next.trim());
                expr.push('\n');
                lines.next();
            }
            out.push((alert.clone(), untemplate(&expr)));
        }
    }
    assert!(out.len() >= 6, "{path}: only {} alerts found", out.len());
    out
}

/// Replaces each `{{ … }}` of a Helm template: `$ns` (the namespace matcher) by one, anything
/// else by a duration; `{{-` trims the blanks before it, as Helm does.
fn untemplate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find("}}").unwrap();
        let action = &rest[open + 2..close];
        if action.starts_with('-') {
            out.truncate(out.trim_end().len());
        }
        out.push_str(if action.contains("$ns") {
            "namespace=\"cachevol\""
        } else {
            "1h"
        });
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn every_alert_asks_for_series_cachevol_exports() {
    let exported = Exported::new();
    let rules = rule_expressions();
    for (alert, expr) in &rules {
        check(&exported, expr, None, &format!("alert {alert}"));
    }
    // The alerts issue 25 asks for, each on the series that tell it.
    for (alert, needle) in [
        ("CachevolCachesStale", "cachevol_commits_total"),
        ("CachevolCommitsFailing", "outcome=~\"failed|refused\""),
        ("CachevolCommitsFenced", "outcome=\"fenced\""),
        (
            "CachevolBaseBudgetPressure",
            "cachevol_node_base_evictions_total{namespace=\"cachevol\",reason=\"budget\"}",
        ),
        ("CachevolLockWaitLong", "cachevol_lock_waiting_pods"),
        ("CachevolStoreErrors", "cachevol_store_request_errors_total"),
    ] {
        let (_, expr) = rules
            .iter()
            .find(|(a, _)| a == alert)
            .unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(expr.contains(needle), "{alert}: {expr}");
    }
}

#[test]
fn the_scanner_sees_what_it_checks() {
    // The checks above are only as good as the scan: a wrong name, label or value must fail.
    let exported = Exported::new();
    for (expr, legend, needle) in [
        ("rate(cachevol_comits_total[5m])", None, "not a metric"),
        (
            "cachevol_commits_total{outcome=\"fencd\"}",
            None,
            "not a value",
        ),
        ("cachevol_commits_total{outcom=\"fenced\"}", None, "no label"),
        (
            "sum by (outcom) (cachevol_commits_total)",
            None,
            "a label none",
        ),
        (
            "histogram_quantile(0.9, sum by (op) (rate(cachevol_store_request_duration_seconds_bucket[5m])))",
            None,
            "grouped by le",
        ),
        (
            "sum by (outcome) (cachevol_commits_total)",
            Some("{{level}}"),
            "legend",
        ),
    ] {
        let e = std::panic::catch_unwind(|| check(&exported, expr, legend, "test"))
            .expect_err(expr);
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(msg.contains(needle), "{expr}: {msg}");
    }
    check(
        &exported,
        "sum by (le, op) (rate(cachevol_store_request_duration_seconds_bucket{namespace=~\"$namespace\",op=~\"get|put\"}[5m]))",
        Some("{{op}}"),
        "test",
    );
}
