//! The daemons' logs as a log pipeline reads them: stderr to a file (not a terminal) carries no
//! ANSI escape codes, and `--log-format json` / `CACHEVOL_LOG_FORMAT=json` write one JSON object
//! a line with the level and the message.

use std::process::{Command, Stdio};

/// Runs `cachevol node` with a bad endpoint (it logs an error and exits 2) with stderr to a
/// file; returns what it wrote there.
fn failing_node(extra: &[&str], env: &[(&str, &str)]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachevol"));
    cmd.args(["node", "--node-id", "n1", "--endpoint", "tcp://nope"])
        .arg("--state-dir")
        .arg(tmp.path())
        .args(extra)
        .env_remove("CACHEVOL_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd.status().unwrap();
    assert_eq!(status.code(), Some(2));
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn logs_to_a_file_have_no_escape_codes() {
    let text = failing_node(&[], &[]);
    assert!(text.contains("ERROR"), "{text}");
    assert!(text.contains("only unix sockets"), "{text}");
    assert!(!text.contains('\x1b'), "escape codes in {text:?}");
}

/// The JSON lines of `text` (the daemon also prints its final error as plain text).
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn log_format_json_writes_one_object_a_line() {
    for (flags, env) in [
        (&["--log-format", "json"][..], &[][..]),
        (&[][..], &[("CACHEVOL_LOG_FORMAT", "json")][..]),
    ] {
        let text = failing_node(flags, env);
        assert!(!text.contains('\x1b'), "{text:?}");
        let lines = json_lines(&text);
        let error = lines
            .iter()
            .find(|v| v["level"] == "ERROR")
            .unwrap_or_else(|| panic!("no ERROR object in {text}"));
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("only unix sockets")),
            "{error}"
        );
        assert!(error["timestamp"].is_string(), "{error}");
    }
}

#[test]
fn an_unknown_log_format_is_refused_with_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
        .args(["node", "--node-id", "n1", "--log-format", "yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("yaml"));
}
