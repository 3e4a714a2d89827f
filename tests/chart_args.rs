//! The chart and the binary agree: the arguments `manifests/install.yaml` (the chart rendered
//! with its default values, kept in step by .ci/chart-check) gives the cachevol containers are
//! ones `cachevol` accepts, and so are those of the render with every value set that
//! .ci/chart-check leaves in target/chart-check (flags such as `--base-budget` appear only
//! there). A renamed flag would otherwise only show as pods crash-looping. And the chart's
//! appVersion, which is the image tag it installs by default, is this crate's version.

use std::process::Command;

mod common;

use serde::Deserialize;

/// (workload kind, container args) of every container named `cachevol` in a rendered chart.
fn cachevol_containers(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let containers = &v["spec"]["template"]["spec"]["containers"];
        for c in containers.as_sequence().into_iter().flatten() {
            if c["name"].as_str() == Some("cachevol") {
                let args = c["args"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                out.push((kind.clone(), args));
            }
        }
    }
    out
}

#[test]
fn the_chart_installs_this_version() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/cachevol/Chart.yaml");
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // A release that bumps one and not the other would install an image of another version.
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "{path}: appVersion is not the crate's version (Cargo.toml)"
    );
}

#[test]
fn every_flag_the_chart_passes_is_one_the_binary_accepts() {
    let root = env!("CARGO_MANIFEST_DIR");
    accepted(&std::fs::read_to_string(format!("{root}/manifests/install.yaml")).unwrap());
}

#[test]
fn every_flag_of_the_chart_with_every_value_set_is_accepted() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/chart-check/everything-on.yaml"
    );
    match std::fs::read_to_string(path) {
        Ok(text) => {
            for flag in [
                "--base-budget",
                "--copy-views",
                "--scope-budget",
                "--log-format=json",
            ] {
                assert!(text.contains(flag), "{flag} is not in {path}");
            }
            accepted(&text);
        }
        // CI runs .ci/chart-check first; without it there is nothing to read.
        Err(e) => {
            common::required::<()>(
                "every_flag_of_the_chart_with_every_value_set_is_accepted",
                None,
                &format!("{path}: {e}"),
                common::Provider::CiRun(".ci/run runs .ci/chart-check first, which writes it"),
            );
        }
    }
}

/// Every cachevol container of the rendered chart `text` starts with its arguments.
fn accepted(text: &str) {
    let found = cachevol_containers(text);
    let kinds: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["DaemonSet", "Deployment"], "{found:?}");
    for (kind, args) in found {
        // Kubernetes expands $(VAR) from the container's env; any value parses the same.
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("$(NODE_NAME)", "node-1")
                    .replace("$(POD_NAMESPACE)", "cachevol")
            })
            .collect();
        assert!(!args.iter().any(|a| a.contains("$(")), "{kind}: {args:?}");
        // clap parses every argument (and its value) before it acts on --help.
        let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{kind}: cachevol {args:?} is refused:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
