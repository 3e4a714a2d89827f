//! SIGINT and SIGTERM during an upload (`cachevol commit`, the commit phase of `cachevol run`)
//! and SIGTERM while `run`'s command runs: the process stops within seconds with 130 or 143 and
//! one line saying nothing was committed, the cache keeps its generation, no in-flight marker
//! or temporary file is left, and the next commit is generation 2 as usual. The upload is made
//! slow with `CACHEVOL_FAULT=slow-upload` (the `fault-injection` feature).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::{kill_process, kill_process_group, Pid, Signal};

struct Setup {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    url: String,
    state: PathBuf,
    dir: PathBuf,
    payload: PathBuf,
}

impl Setup {
    /// A shell command that changes the directory by the payload (for `run`, which restores
    /// the directory before its command).
    fn change(&self) -> String {
        format!(
            "cp -R '{}' '{}'",
            self.payload.display(),
            self.dir.join("big").display()
        )
    }

    /// Changes the directory by the payload now (for `commit`).
    fn changed(&self) -> &Self {
        let out = Command::new("sh")
            .arg("-c")
            .arg(self.change())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        self
    }
}

/// A store whose key `k` has generation 1 (the directory `dir`), and 40 MiB of incompressible
/// data beside it (`payload`): five packs to upload, 3 s each under slow-upload.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (url, state, dir) = (
        file_url(&store),
        tmp.path().join("state"),
        tmp.path().join("work"),
    );
    write(&dir.join("a.txt"), b"generation one\n");
    let out = cachevol(&url, &state, &[], &["commit", "k", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let payload = tmp.path().join("payload");
    for i in 0..5 {
        write(&payload.join(format!("{i}.bin")), &noise(100 + i, 8 << 20));
    }
    Setup {
        payload,
        _tmp: tmp,
        store,
        url,
        state,
        dir,
    }
}

fn cachevol(url: &str, state: &Path, global: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachevol"));
    cmd.arg("--store")
        .arg(url)
        .arg("--state-dir")
        .arg(state)
        .args(global)
        .args(args)
        .env_remove("CACHEVOL_FAULT")
        .env_remove("CACHEVOL_IO_CONCURRENCY");
    cmd
}

/// Starts a slow commit in a process group of its own (so a signal to the group reaches it
/// and the children it has, as a terminal's Ctrl-C does, and not this test).
fn spawn_slow(mut cmd: Command) -> (Child, mpsc::Receiver<String>) {
    use std::os::unix::process::CommandExt;
    cmd.env("CACHEVOL_FAULT", "slow-upload")
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.map(Result::unwrap) {
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn packs(s: &Setup) -> usize {
    files_under(&s.store.join("default/packs")).len()
}

fn generations(s: &Setup) -> Vec<u64> {
    let mut g: Vec<u64> = files_under(&s.store.join("default/manifests/k"))
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    g.sort();
    g
}

fn head_hint(s: &Setup) -> u64 {
    let data = std::fs::read(s.store.join("default/heads/k")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
    v["generation"].as_u64().unwrap()
}

/// Waits until the slow upload has written at least one pack (so the commit is in the middle
/// of its upload, with more to go) and returns the lines read from stderr so far.
fn wait_mid_upload(s: &Setup, before: usize, child: &mut Child, rx: &mpsc::Receiver<String>) {
    let t0 = Instant::now();
    let mut slow = false;
    loop {
        while let Ok(line) = rx.try_recv() {
            slow |= line.contains("CACHEVOL_FAULT=slow-upload");
        }
        if slow && packs(s) > before {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("cachevol ended before the test could signal it: {st:?}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the upload never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most `limit`) for the process to end; its exit code, stdout and stderr.
fn wait_exit(
    mut child: Child,
    rx: mpsc::Receiver<String>,
    limit: Duration,
) -> (Option<i32>, String, String) {
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = kill_process(pid(&child), Signal::KILL);
            let _ = child.wait();
            let rest: Vec<String> = rx.try_iter().collect();
            panic!(
                "cachevol did not stop within {limit:?} of the signal:\n{}",
                rest.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    // The reader thread ends with the pipe: collect everything it read.
    let stderr: Vec<String> = rx.iter().collect();
    (status.code(), stdout, stderr.join("\n"))
}

fn pid(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32).unwrap()
}

/// What a cancelled commit must leave: generation 1 only, the head on it, no in-flight
/// marker, no temporary file; and the next commit is generation 2.
fn assert_nothing_committed_then_commit(s: &Setup) {
    assert_eq!(generations(s), vec![1], "a generation was created");
    assert_eq!(head_hint(s), 1, "the head moved");
    let markers = files_under(&s.store.join("default/inflight"));
    assert!(markers.is_empty(), "in-flight marker left: {markers:?}");
    // object_store's local store writes `<name>#<n>` and renames it; none may be left.
    let temps: Vec<PathBuf> = files_under(&s.store)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains('#'))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");

    let out = cachevol(
        &s.url,
        &s.state,
        &[],
        &["commit", "k", s.dir.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("committed generation 2"), "{stdout}");
    assert_eq!(generations(s), vec![1, 2]);
    assert_eq!(head_hint(s), 2);
}

#[test]
fn sigterm_to_cachevol_alone_cancels_a_commit_mid_upload() {
    let s = setup();
    s.changed();
    let before = packs(&s);
    let (mut child, rx) = spawn_slow(cachevol(
        &s.url,
        &s.state,
        &[],
        &["commit", "k", s.dir.to_str().unwrap()],
    ));
    wait_mid_upload(&s, before, &mut child, &rx);
    kill_process(pid(&child), Signal::TERM).unwrap();
    let (code, _, stderr) = wait_exit(child, rx, Duration::from_secs(5));
    assert_eq!(code, Some(143), "{stderr}");
    assert!(
        stderr.contains(
            "cachevol: error: commit of \"k\" cancelled by SIGTERM: nothing was committed"
        ),
        "{stderr}"
    );
    // Packs written before the signal stay, for GC after its grace (nothing references them).
    assert!(packs(&s) > before);
    assert_nothing_committed_then_commit(&s);
}

#[test]
fn ctrl_c_to_the_process_group_cancels_runs_commit_mid_upload() {
    let s = setup();
    let before = packs(&s);
    let cache = format!("k={}", s.dir.display());
    let (mut child, rx) = spawn_slow(cachevol(
        &s.url,
        &s.state,
        &[],
        &["run", "--cache", &cache, "--", "sh", "-c", &s.change()],
    ));
    wait_mid_upload(&s, before, &mut child, &rx);
    // A terminal's Ctrl-C: SIGINT to the whole foreground process group.
    kill_process_group(pid(&child), Signal::INT).unwrap();
    let (code, _, stderr) = wait_exit(child, rx, Duration::from_secs(5));
    assert_eq!(code, Some(130), "{stderr}");
    assert!(
        stderr.contains("commit of \"k\" cancelled by SIGINT: nothing was committed"),
        "{stderr}"
    );
    assert_nothing_committed_then_commit(&s);
}

#[test]
fn sigint_with_json_reports_the_cancel_as_an_error_object() {
    let s = setup();
    s.changed();
    let before = packs(&s);
    let (mut child, rx) = spawn_slow(cachevol(
        &s.url,
        &s.state,
        &["--json"],
        &["commit", "k", s.dir.to_str().unwrap()],
    ));
    wait_mid_upload(&s, before, &mut child, &rx);
    kill_process(pid(&child), Signal::INT).unwrap();
    let (code, stdout, stderr) = wait_exit(child, rx, Duration::from_secs(5));
    assert_eq!(code, Some(130), "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(line["command"], "commit");
    assert_eq!(line["exit_code"], 130);
    assert!(
        line["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled by SIGINT"),
        "{line}"
    );
    assert_nothing_committed_then_commit(&s);
}

#[test]
fn sigterm_while_runs_command_runs_is_passed_on_and_nothing_is_committed() {
    let s = setup();
    let cache = format!("k={}", s.dir.display());
    let mut cmd = cachevol(
        &s.url,
        &s.state,
        &[],
        &[
            "run",
            "--commit-on",
            "always",
            "--cache",
            &cache,
            "--",
            "sh",
            "-c",
            &format!("{}; echo command-started >&2; exec sleep 60", s.change()),
        ],
    );
    cmd.env_remove("CACHEVOL_FAULT");
    let (mut child, rx) = {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        (child, rx)
    };
    let t0 = Instant::now();
    let mut seen = Vec::new();
    // The whole line: cachevol's own "running sh -c '...'" line names it too.
    while !seen.iter().any(|l: &String| l == "command-started") {
        seen.extend(rx.recv_timeout(Duration::from_secs(60)).ok());
        assert!(t0.elapsed() < Duration::from_secs(60), "{seen:?}");
        assert!(child.try_wait().unwrap().is_none(), "{seen:?}");
    }
    // To cachevol alone: the command (sleep) only ends if cachevol passes it on.
    kill_process(pid(&child), Signal::TERM).unwrap();
    let (code, stdout, stderr) = wait_exit(child, rx, Duration::from_secs(5));
    assert_eq!(code, Some(143), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("k: not committed: cachevol got SIGTERM while the command ran"),
        "{stdout}"
    );
    assert_nothing_committed_then_commit(&s);
}
