//! The examples under `examples/` are what users copy into their CI: every cachevol volume in
//! them — CSI inline `volumeAttributes` (GitLab's `volume_attributes`), claims and claim
//! templates of the chart's StorageClass with their `cachevol.dev/*` annotations, StorageClass
//! parameters — goes through the driver's own parser (`VolumeSpec`, as CreateVolume and
//! NodePublishVolume read them), and what comes out is the mode and commit-on the example means;
//! a claim's access modes are ones CreateVolume accepts.
//! A cache committed on a marker is marked somewhere in its example, at its mount path. Every
//! example is linked from the README. The hand-written examples under `manifests/` are parsed
//! the same way. Kubernetes schema validation of the same files is .ci/chart-check's.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use cachevol::engine::MARKER;
use cachevol::spec::{param, parse_size, user, CommitOn, Mode, VolumeSpec};
use serde::Deserialize;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The store the node plugin and the controller are given (any valid URL parses the same).
const STORE: &str = "s3://ci-caches/cluster-a";
/// The namespace the examples' pods and claims are taken to run in.
const NAMESPACE: &str = "ci";

/// The caches of one example as (key, mode, commit-on), in the order [`walk`] finds them.
type Caches = &'static [(&'static str, Mode, CommitOn)];

/// What each example means its caches to be. A file under examples/ that is neither here nor in
/// [`COMPANIONS`] fails the test: say what it means.
const INTENT: &[(&str, Caches)] = &[
    (
        "github-actions-runner-scale-set.yaml",
        &[("runner-tool-cache", Mode::Private, CommitOn::Marker)],
    ),
    (
        "gitlab-runner-config.toml",
        &[("npm", Mode::Private, CommitOn::Marker)],
    ),
    (
        "jenkins-pod-template.yaml",
        &[("maven", Mode::Private, CommitOn::Marker)],
    ),
    (
        "tekton-task.yaml",
        &[("go", Mode::Private, CommitOn::Success)],
    ),
    (
        "argo-workflow.yaml",
        &[("pip", Mode::Private, CommitOn::Success)],
    ),
];

/// Files that belong to another example and carry what it leaves out: (file, companion). The
/// GitLab job file writes the marker of the runner's volume.
const COMPANIONS: &[(&str, &str)] = &[("gitlab-runner-config.toml", "gitlab-ci.yml")];

/// The chart's defaults the examples rely on: the driver's name and its StorageClass.
struct Chart {
    driver: String,
    class: String,
    /// The class's parameters as the chart renders them (empty values left out).
    parameters: HashMap<String, String>,
}

fn chart() -> Chart {
    let path = format!("{ROOT}/charts/cachevol/values.yaml");
    let v: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let s = |v: &Value| {
        v.as_str()
            .unwrap_or_else(|| panic!("{path}: {v}"))
            .to_string()
    };
    let parameters = v["storageClass"]["parameters"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.as_str().is_some_and(|s| !s.is_empty()))
        .map(|(k, v)| (k.clone(), s(v)))
        .collect();
    Chart {
        driver: s(&v["driver"]["name"]),
        class: s(&v["storageClass"]["name"]),
        parameters,
    }
}

/// One file's documents as JSON values: YAML (every document) or TOML.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.display();
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => serde_yaml::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{name}: {e}")))
            .filter(|v| !v.is_null())
            .collect(),
        Some("toml") => {
            let doc: toml_edit::DocumentMut =
                text.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
            vec![toml_table(doc.as_table().iter())]
        }
        _ => panic!("{name}: an example is YAML or TOML"),
    }
}

fn toml_table<'a>(entries: impl Iterator<Item = (&'a str, &'a toml_edit::Item)>) -> Value {
    Value::Object(
        entries
            .map(|(k, v)| (k.to_string(), toml_item(v)))
            .collect(),
    )
}

fn toml_item(item: &toml_edit::Item) -> Value {
    use toml_edit::Item;
    match item {
        Item::None => Value::Null,
        Item::Value(v) => toml_value(v),
        Item::Table(t) => toml_table(t.iter()),
        Item::ArrayOfTables(a) => Value::Array(a.iter().map(|t| toml_table(t.iter())).collect()),
    }
}

fn toml_value(v: &toml_edit::Value) -> Value {
    use toml_edit::Value as T;
    match v {
        T::String(s) => Value::String(s.value().clone()),
        T::Integer(i) => Value::from(*i.value()),
        T::Float(f) => Value::from(*f.value()),
        T::Boolean(b) => Value::from(*b.value()),
        T::Datetime(d) => Value::String(d.value().to_string()),
        T::Array(a) => Value::Array(a.iter().map(toml_value).collect()),
        T::InlineTable(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), toml_value(v)))
                .collect(),
        ),
    }
}

/// A cachevol volume found in an example, parsed as the driver parses it.
struct Found {
    /// The volume's (or workspace's) name, which mounts refer to.
    name: Option<String>,
    /// Where in the file: inline, claim or class.
    what: &'static str,
    spec: VolumeSpec,
}

/// String values of a map (annotations, attributes, parameters); a value of another type is an
/// error, as the API server's (annotations, volumeAttributes) or csi-provisioner's would be.
fn strings(v: &Value, where_: &str) -> BTreeMap<String, String> {
    match v {
        Value::Null => BTreeMap::new(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k.clone(), s.clone()),
                other => panic!("{where_}: {k} is {other}, not a string: quote it"),
            })
            .collect(),
        other => panic!("{where_}: {other} is not a map"),
    }
}

/// Every cachevol volume anywhere in `v`, with the name of the nearest enclosing object that has
/// one (a pod volume, a Tekton workspace binding, a GitLab volume table).
fn walk(v: &Value, name: Option<&str>, chart: &Chart, where_: &str, out: &mut Vec<Found>) {
    match v {
        Value::Array(items) => {
            for i in items {
                walk(i, name, chart, where_, out);
            }
        }
        Value::Object(m) => {
            let name = m.get("name").and_then(Value::as_str).or(name);
            let at = format!("{where_} ({})", name.unwrap_or("?"));
            if m.get("driver").and_then(Value::as_str) == Some(chart.driver.as_str()) {
                let attrs = m
                    .get("volumeAttributes")
                    .or_else(|| m.get("volume_attributes"))
                    .unwrap_or(&Value::Null);
                out.push(Found {
                    name: name.map(str::to_string),
                    what: "inline volume",
                    spec: inline(&strings(attrs, &at), &at),
                });
            }
            let ours = v["spec"]["storageClassName"].as_str() == Some(chart.class.as_str());
            let annotated = v["metadata"]["annotations"]
                .as_object()
                .is_some_and(|a| a.keys().any(|k| k.starts_with(user::ANNOTATION_PREFIX)));
            // Settings on a claim of another class (or of the default one) are never read.
            assert!(
                ours || !annotated,
                "{at}: a claim with {}* annotations must name storageClassName {}",
                user::ANNOTATION_PREFIX,
                chart.class
            );
            if ours {
                capabilities(&v["spec"], &at);
                let storage = v["spec"]["resources"]["requests"]["storage"].as_str();
                let annotations = strings(&v["metadata"]["annotations"], &at);
                out.push(Found {
                    name: name.map(str::to_string),
                    what: "claim",
                    spec: claim(&chart.parameters, &annotations, storage, &at),
                });
            }
            if v["kind"] == "StorageClass" && v["provisioner"] == chart.driver.as_str() {
                let params: HashMap<String, String> =
                    strings(&v["parameters"], &at).into_iter().collect();
                out.push(Found {
                    name: name.map(str::to_string),
                    what: "StorageClass",
                    spec: claim(&params, &BTreeMap::new(), None, &at),
                });
            }
            for child in m.values() {
                walk(child, name, chart, where_, out);
            }
        }
        _ => {}
    }
}

/// A claim's access modes and volume mode, as csi-provisioner turns them into the
/// CreateVolume capabilities, are ones the driver serves.
fn capabilities(spec: &Value, at: &str) {
    use cachevol::csi::pb::volume_capability::{access_mode, AccessMode, AccessType};
    use cachevol::csi::pb::volume_capability::{BlockVolume, MountVolume};
    use cachevol::csi::pb::VolumeCapability;
    let modes = spec["accessModes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    assert!(!modes.is_empty(), "{at}: a claim needs accessModes");
    let access_type = match spec["volumeMode"].as_str().unwrap_or("Filesystem") {
        "Block" => AccessType::Block(BlockVolume::default()),
        _ => AccessType::Mount(MountVolume::default()),
    };
    for m in modes {
        let mode = match m.as_str() {
            Some("ReadWriteOnce") => access_mode::Mode::SingleNodeWriter,
            Some("ReadWriteOncePod") => access_mode::Mode::SingleNodeSingleWriter,
            Some("ReadOnlyMany") => access_mode::Mode::MultiNodeReaderOnly,
            Some("ReadWriteMany") => access_mode::Mode::MultiNodeMultiWriter,
            other => panic!("{at}: {other:?} is no Kubernetes access mode"),
        };
        let cap = VolumeCapability {
            access_type: Some(access_type.clone()),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        };
        if let Err(e) = cachevol::csi::capability::check(&cap) {
            panic!("{at}: CreateVolume refuses the claim's {m}: {e}");
        }
    }
}

/// An inline volume as NodePublishVolume reads it: the pod's attributes with kubelet's pod
/// info beside them, on the node plugin's store.
fn inline(attrs: &BTreeMap<String, String>, at: &str) -> VolumeSpec {
    let mut ctx: HashMap<String, String> = attrs.clone().into_iter().collect();
    ctx.insert(user::EPHEMERAL.into(), "true".into());
    ctx.insert(user::POD_NAMESPACE.into(), NAMESPACE.into());
    ctx.insert(user::POD_NAME.into(), "job-1".into());
    let spec = VolumeSpec::from_publish(&ctx, Some(STORE))
        .unwrap_or_else(|e| panic!("{at}: the node plugin refuses the inline volume: {e}"));
    assert_eq!(spec.scope, NAMESPACE, "{at}: an inline volume's scope");
    spec
}

/// A claim as CreateVolume builds it (the class's parameters with csi-provisioner's claim
/// metadata, then the claim's annotations) and as the node reads the context back.
fn claim(
    class: &HashMap<String, String>,
    annotations: &BTreeMap<String, String>,
    storage: Option<&str>,
    at: &str,
) -> VolumeSpec {
    let mut params = class.clone();
    params.insert(param::PVC_NAME.into(), "runner-abc12-cache".into());
    params.insert(param::PVC_NAMESPACE.into(), NAMESPACE.into());
    let budget =
        storage.map(|s| parse_size(s).unwrap_or_else(|e| panic!("{at}: storage {s:?}: {e}")));
    let mut spec = VolumeSpec::from_parameters(&params, STORE, budget)
        .unwrap_or_else(|e| panic!("{at}: CreateVolume refuses the class: {e}"));
    spec.apply_annotations(annotations)
        .unwrap_or_else(|e| panic!("{at}: CreateVolume refuses the claim's annotations: {e}"));
    let ctx: HashMap<String, String> = spec.to_context().into_iter().collect();
    let back = VolumeSpec::from_publish(&ctx, Some(STORE))
        .unwrap_or_else(|e| panic!("{at}: the node plugin refuses the volume context: {e}"));
    assert_eq!(back, spec, "{at}: the node reads back another volume");
    spec
}

fn found_in(docs: &[Value], chart: &Chart, where_: &str) -> Vec<Found> {
    let mut out = Vec::new();
    for d in docs {
        walk(d, None, chart, where_, &mut out);
    }
    out
}

fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(format!("{ROOT}/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples under examples/");
    files
}

fn file_name(p: &Path) -> &str {
    p.file_name().unwrap().to_str().unwrap()
}

/// Every object of `docs` with a `name` and a mount path (`mountPath`, GitLab's `mount_path`):
/// container volume mounts, Tekton workspace declarations, GitLab volume tables.
fn mount_paths(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| mount_paths(i, out)),
        Value::Object(m) => {
            let path = m.get("mountPath").or_else(|| m.get("mount_path"));
            if let (Some(Value::String(n)), Some(Value::String(p))) = (m.get("name"), path) {
                out.push((n.clone(), p.clone()));
            }
            m.values().for_each(|c| mount_paths(c, out));
        }
        _ => {}
    }
}

/// Environment variables set in `docs`: objects with a string `name` and a string `value`.
fn env_vars(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| env_vars(i, out)),
        Value::Object(m) => {
            if let (Some(Value::String(n)), Some(Value::String(val))) =
                (m.get("name"), m.get("value"))
            {
                out.push((n.clone(), val.clone()));
            }
            m.values().for_each(|c| env_vars(c, out));
        }
        _ => {}
    }
}

#[test]
fn every_example_cache_parses_as_the_driver_reads_it_and_means_what_it_says() {
    let chart = chart();
    let companions: Vec<&str> = COMPANIONS.iter().map(|(_, c)| *c).collect();
    for path in example_files() {
        let file = file_name(&path);
        if companions.contains(&file) {
            continue;
        }
        let intent = INTENT
            .iter()
            .find(|(f, _)| *f == file)
            .unwrap_or_else(|| {
                panic!("examples/{file}: not in INTENT of tests/examples.rs; say what it means")
            })
            .1;
        let docs = documents(&path);
        let found = found_in(&docs, &chart, &format!("examples/{file}"));
        let got: Vec<(&str, Mode, CommitOn)> = found
            .iter()
            .map(|f| (f.spec.key.as_str(), f.spec.mode, f.spec.commit_on))
            .collect();
        assert_eq!(
            got, intent,
            "examples/{file}: the caches as the driver reads them"
        );

        // A cache committed on a marker is marked: `<mount path>/.cachevol-commit`, or the
        // same through an environment variable that holds the mount path, in the example or
        // its companion.
        let mut text = std::fs::read_to_string(&path).unwrap();
        let mut all = docs.clone();
        for (_, companion) in COMPANIONS.iter().filter(|(f, _)| *f == file) {
            let c = path.with_file_name(companion);
            text.push_str(&std::fs::read_to_string(&c).unwrap());
            all.extend(documents(&c));
        }
        let (mut mounts, mut env) = (Vec::new(), Vec::new());
        all.iter().for_each(|d| mount_paths(d, &mut mounts));
        all.iter().for_each(|d| env_vars(d, &mut env));
        for f in found
            .iter()
            .filter(|f| f.spec.commit_on == CommitOn::Marker)
        {
            let name = f.name.as_deref().unwrap();
            let paths: Vec<&String> = mounts
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, p)| p)
                .collect();
            assert!(
                !paths.is_empty(),
                "examples/{file}: {name} is never mounted"
            );
            let mut spellings: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
            for (var, value) in &env {
                if paths.contains(&value) {
                    spellings.push(format!("${var}"));
                    spellings.push(format!("${{{var}}}"));
                }
            }
            assert!(
                spellings
                    .iter()
                    .any(|s| text.contains(&format!("{s}/{MARKER}"))),
                "examples/{file}: the {} {name} commits on a marker, but nothing writes \
                 {MARKER} at its root ({spellings:?})",
                f.what
            );
        }
    }
}

#[test]
fn every_example_is_linked_from_the_readme() {
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    for path in example_files() {
        let link = format!("](examples/{})", file_name(&path));
        assert!(
            readme.contains(&link),
            "README.md has no link to examples/{} (\"Use it from your CI\")",
            file_name(&path)
        );
    }
}

#[test]
fn the_manifests_caches_parse_as_the_driver_reads_them() {
    let chart = chart();
    let mut n = 0;
    for entry in std::fs::read_dir(format!("{ROOT}/manifests")).unwrap() {
        let path = entry.unwrap().path();
        // The rendered chart is .ci/chart-check's and tests/chart_args.rs's.
        if path.extension().and_then(|e| e.to_str()) != Some("yaml")
            || file_name(&path) == "install.yaml"
        {
            continue;
        }
        let where_ = format!("manifests/{}", file_name(&path));
        n += found_in(&documents(&path), &chart, &where_).len();
    }
    // claims.yaml, ephemeral.yaml and storageclass.yaml declare caches.
    assert!(n >= 3, "only {n} cachevol volumes under manifests/");
}

/// The GitLab job's after_script line, run by a real shell with the cache's mount path moved
/// into a temporary directory: it writes the marker after a successful job only, and exits 0
/// whatever the status (a failing after_script line only adds a warning to the job log, but an
/// example should not produce one).
#[test]
fn the_gitlab_job_marks_its_cache_only_when_it_succeeded() {
    let chart = chart();
    let dir = format!("{ROOT}/examples");
    let config = documents(Path::new(&format!("{dir}/gitlab-runner-config.toml")));
    let found = found_in(&config, &chart, "gitlab-runner-config.toml");
    let mut mounts = Vec::new();
    config.iter().for_each(|d| mount_paths(d, &mut mounts));
    let jobs = documents(Path::new(&format!("{dir}/gitlab-ci.yml")));
    let mut lines = Vec::new();
    for (name, job) in jobs[0].as_object().unwrap() {
        for line in job["after_script"].as_array().into_iter().flatten() {
            let line = line.as_str().unwrap();
            if line.contains(MARKER) {
                lines.push((name.clone(), line.to_string()));
            }
        }
    }
    assert!(
        !lines.is_empty(),
        "gitlab-ci.yml: no after_script writes {MARKER}"
    );
    for f in found
        .iter()
        .filter(|f| f.spec.commit_on == CommitOn::Marker)
    {
        let name = f.name.as_deref().unwrap();
        let (_, mount) = mounts.iter().find(|(n, _)| n == name).unwrap();
        let (job, line) = lines
            .iter()
            .find(|(_, l)| l.contains(&format!("{mount}/{MARKER}")))
            .unwrap_or_else(|| panic!("gitlab-ci.yml: no after_script marks {mount}"));
        for (status, marked) in [("success", true), ("failed", false), ("canceled", false)] {
            let tmp = tempfile::tempdir().unwrap();
            let line = line.replace(mount.as_str(), tmp.path().to_str().unwrap());
            let out = Command::new("sh")
                .args(["-c", &line])
                .env("CI_JOB_STATUS", status)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{job}: `{line}` with CI_JOB_STATUS={status}: {out:?}"
            );
            assert_eq!(
                tmp.path().join(MARKER).exists(),
                marked,
                "{job}: `{line}` with CI_JOB_STATUS={status}"
            );
        }
    }
}
