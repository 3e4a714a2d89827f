//! The `cachevol` binary as a CI step uses it: exit codes, policies, commit-on, and locked runs
//! serialized on one machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cachevol"));
        c.arg("--store")
            .arg(format!("file://{}", self.root.join("store").display()))
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .env_remove("CACHEVOL_STORE")
            .env_remove("CACHEVOL_SCOPE");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every JSON line of stdout as it is.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The reports of stdout's JSON lines: a result's fields (under the command's name), or a
/// failure whole (tests/cli_json.rs checks the envelope).
fn json(out: &Output) -> Vec<serde_json::Value> {
    json_lines(out)
        .into_iter()
        .map(|v| match v["command"].as_str() {
            Some(c) if v["ok"] == true => v[c].clone(),
            _ => v,
        })
        .collect()
}

#[test]
fn run_exits_with_the_command_status_and_commits_only_successes() {
    let env = Env::new();
    let d = env.dir("c");
    let cache = format!("npm={}", s(&d));
    let write = format!("echo one > {}/a", s(&d));

    // A failing command: not committed (commit-on success), its status is ours.
    let out = env.run(&[
        "run",
        "--cache",
        &cache,
        "--",
        "sh",
        "-c",
        &format!("{write}; exit 7"),
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not committed"));
    assert_eq!(
        env.run(&["show", "npm"]).status.code(),
        Some(3),
        "nothing committed yet"
    );

    // commit-on always commits the failed run.
    let out = env.run(&[
        "run",
        "--commit-on",
        "always",
        "--cache",
        &cache,
        "--",
        "sh",
        "-c",
        &format!("{write}; exit 3"),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let out = env.run(&["--json", "show", "npm", "--summary"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)[0]["generation"]["generation"], 1);

    // policy pull never commits, even a success.
    std::fs::remove_dir_all(&d).unwrap();
    let out = env.run(&[
        "run",
        "--policy",
        "pull",
        "--cache",
        &cache,
        "--",
        "sh",
        "-c",
        &format!("cat {}/a && echo two > {}/b", s(&d), s(&d)),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("one"),
        "restored before the command"
    );
    let out = env.run(&["--json", "ls"]);
    assert_eq!(json(&out)[0]["caches"][0]["newest"], 1);

    // A command that cannot start: 127, and nothing committed.
    let out = env.run(&["run", "--cache", &cache, "--", "/nonexistent/cmd"]);
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let env = Env::new();
    let d = env.dir("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f"), vec![7u8; 4096]).unwrap();
    // Bad key: usage.
    assert_eq!(env.run(&["commit", "../etc", s(&d)]).status.code(), Some(2));
    // Unknown cache: not found.
    assert_eq!(env.run(&["show", "nope"]).status.code(), Some(3));
    assert_eq!(
        env.run(&["rollback", "nope", "--to", "1"]).status.code(),
        Some(3)
    );
    // Over budget: refused, and nothing was written.
    let out = env.run(&["commit", "--budget", "1K", "k", s(&d)]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("over its budget"));
    assert_eq!(env.run(&["show", "k"]).status.code(), Some(3));
    // Locked mode needs a local store.
    let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
        .args([
            "--store",
            "s3://bucket/p",
            "--state-dir",
            s(&env.dir("st")),
            "run",
            "--mode",
            "locked",
            "--cache",
            &format!("k={}", s(&d)),
            "--",
            "true",
        ])
        .env("AWS_REGION", "us-east-1")
        // Credentials, so that the store opens and the refusal is the mode's.
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("file:// store"));
    // A corrupt generation: exit 5.
    assert_eq!(env.run(&["commit", "k", s(&d)]).status.code(), Some(0));
    let gen = env
        .root
        .join("store/default/manifests/k/00000000000000000001");
    let mut bytes = std::fs::read(&gen).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&gen, bytes).unwrap();
    let out = env.run(&["restore", "k", s(&env.dir("r"))]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("digest"));
}

#[test]
fn locked_runs_on_one_machine_take_turns_and_see_each_others_writes() {
    let env = Env::new();
    let script = |tag: &str, dir: &Path| {
        // Each run appends its tag to a log that must hold the earlier run's line.
        format!(
            "cat {0}/log 2>/dev/null; echo {tag} >> {0}/log; sleep 1.5",
            s(dir)
        )
    };
    let (a, b) = (env.dir("a"), env.dir("b"));
    let started = Instant::now();
    let first = env
        .cmd()
        .args([
            "run",
            "--mode",
            "locked",
            "--cache",
            &format!("k={}", s(&a)),
            "--",
            "sh",
            "-c",
            &script("first", &a),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first run holds the lock once its command runs: its first line is in its log.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.join("log").exists() {
        assert!(
            Instant::now() < deadline,
            "the first run never started its command"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = env
        .cmd()
        .args([
            "run",
            "--mode",
            "locked",
            "--cache",
            &format!("k={}", s(&b)),
            "--",
            "sh",
            "-c",
            &script("second", &b),
        ])
        .output()
        .unwrap();
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success() && second.status.success(),
        "{first:?} {second:?}"
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("waiting for the lock"),
        "the second run says it waits: {second:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the runs did not overlap"
    );
    // The second run restored the first run's commit: its log holds both lines.
    assert_eq!(
        std::fs::read_to_string(b.join("log")).unwrap(),
        "first\nsecond\n"
    );
    let out = env.run(&["--json", "ls"]);
    assert_eq!(json(&out)[0]["caches"][0]["newest"], 2);
}

#[test]
fn restore_keys_fall_back_per_cache() {
    let env = Env::new();
    let main = env.dir("main");
    std::fs::create_dir_all(&main).unwrap();
    std::fs::write(main.join("dep"), "from main").unwrap();
    assert!(env.run(&["commit", "npm-main", s(&main)]).status.success());

    let d = env.dir("branch");
    let out = env.run(&[
        "--json",
        "run",
        "--cache",
        &format!("npm-feature={}", s(&d)),
        "--restore-key",
        "npm-feature=npm-main",
        "--",
        "sh",
        "-c",
        &format!("echo new > {}/x", s(&d)),
    ]);
    assert!(out.status.success(), "{out:?}");
    let reports = json(&out);
    assert_eq!(reports[0]["restore"]["source"]["level"], "restore-key");
    assert_eq!(reports[0]["restore"]["source"]["key"], "npm-main");
    assert_eq!(reports[1]["commit"]["key"], "npm-feature");
    assert_eq!(
        reports[1]["commit"]["new_chunks"], 2,
        "only the new file's chunk and a manifest chunk: {reports:?}"
    );
    assert_eq!(std::fs::read_to_string(d.join("dep")).unwrap(), "from main");
}

#[test]
fn a_restore_killed_half_way_is_never_committed_and_is_redone_whole() {
    let env = Env::new();
    let src = env.dir("src");
    for i in 0..200 {
        let d = src.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), format!("file {i}").repeat(100)).unwrap();
    }
    assert!(env.run(&["commit", "k", s(&src)]).status.success());
    let dst = env.dir("dst");
    assert!(env.run(&["restore", "k", s(&dst)]).status.success());

    // Simulate a restore that died after marking the directory: its marker is left behind and
    // the directory holds a mix (here: one file changed, one extra).
    let canonical = std::fs::canonicalize(&dst).unwrap();
    let id = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    let marker = env.root.join(format!("state/dirs/{}.restoring", &id[..32]));
    assert!(
        marker.with_extension("state").exists(),
        "the record of dst is where we look"
    );
    std::fs::write(&marker, "x").unwrap();
    std::fs::write(dst.join("d0/f0"), "half written").unwrap();
    std::fs::write(dst.join("stray"), "from nowhere").unwrap();

    let out = env.run(&["commit", "k", s(&dst)]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not finish"));

    let out = env.run(&["restore", "k", s(&dst)]);
    assert!(out.status.success(), "{out:?}");
    assert!(!dst.join("stray").exists(), "the partial tree was cleared");
    assert_eq!(
        std::fs::read(dst.join("d0/f0")).unwrap(),
        std::fs::read(src.join("d0/f0")).unwrap()
    );
    let out = env.run(&["--json", "commit", "k", s(&dst)]);
    assert_eq!(json(&out)[0]["commit"]["outcome"], "unchanged", "{out:?}");
}

#[test]
fn wipe_deletes_a_cache_only_when_asked_to() {
    let env = Env::new();
    let d = env.dir("c");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("a"), b"a").unwrap();
    let p = env.dir("p");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("b"), b"b").unwrap();
    assert!(env.run(&["commit", "npm", s(&d)]).status.success());
    assert!(env.run(&["commit", "pip", s(&p)]).status.success());
    let out = env.run(&["wipe", "npm"]);
    assert_eq!(out.status.code(), Some(2), "without --yes nothing happens");
    assert!(env.run(&["show", "npm", "--summary"]).status.success());
    let out = env.run(&["--json", "wipe", "npm", "--yes"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)[0]["generations_deleted"], 1);
    assert_eq!(env.run(&["show", "npm"]).status.code(), Some(3));
    assert_eq!(env.run(&["wipe", "npm", "--yes"]).status.code(), Some(3));
    assert!(
        env.run(&["show", "pip", "--summary"]).status.success(),
        "other keys stay"
    );
    // Restoring a wiped key starts empty.
    let r = env.dir("r");
    assert!(env.run(&["restore", "npm", s(&r)]).status.success());
    assert!(!r.join("a").exists());
}

// A run restored from a restore key that changes nothing still creates its own key (a
// generation object over the restore key's chunks, nothing packed), so the next run hits it.
#[test]
fn a_restore_key_fallback_creates_the_key_even_unchanged() {
    let env = Env::new();
    let main = env.dir("main");
    std::fs::create_dir_all(&main).unwrap();
    std::fs::write(main.join("dep"), "from main").unwrap();
    assert!(env.run(&["commit", "npm-main", s(&main)]).status.success());

    let d = env.dir("branch");
    let run = || {
        env.run(&[
            "--json",
            "run",
            "--cache",
            &format!("npm-feature={}", s(&d)),
            "--restore-key",
            "npm-feature=npm-main",
            "--",
            "true",
        ])
    };
    let out = run();
    assert!(out.status.success(), "{out:?}");
    let reports = json(&out);
    assert_eq!(reports[0]["restore"]["source"]["level"], "restore-key");
    let commit = &reports[1]["commit"];
    assert_eq!(commit["outcome"], "committed", "{reports:?}");
    assert_eq!(commit["generation"], 1);
    assert_eq!(commit["restore_key"], "npm-main");
    assert_eq!(commit["new_chunks"], 0, "nothing packed: {reports:?}");
    let text = env.run(&[
        "run",
        "--cache",
        &format!("npm-other={}", s(&env.dir("other"))),
        "--restore-key",
        "npm-main",
        "--",
        "true",
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("created key npm-other from restore key npm-main"),
        "{text}"
    );

    // The next run restores the key itself, and unchanged it writes nothing more.
    let out = run();
    let reports = json(&out);
    assert_eq!(
        reports[0]["restore"]["source"]["level"], "key",
        "{reports:?}"
    );
    assert_eq!(reports[0]["restore"]["source"]["key"], "npm-feature");
    assert_eq!(reports[1]["commit"]["outcome"], "unchanged", "{reports:?}");
    assert_eq!(std::fs::read_to_string(d.join("dep")).unwrap(), "from main");
}

// commit-on marker: only a run that created .cachevol-commit commits, whatever its status; the
// marker is never part of a snapshot and a stale one never decides a later run.
#[test]
fn commit_on_marker_commits_only_marked_runs() {
    let env = Env::new();
    let d = env.dir("c");
    let cache = format!("gl={}", s(&d));
    let marker = d.join(".cachevol-commit");
    let run = |script: &str| {
        env.run(&[
            "run",
            "--commit-on",
            "marker",
            "--cache",
            &cache,
            "--",
            "sh",
            "-c",
            script,
        ])
    };

    // Succeeded without a marker (an actions-runner-controller runner): not committed.
    let out = run(&format!("echo a > {}/a", s(&d)));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("not committed") && text.contains(".cachevol-commit"),
        "{text}"
    );
    assert_eq!(env.run(&["show", "gl"]).status.code(), Some(3));

    // Marked, then failed (Jenkins: post { success } ran, then a later stage failed): committed,
    // and the run's status is still the command's.
    let out = run(&format!(
        "echo b > {}/built-by-jenkins; touch {}; exit 3",
        s(&d),
        s(&marker)
    ));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!marker.exists(), "the marker is removed once it decided");
    let show = env.run(&["show", "gl"]);
    let listing = String::from_utf8_lossy(&show.stdout);
    assert!(listing.contains("built-by-jenkins"), "{listing}");
    assert!(!listing.contains(".cachevol-commit"), "{listing}");

    // A marker left behind by hand does not decide the next run, and is never restored.
    std::fs::write(&marker, "stale").unwrap();
    let out = run(&format!("test ! -e {} && echo c > {}/c", s(&marker), s(&d)));
    assert!(
        out.status.success(),
        "the stale marker was removed first: {out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("not committed"));
    let fresh = env.dir("fresh");
    assert!(env.run(&["restore", "gl", s(&fresh)]).status.success());
    assert!(fresh.join("built-by-jenkins").exists() && !fresh.join("c").exists());
    assert!(!fresh.join(".cachevol-commit").exists());
}

// `cachevol show KEY | head -3`: the reader goes away after three lines; cachevol ends quietly
// (status 0, no panic) instead of exiting 101 with a backtrace hint.
#[test]
fn a_closed_pipe_ends_show_quietly() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let d = env.dir("many");
    std::fs::create_dir_all(&d).unwrap();
    // ~3000 lines of listing, far more than a pipe buffer holds.
    for i in 0..3000 {
        std::fs::write(
            d.join(format!("a-rather-long-file-name-to-fill-the-pipe-{i:05}")),
            "",
        )
        .unwrap();
    }
    assert!(env.run(&["commit", "npm", s(&d)]).status.success());
    let mut child = env
        .cmd()
        .args(["show", "npm"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        lines.next().unwrap().unwrap();
    }
    drop(lines);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// A store URL without a scheme is a local directory only when it is an absolute path:
// `s3:/b` or `bucket/prefix` are refused (exit 2) before anything is created.
#[test]
fn store_urls_that_are_neither_urls_nor_absolute_paths_are_refused() {
    let env = Env::new();
    let cwd = env.dir("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    for bad in ["s3:/b", "bucket/prefix", "store", "s3:///prefix"] {
        for args in [&["ls"][..], &["restore", "k", "out"][..]] {
            let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
                .current_dir(&cwd)
                .args(["--store", bad, "--state-dir", s(&env.dir("st"))])
                .args(args)
                .env_remove("CACHEVOL_STORE")
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{bad} {args:?}: {out:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("invalid store URL"), "{bad}: {stderr}");
        }
        let left: Vec<_> = std::fs::read_dir(&cwd).unwrap().collect();
        assert!(left.is_empty(), "{bad} created {left:?}");
    }
    // file:// and an absolute path are stores.
    for good in [
        format!("file://{}", s(&env.dir("s1"))),
        s(&env.dir("s2")).to_string(),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .args(["--store", &good, "--state-dir", s(&env.dir("st")), "ls"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{good}: {out:?}");
    }
}

// `--restore-key npm-` matches the most recently committed key that starts with `npm-` when no
// key is exactly `npm-`; a key of exactly that name wins over any prefix match, and restore
// keys are tried in the order given.
#[test]
fn restore_keys_match_by_prefix_most_recent_first_exact_first() {
    let env = Env::new();
    let commit = |key: &str, content: &str| {
        let d = env.dir(&format!("src-{key}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("from"), content).unwrap();
        let out = env.run(&["commit", key, s(&d)]);
        assert!(out.status.success(), "{out:?}");
    };
    let restore = |restore_keys: &[&str]| {
        let d = env.dir("dst");
        let _ = std::fs::remove_dir_all(&d);
        let mut args = vec!["--json", "restore", "npm-feature", s(&d)];
        for k in restore_keys {
            args.extend(["--restore-key", k]);
        }
        let out = env.run(&args);
        assert!(out.status.success(), "{out:?}");
        let r = json(&out).remove(0);
        (
            r["restore"]["source"]["key"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            std::fs::read_to_string(d.join("from")).unwrap_or_default(),
        )
    };
    commit("npm-main", "main");
    // "Most recent" is by the store's clock: the next commit comes once that clock has moved
    // past the last one (on this file:// store, file mtimes; a tie would fall to the name).
    store_clock_moves_past(&env);
    commit("npm-release", "release");
    assert_eq!(
        restore(&["npm-"]),
        ("npm-release".into(), "release".into()),
        "the most recent of the keys starting with npm-"
    );
    store_clock_moves_past(&env);
    commit("npm-main", "main 2");
    assert_eq!(restore(&["npm-"]), ("npm-main".into(), "main 2".into()));
    // An exact match wins over a prefix match, whatever their ages.
    commit("npm-", "exact");
    store_clock_moves_past(&env);
    commit("npm-zzz", "newer");
    assert_eq!(restore(&["npm-"]), ("npm-".into(), "exact".into()));
    // In order: the first restore key that matches anything decides.
    assert_eq!(
        restore(&["pip-", "npm-rel", "npm-"]),
        ("npm-release".into(), "release".into())
    );
    // Nothing starts with it: a miss.
    let d = env.dir("none");
    let out = env.run(&["--json", "restore", "x", s(&d), "--restore-key", "pip-"]);
    assert_eq!(json(&out)[0]["restore"]["source"]["level"], "miss");
}

// Every --json line is one object with "command" and "version"; show names no manifest refs.
#[test]
fn json_reports_share_one_shape() {
    let env = Env::new();
    let d = env.dir("c");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("a"), "a").unwrap();
    for (args, command) in [
        (vec!["--json", "commit", "k", s(&d)], "commit"),
        (vec!["--json", "restore", "k", s(&d)], "restore"),
        (vec!["--json", "ls"], "ls"),
        (vec!["--json", "show", "k"], "show"),
        (vec!["--json", "verify", "k"], "verify"),
        (vec!["--json", "show", "nope"], "show"),
    ] {
        let out = env.run(&args);
        let lines = json_lines(&out);
        assert_eq!(lines.len(), 1, "{args:?}: {out:?}");
        assert_eq!(lines[0]["command"], command, "{args:?}");
        assert_eq!(lines[0]["version"], 1, "{args:?}");
        assert_eq!(lines[0]["ok"], out.status.success(), "{args:?}");
    }
    let show = json(&env.run(&["--json", "show", "k"])).remove(0);
    assert_eq!(show["generation"]["totals"]["files"], 1);
    assert!(show["generation"].get("manifest").is_none(), "{show}");
    assert!(show["generation"].get("manifest_hash").is_none(), "{show}");
}

// Scripts learn the hit level: `hit` (key, restore-key, miss) and `cache_hit` in --json, and
// `cache-hit=true|false` appended to $GITHUB_OUTPUT (true only for the key itself).
#[test]
fn restore_reports_the_hit_level_and_writes_github_output() {
    let env = Env::new();
    let src = env.dir("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), "a").unwrap();
    assert!(env.run(&["commit", "npm-main", s(&src)]).status.success());
    let gh = env.dir("github_output");
    std::fs::write(&gh, "earlier=kept\n").unwrap();
    let restore = |key: &str, extra: &[&str]| {
        let d = env.dir(&format!("dst-{key}"));
        let out = env
            .cmd()
            .args(["--json", "restore", key, s(&d), "--restore-key"])
            .arg(if key.starts_with("npm") {
                "npm-"
            } else {
                "pip-"
            })
            .args(extra)
            .env("GITHUB_OUTPUT", &gh)
            .output()
            .unwrap();
        (out, d)
    };
    for (key, level, hit) in [
        ("npm-main", "key", true),
        ("npm-feature", "restore-key", false),
        ("pip", "miss", false),
    ] {
        std::fs::write(&gh, "earlier=kept\n").unwrap();
        let (out, _) = restore(key, &[]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let r = json(&out).remove(0);
        assert_eq!(r["hit"], level, "{key}: {r}");
        assert_eq!(r["cache_hit"], hit, "{key}: {r}");
        let written = std::fs::read_to_string(&gh).unwrap();
        assert!(written.starts_with("earlier=kept\n"), "appended: {written}");
        assert!(
            written.contains(&format!("cache-hit={hit}\n")),
            "{key}: {written}"
        );
    }
    // --lookup-only says what would come and writes nothing.
    std::fs::remove_dir_all(env.dir("dst-npm-feature")).unwrap();
    let (out, d) = restore("npm-feature", &["--lookup-only"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = json(&out).remove(0);
    assert_eq!(r["hit"], "restore-key");
    assert_eq!(r["matched_key"], "npm-main");
    assert_eq!(r["generation"], 1);
    assert!(!d.join("a").exists() && !d.exists(), "nothing restored");
    // --fail-on-miss: exit 3 on a miss only.
    let (out, _) = restore("pip", &["--fail-on-miss"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let r = json(&out).remove(0);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"]["kind"], "miss", "{r}");
    assert_eq!(r["restore"]["hit"], "miss", "{r}");
    assert!(r["restore"].get("lookup_only").is_none(), "{r}");
    let (out, d) = restore("npm-feature", &["--fail-on-miss"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(d.join("a").exists());
}

// run: the same hit levels, GITHUB_OUTPUT, --lookup-only (the command does not run) and
// --fail-on-miss (exit 3 before the command runs).
#[test]
fn run_reports_hits_and_can_fail_on_a_miss() {
    let env = Env::new();
    let src = env.dir("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), "a").unwrap();
    assert!(env.run(&["commit", "npm", s(&src)]).status.success());
    let gh = env.dir("gh");
    let ran = env.dir("ran");
    let run = |caches: &[&str], extra: &[&str]| {
        let _ = std::fs::remove_file(&gh);
        let _ = std::fs::remove_file(&ran);
        let mut c = env.cmd();
        c.arg("--json").arg("run").args(extra);
        for cache in caches {
            c.arg("--cache")
                .arg(format!("{cache}={}", s(&env.dir(&format!("d-{cache}")))));
        }
        c.args(["--", "touch", s(&ran)])
            .env("GITHUB_OUTPUT", &gh)
            .output()
            .unwrap()
    };
    let out = run(&["npm"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json(&out)[0]["hit"], "key");
    let gh_text = std::fs::read_to_string(&gh).unwrap();
    assert!(gh_text.contains("cache-hit=true\n"), "{gh_text}");
    assert!(gh_text.contains("cache-hit-npm=true\n"), "{gh_text}");

    let out = run(&["npm", "pip"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let gh_text = std::fs::read_to_string(&gh).unwrap();
    assert!(
        gh_text.contains("cache-hit=false\n"),
        "one missed: {gh_text}"
    );
    assert!(gh_text.contains("cache-hit-pip=false\n"), "{gh_text}");

    let out = run(&["npm", "cargo"], &["--fail-on-miss"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!ran.exists(), "the command did not run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cargo"));

    let out = run(&["npm"], &["--lookup-only"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!ran.exists(), "the command did not run");
    let r = json(&out);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["lookup_only"], true);
    assert_eq!(r[0]["generation"], 1);
}

// run --json: stdout holds only cachevol's JSON lines (every one parses); the command's stdout
// goes to stderr. Without --json, the command's stdout is ours.
#[test]
fn run_json_keeps_stdout_parseable() {
    let env = Env::new();
    let d = env.dir("c");
    let cache = format!("k={}", s(&d));
    let out = env.run(&[
        "--json",
        "run",
        "--cache",
        &cache,
        "--",
        "sh",
        "-c",
        "echo hello from the command; echo and its stderr >&2",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["command"] == "run" && l["version"] == 1 && l["ok"] == true));
    assert_eq!(lines[0]["run"]["hit"], "miss");
    assert_eq!(lines.last().unwrap()["run"]["exit_code"], 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("hello from the command"), "{stderr}");
    assert!(stderr.contains("and its stderr"), "{stderr}");

    let out = env.run(&["run", "--cache", &cache, "--", "echo", "plain"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("plain\n"),
        "without --json the command's stdout is cachevol's: {out:?}"
    );
}

// A key that cannot be a cache key (a branch name with '/') never fails the build: the command
// runs without that cache, with a warning, and its status is the exit status.
#[test]
fn an_invalid_key_in_run_runs_the_command_uncached() {
    let env = Env::new();
    let (bad, good) = (env.dir("bad"), env.dir("good"));
    let out = env.run(&[
        "run",
        "--cache",
        &format!("npm-feature/login={}", s(&bad)),
        "--cache",
        &format!("npm={}", s(&good)),
        "--restore-key",
        "npm-release/1.0",
        "--",
        "sh",
        "-c",
        &format!(
            "mkdir -p {0} {1}; echo x > {0}/f; echo y > {1}/f; exit 5",
            s(&bad),
            s(&good)
        ),
    ]);
    assert_eq!(out.status.code(), Some(5), "the command's status: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("npm-feature/login"),
        "{stderr}"
    );
    assert!(stderr.contains("without this cache"), "{stderr}");
    assert!(stderr.contains("restore key ignored"), "{stderr}");
    assert!(bad.join("f").exists(), "the command ran");
    // With success, the valid cache commits and the invalid one does not.
    let out = env.run(&[
        "--json",
        "run",
        "--cache",
        &format!("feature/x={}", s(&bad)),
        "--cache",
        &format!("npm={}", s(&good)),
        "--",
        "sh",
        "-c",
        &format!("echo z > {0}/f; echo z > {1}/f", s(&bad), s(&good)),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = env.run(&["--json", "ls"]);
    let caches = &json(&out)[0]["caches"];
    assert_eq!(caches.as_array().unwrap().len(), 1, "{caches} {out:?}");
    assert_eq!(caches[0]["key"], "npm");
}

// Small things a user reads: "1 file" (not "1 files"), and without $USER the writer is the
// user's name from /etc/passwd, not "uid0".
#[test]
fn one_file_is_one_file_and_the_writer_has_a_name() {
    let env = Env::new();
    let d = env.dir("c");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("a"), "a").unwrap();
    let out = env
        .cmd()
        .args(["commit", "k", s(&d)])
        .env_remove("USER")
        .env_remove("LOGNAME")
        .env_remove("CACHEVOL_WRITER")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": 1 file, "), "{text}");
    assert!(!text.contains("1 files"), "{text}");
    let show = env.run(&["show", "k"]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("contents:    1 file, "), "{text}");
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let uid = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    let name = passwd
        .lines()
        .find(|l| l.split(':').nth(2).and_then(|u| u.parse().ok()) == uid.as_ref().ok().copied())
        .and_then(|l| l.split(':').next())
        .expect("the test user has a passwd entry");
    let show = json(&env.run(&["--json", "show", "k"])).remove(0);
    let writer = show["generation"]["provenance"]["writer"].as_str().unwrap();
    assert!(writer.starts_with(&format!("{name}@")), "{writer}");
}

// Help: the global options under their own heading; the daemons do not offer the CLI-only
// ones; every positional and the generation flags say what they are; --version names a commit.
#[test]
fn help_separates_global_options_and_describes_every_argument() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let top = help(&["--help"]);
    let (own, global) = top.split_once("Global options:").expect("a heading");
    assert!(!own.contains("--store") && global.contains("--store") && global.contains("--json"));
    for daemon in ["node", "controller"] {
        let text = help(&[daemon, "--help"]);
        for cli_only in ["--json", "--quiet", "--scope <"] {
            assert!(
                !text.contains(cli_only),
                "{daemon} offers {cli_only}: {text}"
            );
        }
        assert!(text.contains("--store"), "{text}");
    }
    assert!(!help(&["controller", "--help"]).contains("No Kubernetes API"));
    for (args, needles) in [
        (
            &["restore", "--help"][..],
            &["<KEY> The cache key", "<DIR> The directory"][..],
        ),
        (
            &["commit", "--help"],
            &["<KEY> The cache key", "<DIR> The directory"],
        ),
        (
            &["show", "--help"],
            &["--generation <GENERATION> The generation"],
        ),
        (
            &["verify", "--help"],
            &["--generation <GENERATION> The generation"],
        ),
        (&["rollback", "--help"], &["--to <TO> The generation"]),
        (&["restore", "--help"], &["--lookup-only", "--fail-on-miss"]),
    ] {
        // Short or long layout: compare with whitespace collapsed.
        let text = help(args).split_whitespace().collect::<Vec<_>>().join(" ");
        for n in needles {
            assert!(text.contains(n), "{args:?} lacks {n:?}: {text}");
        }
    }
    let version = help(&["--version"]);
    assert!(version.contains("(commit "), "{version}");
}

// In a CI log (stderr no terminal) a long restore or commit prints plain progress lines naming
// the cache, every CACHEVOL_PROGRESS_INTERVAL seconds (here: every step), then a final line.
#[test]
fn progress_in_a_ci_log_is_plain_lines_naming_the_cache() {
    let env = Env::new();
    let d = env.dir("big");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..4u8 {
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|j| (j.wrapping_mul(2654435761) >> 13) as u8 ^ i)
            .collect();
        std::fs::write(d.join(format!("f{i}")), data).unwrap();
    }
    let out = env
        .cmd()
        .args(["commit", "big", s(&d)])
        .env("CACHEVOL_PROGRESS_INTERVAL", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("cachevol: big: commit "))
        .collect();
    assert!(lines.len() >= 2, "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("%") && l.contains("/s") && l.contains(" / 4 files")),
        "{stderr}"
    );
    assert!(
        lines.last().unwrap().contains("done: 4.0 MiB, 4 files"),
        "{stderr}"
    );
    assert!(!stderr.contains('\x1b'), "no terminal codes: {stderr:?}");
    let out = env
        .cmd()
        .args(["restore", "big", s(&env.dir("r"))])
        .env("CACHEVOL_PROGRESS_INTERVAL", "0")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cachevol: big: restore done: 4.0 MiB, 4 files"),
        "{out:?}"
    );
    // --quiet: none.
    let out = env
        .cmd()
        .args(["-q", "commit", "big", s(&d)])
        .env("CACHEVOL_PROGRESS_INTERVAL", "0")
        .output()
        .unwrap();
    assert!(out.stderr.is_empty(), "{out:?}");
}

/// The benchmark's measuring wrapper (`cachevol __bench-child USAGE PROGRAM ARGS...`): the
/// wait status, CPU time and peak RSS of the one command it runs — that command's own, not the
/// largest of every command the benchmark ran before it.
#[test]
#[cfg(feature = "bench")] // the benchmark is in the binary only with the feature
fn bench_child_reports_each_commands_own_peak_rss_and_status() {
    let env = Env::new();
    std::fs::create_dir_all(&env.root).unwrap();
    let measure = |name: &str, script: &str| -> Vec<f64> {
        let usage = env.dir(name);
        let out = Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .args(["__bench-child", s(&usage), "sh", "-c", script])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(&usage)
            .unwrap()
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect()
    };
    // dd fills a 128 MiB buffer from /dev/zero: its peak RSS is at least that.
    let big = measure(
        "big",
        "dd if=/dev/zero of=/dev/null bs=128M count=1 2>/dev/null",
    );
    let (status, cpu, rss_kib, secs) = (big[0], big[1], big[2], big[3]);
    assert_eq!(status, 0.0);
    assert!(rss_kib >= 128.0 * 1024.0, "peak {rss_kib} KiB");
    assert!(cpu >= 0.0 && secs > 0.0, "{big:?}");
    // A small command measured next reports its own peak, far below.
    let small = measure("small", "exit 3");
    assert_eq!(small[0], f64::from(3 << 8), "the raw wait status of exit 3");
    assert!(small[2] < 32.0 * 1024.0, "peak {} KiB", small[2]);
}

/// Returns once a file written now on the store's file system gets a later mtime than every
/// object of the store (mtimes tick with the kernel's coarse clock): what is committed next is
/// strictly more recent, by the clock the restore-key match reads, than what is there.
fn store_clock_moves_past(env: &Env) {
    fn newest(dir: &Path) -> std::time::SystemTime {
        let mut t = std::time::UNIX_EPOCH;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            t = t.max(if m.is_dir() {
                newest(&e.path())
            } else {
                m.modified().unwrap()
            });
        }
        t
    }
    let last = newest(&env.dir("store"));
    let probe = env.dir(".clock");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::fs::write(&probe, b"").unwrap();
        if std::fs::metadata(&probe).unwrap().modified().unwrap() > last {
            break;
        }
        assert!(Instant::now() < deadline, "the store's clock does not move");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::remove_file(&probe).unwrap();
}

/// `cachevol bench --node` on a small tree: every figure of the fresh node column is there
/// (publish as an image against `zstd -d | tar -x`, and with every file read once), the JSON
/// line is an object like every other, and no mount of its nodes is left behind.
#[test]
#[cfg(feature = "bench")] // the benchmark is in the binary only with the feature
fn bench_node_measures_a_fresh_node_against_extract_and_leaves_no_mount() {
    if !rustix::process::geteuid().is_root() {
        return; // needs mounts
    }
    let env = Env::new();
    let tree = env.dir("tree");
    for i in 0..40 {
        let d = tree.join(format!("pkg{}", i % 7));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("f{i}.js")),
            format!("module {i}\n").repeat(50),
        )
        .unwrap();
    }
    let work = env.dir("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = env.run(&[
        "--json",
        "bench",
        "--node",
        "--runs",
        "1",
        "--work-dir",
        s(&work),
        s(&tree),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json_lines(&out).last().expect("a JSON line")["command"],
        "bench"
    );
    let lines = json(&out);
    let report = lines.last().expect("a JSON line");
    let row = &report["trees"][0];
    assert_eq!(row["files"], 40);
    for field in [
        "extract_s",
        "extract_read_s",
        "fresh_publish_s",
        "fresh_read_s",
        "publish_cold_s",
        "publish_warm_s",
    ] {
        let v = row[field].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0, "{field} = {v} in {row}");
    }
    assert!(row["fresh_rss_added_mib"].as_f64().is_some(), "{row}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(s(&work)),
        "mounts left under the work dir:\n{mounts}"
    );
}

// `{hashFiles:GLOB}` in a key: the key committed is the expanded one (the digest of the lock
// files, the same from another directory holding the same files via --files-root), a restore
// with the same placeholder hits it, and a glob matching nothing is exit 2 naming the glob.
#[test]
fn keys_from_files_are_expanded_before_anything_is_committed() {
    let env = Env::new();
    let app = env.dir("app");
    std::fs::create_dir_all(app.join("web")).unwrap();
    std::fs::write(app.join("package-lock.json"), "root").unwrap();
    std::fs::write(app.join("web/package-lock.json"), "web").unwrap();
    let d = env.dir("npm");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f"), "cached").unwrap();
    let key = "npm-{hashFiles:**/package-lock.json}";
    let out = env
        .cmd()
        .args(["--json", "commit", key, s(&d)])
        .current_dir(&app)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let caches = json(&env.run(&["--json", "ls"]))[0].clone();
    let caches = caches
        .pointer("/ls/caches")
        .or_else(|| caches.get("caches"))
        .unwrap()
        .clone();
    let committed = caches[0]["key"].as_str().unwrap().to_string();
    assert!(
        committed.starts_with("npm-") && committed.len() == 4 + 32 && !committed.contains('{'),
        "{committed}"
    );
    // The same files elsewhere, named by --files-root from another working directory.
    let copy = env.dir("copy");
    std::fs::create_dir_all(copy.join("web")).unwrap();
    std::fs::write(copy.join("web/package-lock.json"), "web").unwrap();
    std::fs::write(copy.join("package-lock.json"), "root").unwrap();
    let r = env.dir("r");
    let out = env
        .cmd()
        .args(["restore", "--files-root", s(&copy), key, s(&r)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::read_to_string(r.join("f")).unwrap(), "cached");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&committed),
        "{out:?}"
    );
    // One changed byte: another key, a miss.
    std::fs::write(copy.join("web/package-lock.json"), "web!").unwrap();
    let out = env
        .cmd()
        .args(["run", "--files-root", s(&copy), "--fail-on-miss"])
        .args(["--cache", &format!("{key}={}", s(&env.dir("r2")))])
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // A glob that matches nothing: exit 2, naming it, before anything is restored or run.
    let ran = env.dir("ran");
    let out = env
        .cmd()
        .args(["run", "--cache"])
        .arg(format!(
            "cargo-{{hashFiles:Cargo.lock}}={}",
            s(&env.dir("c"))
        ))
        .args(["--", "touch", s(&ran)])
        .current_dir(&app)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"Cargo.lock\""),
        "{out:?}"
    );
    assert!(!ran.exists() && !env.dir("c").exists());
    let out = env
        .cmd()
        .args([
            "restore",
            "k",
            s(&r),
            "--restore-key",
            "k-{hashFiles:nope/*}",
        ])
        .current_dir(&app)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope/*"),
        "{out:?}"
    );
}

// actions/cache's outputs cache-primary-key (the key, expanded) and cache-matched-key (the key
// restored from, empty on a miss): in the text, in --json and in $GITHUB_OUTPUT, for restore
// and for run (unsuffixed with one cache, and per cache by the key as written).
#[test]
fn restore_and_run_report_the_primary_and_the_matched_key() {
    let env = Env::new();
    let src = env.dir("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), "a").unwrap();
    std::fs::write(src.join("go.sum"), "sum").unwrap();
    assert!(env.run(&["commit", "npm-main", s(&src)]).status.success());
    let gh = env.dir("gh");
    let outputs = || -> std::collections::HashMap<String, String> {
        std::fs::read_to_string(&gh)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for (key, matched) in [
        ("npm-main", "npm-main"),
        ("npm-feature", "npm-main"),
        ("pip", ""),
    ] {
        let _ = std::fs::remove_file(&gh);
        let d = env.dir(&format!("d-{key}"));
        let rk = if key.starts_with("npm") {
            "npm-"
        } else {
            "pip-"
        };
        let out = env
            .cmd()
            .args(["restore", key, s(&d), "--restore-key", rk])
            .env("GITHUB_OUTPUT", &gh)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!(
                "cache-primary-key={key} cache-matched-key={matched}\n"
            )),
            "{text}"
        );
        let o = outputs();
        assert_eq!(o["cache-primary-key"], key, "{o:?}");
        assert_eq!(o["cache-matched-key"], matched, "{o:?}");
        let out = env
            .cmd()
            .args(["--json", "restore", key, s(&d), "--restore-key", rk])
            .output()
            .unwrap();
        let r = json(&out).remove(0);
        let r = r
            .get("restore")
            .filter(|r| r.get("hit").is_some())
            .unwrap_or(&r);
        assert_eq!(r["cache_primary_key"], key, "{r}");
        let want = if matched.is_empty() {
            serde_json::Value::Null
        } else {
            matched.into()
        };
        assert_eq!(r["cache_matched_key"], want, "{r}");
    }

    // A cache's own files never key it: a root that is the cache itself hashes nothing.
    let refused = env
        .cmd()
        .args(["commit", "go-{hashFiles:go.sum}", s(&src)])
        .current_dir(&src)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("outside the caches' own directories"),
        "{refused:?}"
    );
    // run: one cache whose key comes from a file; the outputs name the expanded key, and the
    // per-cache ones the key as written without its placeholder.
    let lock = env.dir("lock");
    std::fs::create_dir_all(&lock).unwrap();
    std::fs::write(lock.join("go.sum"), "sum").unwrap();
    let out = env
        .cmd()
        .args([
            "commit",
            "--files-root",
            s(&lock),
            "go-{hashFiles:go.sum}",
            s(&src),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let _ = std::fs::remove_file(&gh);
    let out = env
        .cmd()
        .args(["--json", "run", "--files-root", s(&lock), "--cache"])
        .arg(format!("go-{{hashFiles:go.sum}}={}", s(&env.dir("go"))))
        .args(["--", "true"])
        .env("GITHUB_OUTPUT", &gh)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let o = outputs();
    let primary = &o["cache-primary-key"];
    assert!(
        primary.starts_with("go-") && primary.len() == 3 + 32,
        "{o:?}"
    );
    assert_eq!(&o["cache-matched-key"], primary, "a hit of the key itself");
    assert_eq!(o["cache-hit-go"], "true", "{o:?}");
    assert_eq!(&o["cache-primary-key-go"], primary, "{o:?}");
    let r = json(&out).remove(0);
    let r = r.get("run").unwrap_or(&r);
    assert_eq!(&r["cache_primary_key"], primary.as_str(), "{r}");
    // Two caches, one a miss: no unsuffixed key outputs, an empty matched key for the miss.
    let _ = std::fs::remove_file(&gh);
    let out = env
        .cmd()
        .args(["run", "--cache"])
        .arg(format!("npm-main={}", s(&env.dir("n"))))
        .arg("--cache")
        .arg(format!("pip={}", s(&env.dir("p"))))
        .args(["--", "true"])
        .env("GITHUB_OUTPUT", &gh)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let o = outputs();
    assert!(!o.contains_key("cache-primary-key"), "{o:?}");
    assert_eq!(o["cache-matched-key-npm-main"], "npm-main", "{o:?}");
    assert_eq!(o["cache-matched-key-pip"], "", "{o:?}");
    assert_eq!(o["cache-primary-key-pip"], "pip", "{o:?}");
}

// Each cache its own directory: two keys on one directory (however spelled), a directory
// inside another cache's, or one key with two directories (one cache holding several paths is
// not supported yet) are exit 2 before anything is restored or run.
#[test]
fn caches_that_share_a_directory_are_refused_before_anything_is_restored() {
    let env = Env::new();
    let src = env.dir("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), "a").unwrap();
    assert!(env.run(&["commit", "npm", s(&src)]).status.success());
    let ran = env.dir("ran");
    let run = |caches: &[(&str, PathBuf)]| {
        let mut c = env.cmd();
        c.arg("run");
        for (key, dir) in caches {
            c.arg("--cache").arg(format!("{key}={}", s(dir)));
        }
        c.args(["--", "touch", s(&ran)]).output().unwrap()
    };
    let (npm, other) = (env.dir("npm"), env.dir("other"));
    for (caches, needles) in [
        (
            vec![("npm", npm.clone()), ("yarn", env.dir("x/../npm/."))],
            &["npm and yarn", "same directory"][..],
        ),
        (
            vec![("pip", npm.join("sub/pip")), ("npm", npm.clone())],
            &["cache pip", "inside", "cache npm"],
        ),
        (
            vec![("npm", npm.clone()), ("npm", other.clone())],
            &["two directories", "not supported yet"],
        ),
        (
            vec![("npm", npm.clone()), ("npm", npm.clone())],
            &["given twice"],
        ),
    ] {
        let out = run(&caches);
        assert_eq!(out.status.code(), Some(2), "{caches:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for n in needles {
            assert!(stderr.contains(n), "{caches:?}: {stderr}");
        }
        assert!(!ran.exists(), "the command did not run");
        assert!(!npm.exists() && !other.exists(), "nothing restored");
    }
    // Siblings and a shared prefix that is not a parent are fine.
    let out = run(&[("npm", npm.clone()), ("npm2", env.dir("npm2"))]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(ran.exists() && npm.join("a").exists());
}

// A miss says what it looked for (the key and the restore keys tried), and "starting empty"
// only when the directory is empty; a directory with files of its own is "kept as it was".
// One generation is "1 generation".
#[test]
fn a_miss_names_what_it_tried_and_what_the_directory_holds() {
    let env = Env::new();
    let out = env.run(&[
        "restore",
        "npm-feature",
        s(&env.dir("new")),
        "--restore-key",
        "npm-main",
        "--restore-key",
        "npm-",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "npm-feature: no snapshot of npm-feature or restore keys npm-main, npm- yet; starting empty"
        ),
        "{text}"
    );
    let full = env.dir("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("mine"), "not cachevol's").unwrap();
    let out = env.run(&["restore", "pip", s(&full)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "pip: no snapshot of pip yet; {} is kept as it was",
            s(&full)
        )),
        "{text}"
    );
    assert!(!text.contains("starting empty"), "{text}");
    assert!(full.join("mine").exists());
    let out = env.run(&[
        "restore",
        "pip",
        s(&full),
        "--fail-on-miss",
        "--restore-key",
        "pip-",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshot of pip or restore key pip-"),
        "{out:?}"
    );
    let out = env.run(&[
        "--json",
        "restore",
        "pip",
        s(&full),
        "--restore-key",
        "pip-",
    ]);
    assert_eq!(json(&out)[0]["restore_keys"], serde_json::json!(["pip-"]));

    // Singular and plural.
    let full = env.dir("other");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("f"), "f").unwrap();
    assert!(env.run(&["commit", "one", s(&full)]).status.success());
    let out = env.run(&["wipe", "one", "--yes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("one: 1 generation deleted"), "{out:?}");
    assert!(env.run(&["commit", "two", s(&full)]).status.success());
    std::fs::write(full.join("more"), "x").unwrap();
    assert!(env.run(&["commit", "two", s(&full)]).status.success());
    let out = env.run(&["wipe", "two", "--yes"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("two: 2 generations deleted"),
        "{out:?}"
    );
}

// A warm runner computes the key a fresh one did: the cache's own directory (node_modules,
// restored with its packages' lock files) is not hashed, so the second run hits the key the
// first one committed.
#[test]
fn a_keys_files_never_include_its_caches_own_directory() {
    let env = Env::new();
    let app = env.dir("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("package-lock.json"), "lock").unwrap();
    let run = || {
        env.cmd()
            .args(["--json", "run", "--cache"])
            .arg("npm-{hashFiles:**/package-lock.json}=node_modules")
            .args([
                "--",
                "sh",
                "-c",
                "mkdir -p node_modules/p && echo own > node_modules/p/package-lock.json",
            ])
            .current_dir(&app)
            .output()
            .unwrap()
    };
    let first = run();
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    assert_eq!(json(&first)[0]["hit"], "miss");
    assert!(app.join("node_modules/p/package-lock.json").exists());
    let second = run();
    assert_eq!(second.status.code(), Some(0), "{second:?}");
    assert_eq!(json(&second)[0]["hit"], "key", "{second:?}");
    assert_eq!(
        json(&first)[0]["cache_primary_key"],
        json(&second)[0]["cache_primary_key"]
    );
}
