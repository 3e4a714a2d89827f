//! `--json` as a script reads it: every subcommand, on success and on a failure, prints only
//! JSON objects on stdout, one a line, each `{"version":1,"command":C,"ok":…}` with a result's
//! fields under C, or a failure's `exit_code` (the process's status) and `error.kind` and
//! `error.message`; clap's usage errors too, while --help and --version stay text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        Env { _tmp: tmp, root }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .arg("--store")
            .arg(format!("file://{}", self.root.join("store").display()))
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .args(args)
            .env_remove("CACHEVOL_STORE")
            .env_remove("CACHEVOL_SCOPE")
            .env_remove("GITHUB_OUTPUT")
            .output()
            .unwrap()
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The JSON lines of a `--json` invocation of `command`, after checking the envelope of each:
/// stdout is nothing but objects, one a line; a failure's exit_code is the process's status,
/// and the last line is a failure exactly when the process failed.
fn reports(out: &Output, command: &str) -> Vec<Value> {
    let stdout = String::from_utf8(out.stdout.clone()).expect("UTF-8");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    assert!(!lines.is_empty(), "no report: {out:?}");
    for l in &lines {
        assert!(l.is_object(), "{l}");
        assert_eq!(l["version"], 1, "{l}");
        assert_eq!(l["command"], command, "{l}");
        match l["ok"].as_bool() {
            Some(true) => {
                assert!(l[command].is_object(), "a result under {command:?}: {l}");
                assert!(
                    l.get("error").is_none() && l.get("exit_code").is_none(),
                    "{l}"
                );
            }
            Some(false) => {
                assert_eq!(
                    l["exit_code"].as_i64(),
                    out.status.code().map(i64::from),
                    "{l}"
                );
                assert!(l["error"]["kind"].is_string(), "{l}");
                assert!(
                    !l["error"]["message"].as_str().unwrap_or("").is_empty(),
                    "{l}"
                );
            }
            None => panic!("no ok: {l}"),
        }
    }
    assert_eq!(
        lines.last().unwrap()["ok"],
        out.status.success(),
        "the last line says how it ended: {out:?}"
    );
    lines
}

/// One report, a failure of `kind` with status `code`.
fn failure(out: &Output, command: &str, code: i32, kind: &str) -> Value {
    assert_eq!(out.status.code(), Some(code), "{out:?}");
    let mut lines = reports(out, command);
    assert_eq!(lines.len(), 1, "one report: {lines:?}");
    let l = lines.remove(0);
    assert_eq!(l["error"]["kind"], kind, "{l}");
    l
}

/// One report, a result.
fn result(out: &Output, command: &str) -> Value {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut lines = reports(out, command);
    assert_eq!(lines.len(), 1, "one report: {lines:?}");
    lines.remove(0)[command].clone()
}

#[test]
fn every_subcommand_reports_one_shape_on_success_and_failure() {
    let env = Env::new();
    let d = env.dir("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f"), vec![7u8; 4096]).unwrap();

    // commit: a result, then over its budget (refused).
    let c = result(&env.run(&["--json", "commit", "k", s(&d)]), "commit");
    assert_eq!(c["commit"]["generation"], 1, "{c}");
    let f = failure(
        &env.run(&["--json", "commit", "--budget", "1K", "k", s(&d)]),
        "commit",
        4,
        "refused",
    );
    assert!(f["error"]["message"].as_str().unwrap().contains("budget"));

    // restore: a hit, then a miss with --fail-on-miss (which says what it found, not that it
    // only looked up).
    let r = result(
        &env.run(&["--json", "restore", "k", s(&env.dir("r"))]),
        "restore",
    );
    assert_eq!(r["hit"], "key", "{r}");
    assert_eq!(r["restore"]["files"], 1, "{r}");
    let f = failure(
        &env.run(&[
            "--json",
            "restore",
            "nope",
            s(&env.dir("r2")),
            "--fail-on-miss",
        ]),
        "restore",
        3,
        "miss",
    );
    assert_eq!(f["restore"]["hit"], "miss", "{f}");
    assert!(f["restore"].get("lookup_only").is_none(), "{f}");

    // ls: a result, then an unknown flag (clap's usage error).
    let l = result(&env.run(&["--json", "ls"]), "ls");
    assert_eq!(l["caches"][0]["key"], "k", "{l}");
    let f = failure(&env.run(&["--json", "ls", "--bogus"]), "ls", 2, "usage");
    assert!(
        f["error"]["message"].as_str().unwrap().contains("--bogus"),
        "{f}"
    );

    // show
    let sh = result(&env.run(&["--json", "show", "k"]), "show");
    assert_eq!(sh["generation"]["generation"], 1, "{sh}");
    failure(
        &env.run(&["--json", "show", "nope"]),
        "show",
        3,
        "not_found",
    );

    // verify (was flat)
    let v = result(&env.run(&["--json", "verify", "k"]), "verify");
    assert_eq!(v["generation"], 1, "{v}");
    assert!(v["chunks"].as_u64().unwrap() >= 1, "{v}");
    failure(
        &env.run(&["--json", "verify", "k", "--generation", "9"]),
        "verify",
        3,
        "not_found",
    );

    // rollback (was flat)
    assert!(env.run(&["commit", "k", s(&env.dir("r"))]).status.success());
    std::fs::write(d.join("g"), "second").unwrap();
    assert!(env.run(&["commit", "k", s(&d)]).status.success());
    let rb = result(
        &env.run(&["--json", "rollback", "k", "--to", "1"]),
        "rollback",
    );
    assert_eq!(rb["rollback_of"], 1, "{rb}");
    assert!(rb["generation"].as_u64().unwrap() > 1, "{rb}");
    failure(
        &env.run(&["--json", "rollback", "k", "--to", "99"]),
        "rollback",
        3,
        "not_found",
    );

    // gc: a result, then a value clap refuses.
    let g = result(&env.run(&["--json", "gc", "--dry-run"]), "gc");
    assert_eq!(g["scope"], "default", "{g}");
    assert!(g["gc"].is_object(), "{g}");
    failure(
        &env.run(&["--json", "gc", "--keep-last", "many"]),
        "gc",
        2,
        "usage",
    );

    // wipe: without --yes a usage error (was plain text), then a result.
    let f = failure(&env.run(&["--json", "wipe", "k"]), "wipe", 2, "usage");
    assert!(
        f["error"]["message"].as_str().unwrap().contains("--yes"),
        "{f}"
    );
    let w = result(&env.run(&["--json", "wipe", "k", "--yes"]), "wipe");
    assert!(w["generations_deleted"].as_u64().unwrap() >= 3, "{w}");
}

#[test]
fn run_reports_each_cache_and_ends_with_its_status() {
    let env = Env::new();
    let d = env.dir("d");
    let cache = format!("k={}", s(&d));
    // A success: the restore (a miss), the commit, the run's own report.
    let out = env.run(&[
        "--json",
        "run",
        "--cache",
        &cache,
        "--",
        "sh",
        "-c",
        &format!("mkdir -p {0}; echo x > {0}/f", s(&d)),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = reports(&out, "run");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["run"]["hit"], "miss");
    assert_eq!(lines[1]["run"]["commit"]["generation"], 1);
    assert_eq!(lines[2]["run"]["exit_code"], 0);

    // The command fails: not committed (a result), then the run's failure with its status.
    let out = env.run(&[
        "--json", "run", "--cache", &cache, "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let lines = reports(&out, "run");
    assert!(
        lines.iter().any(|l| l["run"]["skipped"].is_string()),
        "{lines:?}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["error"]["kind"], "command_failed", "{last}");
    assert_eq!(last["run"]["exit_code"], 7, "{last}");

    // A cache skipped with a warning (its key cannot be a key): said in JSON too.
    let out = env.run(&[
        "--json",
        "run",
        "--cache",
        &format!("feature/x={}", s(&env.dir("x"))),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = reports(&out, "run");
    let warning = lines
        .iter()
        .find(|l| l["run"]["warning"].is_object())
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(warning["run"]["key"], "feature/x", "{warning}");
    assert_eq!(
        warning["run"]["warning"]["kind"], "invalid_key",
        "{warning}"
    );

    // A miss with --fail-on-miss: what was found, then the failure; the command did not run.
    let ran = env.dir("ran");
    let out = env.run(&[
        "--json",
        "run",
        "--fail-on-miss",
        "--cache",
        &format!("nope={}", s(&env.dir("n"))),
        "--",
        "touch",
        s(&ran),
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let lines = reports(&out, "run");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["run"]["hit"], "miss");
    assert!(lines[0]["run"].get("lookup_only").is_none(), "{lines:?}");
    assert_eq!(lines[1]["error"]["kind"], "miss");
    assert!(!ran.exists());

    // A usage error of clap's (a cache without '=') and one of cachevol's (two caches in one
    // directory): one failure each, exit 2.
    failure(
        &env.run(&["--json", "run", "--cache", "nodir", "--", "true"]),
        "run",
        2,
        "usage",
    );
    let f = failure(
        &env.run(&[
            "--json",
            "run",
            "--cache",
            &cache,
            "--cache",
            &format!("j={}", s(&d)),
            "--",
            "true",
        ]),
        "run",
        2,
        "usage",
    );
    assert!(
        f["error"]["message"]
            .as_str()
            .unwrap()
            .contains("same directory"),
        "{f}"
    );
}

#[test]
fn usage_errors_are_json_but_help_and_version_stay_text() {
    let env = Env::new();
    // No command at all, and an unknown one: the command is null where none was named.
    for args in [&["--json"][..], &["--json", "frobnicate"]] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{out:?}");
        assert_eq!(lines[0]["ok"], false);
        assert_eq!(lines[0]["exit_code"], 2);
        assert_eq!(lines[0]["error"]["kind"], "usage");
        assert!(lines[0]["command"].is_null(), "{}", lines[0]);
        assert!(!out.stderr.is_empty(), "clap's text on stderr: {out:?}");
    }
    // A missing argument, named in the message.
    let f = failure(&env.run(&["--json", "restore", "k"]), "restore", 2, "usage");
    assert!(
        f["error"]["message"].as_str().unwrap().contains("<DIR>"),
        "{f}"
    );
    // --json given after the command is ours too; after run's `--` it is the command's.
    failure(&env.run(&["show", "--json"]), "show", 2, "usage");
    let out = env.run(&["run", "--cache", "nodir", "--", "x", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "{out:?}");
    // Without --json a usage error is text alone.
    let out = env.run(&["ls", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "{out:?}");
    for args in [
        &["--json", "--help"][..],
        &["--json", "restore", "--help"],
        &["--json", "--version"],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.trim_start().starts_with('{') && !text.is_empty(),
            "{args:?}: {text}"
        );
    }
}

// A warning is a result of its own in JSON, as on stderr: here $GITHUB_OUTPUT that cannot be
// written, which never fails the restore.
#[test]
fn warnings_are_results_too() {
    let env = Env::new();
    let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
        .arg("--store")
        .arg(format!("file://{}", env.root.join("store").display()))
        .arg("--state-dir")
        .arg(env.root.join("state"))
        .args(["--json", "restore", "k", s(&env.dir("r"))])
        .env("GITHUB_OUTPUT", env.dir("no/such/dir/out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines = reports(&out, "restore");
    assert_eq!(lines.len(), 2, "the warning, then the restore: {lines:?}");
    let w = &lines[0]["restore"]["warning"];
    assert_eq!(w["kind"], "github_output", "{w}");
    assert!(
        w["message"].as_str().unwrap().contains("GITHUB_OUTPUT"),
        "{w}"
    );
    assert_eq!(lines[1]["restore"]["hit"], "miss");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cachevol: warning: could not write GITHUB_OUTPUT"),
        "{stderr}"
    );
}
