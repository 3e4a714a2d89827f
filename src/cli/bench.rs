//! `cachevol bench`: restore and commit measured against tar+zstd on the same trees.
//!
//! For every tree, in one run and on the same copy of the tree:
//! - the baseline a user would use instead: `tar -cf - . | zstd -T0 -3` (create) and
//!   `zstd -d | tar -x` into a fresh directory (extract), and the tarball's size;
//! - ours, each step a separate child process of this very binary, so that wall time and peak
//!   RSS (from `wait4`) are per operation: the first commit into an empty `file://` store, a
//!   restore from it into a fresh directory, a commit of that directory unchanged, a commit after
//!   adding `--change-percent` (1 %) of the tree's bytes as new pseudo-random files, set against
//!   the zstd -3 size of exactly those files; and with `--s3-url` the first commit to and a
//!   restore from that S3 store.
//!
//! Every step is repeated `--runs` times and medians are reported (peak RSS: the maximum).
//! The page cache is warm (no privileges needed); `sync` runs before every timed step so that
//! one step's write-back does not land in the next. Restores and extractions go into fresh paths
//! and nothing is deleted until the end (creating a large tree right after deleting one is several
//! times slower on ext4), unless the disk is too small for that; then each run's trees are deleted
//! at the end of that run. The same holds across invocations: a large deletion (a previous
//! bench's cleanup included) slows every tree creation for minutes afterwards (ext4 skips
//! recently freed inodes), so leave a few minutes between two benches.
//!
//! A local S3 server for `--s3-url`, e.g. moto:
//! `moto_server -H 127.0.0.1 -p 5000 &`, then `AWS_ENDPOINT_URL=http://127.0.0.1:5000
//! AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1`,
//! create the bucket (`python3 -c 'import boto3; boto3.client("s3").create_bucket(Bucket="b")'`)
//! and pass `--s3-url s3://b/bench`. Objects the benchmark writes there are deleted afterwards.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::output::{human_bytes, Out};
use super::Global;
use crate::engine::{io, Error, IoError, Store};

const KEY: &str = "bench";
const MIB: f64 = 1024.0 * 1024.0;
/// The goals of issue 2.
const GOAL_RESTORE: f64 = 0.5;
const GOAL_UNCHANGED: f64 = 0.15;
const GOAL_CHANGE: f64 = 1.5;
const GOAL_RSS_MIB: f64 = 128.0;
/// New files for the change step go into this many new directories.
const NEW_DIRS: usize = 4;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Trees to measure (directories; each is copied once into the work dir and read from there).
    #[arg(required = true)]
    pub trees: Vec<PathBuf>,
    /// How many times every step is timed; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Also commit to and restore from this S3 store (s3://bucket/prefix; endpoint and credentials
    /// from the AWS_* environment). The bucket must exist.
    #[arg(long, env = "CACHEVOL_BENCH_S3_URL")]
    pub s3_url: Option<String>,
    /// Scratch space: a fresh subdirectory is made here and removed at the end (default: beside
    /// the first tree, else in the temp dir). The --store option is not used: every run gets
    /// fresh stores in this directory.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the scratch directory (trees, tarballs, stores, logs of every step).
    #[arg(long)]
    pub keep: bool,
    /// The change step adds new files totalling this percentage of the tree's bytes.
    #[arg(long, default_value_t = 1.0)]
    pub change_percent: f64,
    /// Measure the node plugin instead: a fresh node's NodePublishVolume (the base written as an
    /// EROFS image) against `zstd -d | tar -x` of the same tree, and with every file read once
    /// against the extract and the same read; the cold publish with the base as files; the
    /// warm publish; the commit of an unchanged and a 1 %-changed pod view (needs root: real
    /// mounts).
    #[arg(long)]
    pub node: bool,
}

fn failed(what: impl Into<PathBuf>, detail: impl std::fmt::Display) -> Error {
    IoError::other("benchmark", what, detail.to_string()).into()
}

/// Wall time, CPU time (user + system, with the children it waited for) and peak RSS of one
/// child process.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Sample {
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_kib: u64,
}

impl Sample {
    fn rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 * 1024.0 / MIB
    }
}

/// Files, directories, symlinks and bytes of a tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
struct Stats {
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
}

fn walk(dir: &Path, s: &mut Stats) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            s.dirs += 1;
            walk(&e.path(), s)?;
        } else if ft.is_symlink() {
            s.symlinks += 1;
        } else if ft.is_file() {
            s.files += 1;
            s.bytes += e.metadata()?.len();
        }
    }
    Ok(())
}

fn stats(dir: &Path) -> Result<Stats, Error> {
    let mut s = Stats::default();
    walk(dir, &mut s).map_err(io("walk", dir))?;
    Ok(s)
}

/// Every figure of one run on one tree.
#[derive(Clone, Debug, Default, Serialize)]
struct RunFigures {
    tar_create: Sample,
    tar_extract: Sample,
    tar_zst_bytes: u64,
    first_commit: Sample,
    first_commit_uploaded: u64,
    restore_file: Sample,
    restore_file_downloaded: u64,
    unchanged_commit: Sample,
    unchanged_commit_outcome: String,
    unchanged_commit_uploaded: u64,
    unchanged_commit_files_read: u64,
    change_new_files: u64,
    change_new_bytes: u64,
    change_new_zst_bytes: u64,
    change_commit: Sample,
    change_commit_uploaded: u64,
    change_commit_files_read: u64,
    s3_first_commit: Option<Sample>,
    s3_first_commit_uploaded: Option<u64>,
    s3_restore: Option<Sample>,
    s3_restore_downloaded: Option<u64>,
}

/// One goal of the issue, as measured.
#[derive(Clone, Debug, Serialize)]
struct Goal {
    what: String,
    /// The measured ratio (or MiB, or bytes) and the most it may be.
    value: f64,
    limit: f64,
    met: bool,
}

/// Medians over the runs (peak RSS and unchanged uploads: the maximum).
#[derive(Clone, Debug, Serialize)]
struct Summary {
    tar_create_s: f64,
    tar_extract_s: f64,
    tar_extract_cpu_s: f64,
    tar_zst_bytes: u64,
    tar_create_peak_rss_mib: f64,
    tar_extract_peak_rss_mib: f64,
    first_commit_s: f64,
    first_commit_ratio: f64,
    first_commit_uploaded: u64,
    restore_file_s: f64,
    restore_file_ratio: f64,
    restore_file_cpu_s: f64,
    restore_s3_s: Option<f64>,
    restore_s3_ratio: Option<f64>,
    s3_first_commit_s: Option<f64>,
    s3_first_commit_ratio: Option<f64>,
    unchanged_commit_s: f64,
    unchanged_commit_ratio: f64,
    unchanged_commit_uploaded_max: u64,
    change_commit_s: f64,
    change_new_bytes: u64,
    change_new_zst_bytes: u64,
    change_commit_uploaded: u64,
    change_ratio: f64,
    restore_peak_rss_mib: f64,
    commit_peak_rss_mib: f64,
    goals: Vec<Goal>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn summarize(runs: &[RunFigures]) -> Summary {
    let m = |f: &dyn Fn(&RunFigures) -> f64| median(runs.iter().map(f).collect());
    let mo = |f: &dyn Fn(&RunFigures) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let max = |f: &dyn Fn(&RunFigures) -> f64| runs.iter().map(f).fold(0.0, f64::max);
    let tar_create_s = m(&|r| r.tar_create.seconds);
    let tar_extract_s = m(&|r| r.tar_extract.seconds);
    let first_commit_s = m(&|r| r.first_commit.seconds);
    let restore_file_s = m(&|r| r.restore_file.seconds);
    let restore_s3_s = mo(&|r| r.s3_restore.map(|s| s.seconds));
    let s3_first_commit_s = mo(&|r| r.s3_first_commit.map(|s| s.seconds));
    let unchanged_commit_s = m(&|r| r.unchanged_commit.seconds);
    let change_new_zst_bytes = m(&|r| r.change_new_zst_bytes as f64);
    let change_commit_uploaded = m(&|r| r.change_commit_uploaded as f64);
    let unchanged_commit_uploaded_max = runs
        .iter()
        .map(|r| r.unchanged_commit_uploaded)
        .max()
        .unwrap_or(0);
    let restore_peak_rss_mib = max(&|r| {
        r.restore_file
            .rss_mib()
            .max(r.s3_restore.map(|s| s.rss_mib()).unwrap_or(0.0))
    });
    let commit_peak_rss_mib = max(&|r| {
        r.first_commit
            .rss_mib()
            .max(r.unchanged_commit.rss_mib())
            .max(r.change_commit.rss_mib())
            .max(r.s3_first_commit.map(|s| s.rss_mib()).unwrap_or(0.0))
    });
    let change_ratio = change_commit_uploaded / change_new_zst_bytes.max(1.0);

    let goal = |what: &str, value: f64, limit: f64| Goal {
        what: what.to_string(),
        value,
        limit,
        met: value <= limit,
    };
    let mut goals = vec![goal(
        "restore from file:// / extract",
        restore_file_s / tar_extract_s,
        GOAL_RESTORE,
    )];
    if let Some(s3) = restore_s3_s {
        goals.push(goal(
            "restore from S3 / extract",
            s3 / tar_extract_s,
            GOAL_RESTORE,
        ));
    }
    goals.extend([
        goal(
            "unchanged commit / create",
            unchanged_commit_s / tar_create_s,
            GOAL_UNCHANGED,
        ),
        goal(
            "unchanged commit uploaded bytes",
            unchanged_commit_uploaded_max as f64,
            0.0,
        ),
        goal(
            "change commit uploaded / zstd size of the new files",
            change_ratio,
            GOAL_CHANGE,
        ),
        goal("restore peak RSS MiB", restore_peak_rss_mib, GOAL_RSS_MIB),
        goal("commit peak RSS MiB", commit_peak_rss_mib, GOAL_RSS_MIB),
    ]);

    Summary {
        tar_create_s,
        tar_extract_s,
        tar_extract_cpu_s: m(&|r| r.tar_extract.cpu_seconds),
        tar_zst_bytes: m(&|r| r.tar_zst_bytes as f64) as u64,
        tar_create_peak_rss_mib: max(&|r| r.tar_create.rss_mib()),
        tar_extract_peak_rss_mib: max(&|r| r.tar_extract.rss_mib()),
        first_commit_s,
        first_commit_ratio: first_commit_s / tar_create_s,
        first_commit_uploaded: m(&|r| r.first_commit_uploaded as f64) as u64,
        restore_file_s,
        restore_file_ratio: restore_file_s / tar_extract_s,
        restore_file_cpu_s: m(&|r| r.restore_file.cpu_seconds),
        restore_s3_s,
        restore_s3_ratio: restore_s3_s.map(|s| s / tar_extract_s),
        s3_first_commit_s,
        s3_first_commit_ratio: s3_first_commit_s.map(|s| s / tar_create_s),
        unchanged_commit_s,
        unchanged_commit_ratio: unchanged_commit_s / tar_create_s,
        unchanged_commit_uploaded_max,
        change_commit_s: m(&|r| r.change_commit.seconds),
        change_new_bytes: m(&|r| r.change_new_bytes as f64) as u64,
        change_new_zst_bytes: change_new_zst_bytes as u64,
        change_commit_uploaded: change_commit_uploaded as u64,
        change_ratio,
        restore_peak_rss_mib,
        commit_peak_rss_mib,
        goals,
    }
}

/// A child's stdout and its figures.
struct Ran {
    sample: Sample,
    stdout: Vec<u8>,
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The first argument of the hidden `cachevol __bench-child USAGE PROGRAM ARGS...` that
/// [`Bench::exec`] wraps each measured command in.
const CHILD_MARK: &str = "__bench-child";

/// What one measured command used: its wait status, CPU time, peak RSS and wall time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Usage {
    /// The raw wait status (`ExitStatusExt::from_raw` turns it back into an `ExitStatus`).
    status: i32,
    cpu_seconds: f64,
    peak_rss_kib: u64,
    seconds: f64,
}

impl Usage {
    fn to_line(self) -> String {
        format!(
            "{} {} {} {}\n",
            self.status, self.cpu_seconds, self.peak_rss_kib, self.seconds
        )
    }

    fn parse(line: &str) -> Option<Usage> {
        let mut w = line.split_whitespace();
        let usage = Usage {
            status: w.next()?.parse().ok()?,
            cpu_seconds: w.next()?.parse().ok()?,
            peak_rss_kib: w.next()?.parse().ok()?,
            seconds: w.next()?.parse().ok()?,
        };
        w.next().is_none().then_some(usage)
    }
}

/// The hidden entry point `cachevol __bench-child USAGE PROGRAM ARGS...`: runs PROGRAM with
/// ARGS (stdin, stdout and stderr inherited), waits for it, writes its [`Usage`] to the file
/// USAGE and exits 0; 127 when PROGRAM cannot be started. `None` for any other command line.
///
/// Why a process of its own: a command's CPU time and peak RSS are in the `rusage` of the
/// wait that reaps it. std's `Child::wait` drops it and rustix has no `wait4`, but
/// `getrusage(RUSAGE_CHILDREN)` (nix, already a dependency of object_store) has the same
/// figures in a process whose only child is that command: the sum of its CPU time and the
/// largest peak RSS of it and the descendants it waited for, as `wait4` reports them. In the
/// benchmark process itself that peak would be the largest of every command run so far.
pub fn child_main() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != CHILD_MARK {
        return None;
    }
    let (Some(usage_file), Some(program)) = (args.next(), args.next()) else {
        eprintln!("usage: cachevol {CHILD_MARK} USAGE PROGRAM [ARGS...]");
        return Some(2);
    };
    let started = Instant::now();
    let status = match Command::new(&program).args(args).status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cachevol: cannot start {}: {e}", program.to_string_lossy());
            return Some(127);
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let usage = match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        Ok(ru) => ru,
        Err(e) => {
            eprintln!("cachevol: getrusage: {e}");
            return Some(1);
        }
    };
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let line = Usage {
        status: std::os::unix::process::ExitStatusExt::into_raw(status),
        cpu_seconds: tv(usage.user_time()) + tv(usage.system_time()),
        // Linux counts ru_maxrss in KiB.
        peak_rss_kib: usage.max_rss().max(0) as u64,
        seconds,
    }
    .to_line();
    match std::fs::write(&usage_file, line) {
        Ok(()) => Some(0),
        Err(e) => {
            eprintln!("cachevol: write {}: {e}", usage_file.to_string_lossy());
            Some(1)
        }
    }
}

/// `cmd` run under `exe __bench-child usage_file`: same program, arguments, environment
/// changes and directory.
fn measured(exe: &Path, usage_file: &Path, cmd: &Command) -> Command {
    let mut c = Command::new(exe);
    c.arg(CHILD_MARK)
        .arg(usage_file)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        c.current_dir(dir);
    }
    c
}

/// A `sh -c SCRIPT sh ARGS...` command: paths travel as positional parameters, never quoted.
fn sh(script: &str, args: &[&OsStr]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).arg("sh").args(args);
    c
}

/// The last JSON document a child printed on stdout.
fn json_of(stdout: &[u8], what: &str) -> Result<serde_json::Value, Error> {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .ok_or_else(|| failed(what, "printed no JSON report on stdout"))
}

fn field(v: &serde_json::Value, path: &[&str], what: &str) -> Result<u64, Error> {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64()
        .ok_or_else(|| failed(what, format!("report has no {}: {v}", path.join("."))))
}

/// Deterministic pseudo-random bytes (splitmix64): incompressible for zstd.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Adds new files totalling `total` bytes under `NEW_DIRS` new directories of `dir` (1 KiB to
/// 256 KiB each, in two levels). Returns the new top-level directory names and the file count.
fn add_new_files(dir: &Path, total: u64, seed: u64) -> Result<(Vec<String>, u64), Error> {
    let mut rng = Rng(seed);
    let tops: Vec<String> = (0..NEW_DIRS)
        .map(|k| format!("cachevol-bench-new-{k}"))
        .collect();
    let mut left = total;
    let mut n = 0u64;
    let mut buf = Vec::new();
    while left > 0 {
        let size = (1024 + rng.next() % (255 * 1024)).min(left);
        let sub = dir
            .join(&tops[n as usize % NEW_DIRS])
            .join(format!("d{}", n % 3));
        std::fs::create_dir_all(&sub).map_err(io("create", &sub))?;
        buf.resize(size as usize, 0);
        rng.fill(&mut buf);
        let path = sub.join(format!("new-{n}.bin"));
        std::fs::write(&path, &buf).map_err(io("write", &path))?;
        left -= size;
        n += 1;
    }
    Ok((tops, n))
}

fn sync() {
    rustix::fs::sync();
}

/// Available bytes on the file system holding `path`.
fn available(path: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail * s.f_frsize)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The scratch directory, removed on drop unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
    quiet: bool,
}

impl WorkDir {
    fn create(
        base: Option<&Path>,
        first_tree: &Path,
        keep: bool,
        quiet: bool,
    ) -> Result<WorkDir, Error> {
        let name = format!(".cachevol-bench-{}", std::process::id());
        let candidates: Vec<PathBuf> = match base {
            Some(b) => vec![b.join(&name)],
            None => first_tree
                .parent()
                .map(|p| p.join(&name))
                .into_iter()
                .chain([std::env::temp_dir().join(&name)])
                .collect(),
        };
        let mut last = None;
        for c in candidates {
            match std::fs::create_dir_all(&c) {
                Ok(()) => {
                    return Ok(WorkDir {
                        path: c,
                        keep,
                        quiet,
                    })
                }
                Err(e) => last = Some(IoError::new("create work dir", &c, e).into()),
            }
        }
        Err(last.expect("at least one candidate"))
    }
}

/// Regular files and symlinks below `dir` (errors skipped: removal reports them).
fn leaves(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        match e.file_type() {
            Ok(ft) if ft.is_dir() => leaves(&e.path(), out),
            Ok(_) => out.push(e.path()),
            Err(_) => {}
        }
    }
}

/// Removes a tree, unlinking its files from many threads first: on a file system mounted with
/// `discard` every unlink waits for the device, and one thread removes a 16k-file tree here in
/// about 45 s, sixteen in about 12 s.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    const THREADS: usize = 16;
    const BATCH: usize = 128;
    let mut files = Vec::new();
    leaves(path, &mut files);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| loop {
                let i = next.fetch_add(BATCH, std::sync::atomic::Ordering::Relaxed);
                if i >= files.len() {
                    break;
                }
                for f in &files[i..(i + BATCH).min(files.len())] {
                    let _ = std::fs::remove_file(f);
                }
            });
        }
    });
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            // Read-only directories (restored as they were) block removal for non-root users.
            let _ = Command::new("chmod")
                .arg("-R")
                .arg("u+rwx")
                .arg(path)
                .status();
            std::fs::remove_dir_all(path)
        }
        ok => ok,
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let info = |text: String| {
            if !self.quiet {
                eprintln!("{text}");
            }
        };
        if self.keep {
            info(format!("bench: kept {}", self.path.display()));
            return;
        }
        info(format!("bench: removing {}", self.path.display()));
        let started = Instant::now();
        match remove_tree(&self.path) {
            Ok(()) => info(format!(
                "bench: removed {} in {:.0}s",
                self.path.display(),
                started.elapsed().as_secs_f64()
            )),
            Err(e) => eprintln!(
                "cachevol: warning: could not remove {}: {e}",
                self.path.display()
            ),
        }
    }
}

struct TreeCtx {
    index: usize,
    name: String,
    origin: PathBuf,
    src: PathBuf,
    stats: Stats,
}

struct Bench<'a> {
    exe: PathBuf,
    scope: String,
    work: PathBuf,
    runs: u32,
    s3_url: Option<String>,
    change_percent: f64,
    out: &'a Out,
}

impl Bench<'_> {
    /// Runs a child, timing it from spawn to reaping, with `sync` first so that earlier
    /// write-back does not land in this step. The child runs under `cachevol __bench-child`
    /// ([`child_main`]), which reports its CPU time and peak RSS.
    fn exec(&self, what: &str, dir: &Path, cmd: Command) -> Result<Ran, Error> {
        let log = dir.join(format!("{what}.log"));
        let usage_file = dir.join(format!("{what}.usage"));
        let stderr = std::fs::File::create(&log).map_err(io("create", &log))?;
        let mut cmd = measured(&self.exe, &usage_file, &cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        sync();
        let mut child = cmd.spawn().map_err(io("start", what))?;
        let mut stdout = Vec::new();
        let read = child.stdout.take().expect("piped").read_to_end(&mut stdout);
        let wrapper = child.wait().map_err(io("wait for", what))?;
        read.map_err(io("read output of", what))?;
        let usage = std::fs::read_to_string(&usage_file)
            .ok()
            .and_then(|l| Usage::parse(&l));
        let _ = std::fs::remove_file(&usage_file);
        let usage = match usage {
            Some(u) if wrapper.success() => u,
            _ => {
                return Err(failed(
                    dir.join(what),
                    format!(
                        "{wrapper} (no usage measured); its stderr ({}) ends:\n{}",
                        log.display(),
                        tail(&log)
                    ),
                ))
            }
        };
        let status = <std::process::ExitStatus as std::os::unix::process::ExitStatusExt>::from_raw(
            usage.status,
        );
        if !status.success() {
            return Err(failed(
                dir.join(what),
                format!(
                    "{status}; its stderr ({}) ends:\n{}",
                    log.display(),
                    tail(&log)
                ),
            ));
        }
        Ok(Ran {
            sample: Sample {
                seconds: usage.seconds,
                cpu_seconds: usage.cpu_seconds,
                peak_rss_kib: usage.peak_rss_kib,
            },
            stdout,
        })
    }

    /// `cachevol --store STORE --state-dir STATE --scope S --json ARGS...`
    fn ours(&self, store: &str, state: &Path, args: &[&OsStr]) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--store")
            .arg(store)
            .arg("--state-dir")
            .arg(state)
            .arg("--scope")
            .arg(&self.scope)
            .arg("--json")
            .args(args);
        c
    }

    fn commit(
        &self,
        what: &str,
        dir: &Path,
        store: &str,
        state: &Path,
        tree: &Path,
    ) -> Result<(Ran, serde_json::Value), Error> {
        self.step("commit", what, dir, store, state, tree)
    }

    fn restore(
        &self,
        what: &str,
        dir: &Path,
        store: &str,
        state: &Path,
        target: &Path,
    ) -> Result<(Ran, serde_json::Value), Error> {
        self.step("restore", what, dir, store, state, target)
    }

    /// Runs `cachevol --json VERB KEY PATH` and returns its report (`{"VERB": {...}}`).
    fn step(
        &self,
        verb: &str,
        what: &str,
        dir: &Path,
        store: &str,
        state: &Path,
        path: &Path,
    ) -> Result<(Ran, serde_json::Value), Error> {
        let ran = self.exec(
            what,
            dir,
            self.ours(
                store,
                state,
                &[verb.as_ref(), KEY.as_ref(), path.as_os_str()],
            ),
        )?;
        let v = json_of(&ran.stdout, what)?;
        Ok((ran, v[verb].clone()))
    }

    /// The restored or extracted tree must hold what the source holds.
    fn check(&self, t: &TreeCtx, dir: &Path, extra: Stats) -> Result<(), Error> {
        let got = stats(dir)?;
        let want = Stats {
            files: t.stats.files + extra.files,
            dirs: t.stats.dirs + extra.dirs,
            symlinks: t.stats.symlinks + extra.symlinks,
            bytes: t.stats.bytes + extra.bytes,
        };
        if got != want {
            return Err(failed(
                dir,
                format!("holds {got:?}, but the source holds {want:?}"),
            ));
        }
        Ok(())
    }

    fn note(&self, t: &TreeCtx, run: u32, step: &str, s: &Sample, extra: &str) {
        self.out.info(&format!(
            "bench: {} run {}/{}: {step} {:.2}s (CPU {:.2}s), peak RSS {:.0} MiB{extra}",
            t.name,
            run + 1,
            self.runs,
            s.seconds,
            s.cpu_seconds,
            s.rss_mib()
        ));
    }

    /// One run of every step on one tree; its trees stay until `dir` is deleted.
    async fn one(&self, t: &TreeCtx, run: u32, dir: &Path) -> Result<RunFigures, Error> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut f = RunFigures::default();

        // Baseline: tar | zstd -T0 -3, then zstd -d | tar -x into a fresh directory.
        let tarball = dir.join("tree.tar.zst");
        let ran = self.exec(
            "tar-create",
            dir,
            sh(
                r#"tar -C "$1" -cf - . | zstd -T0 -3 -q -o "$2""#,
                &[t.src.as_os_str(), tarball.as_os_str()],
            ),
        )?;
        f.tar_create = ran.sample;
        f.tar_zst_bytes = std::fs::metadata(&tarball)
            .map_err(io("stat", &tarball))?
            .len();
        self.note(
            t,
            run,
            "tar+zstd create",
            &f.tar_create,
            &format!(", {}", human_bytes(f.tar_zst_bytes)),
        );
        let x_tar = dir.join("x-tar");
        std::fs::create_dir(&x_tar).map_err(io("create", &x_tar))?;
        let ran = self.exec(
            "tar-extract",
            dir,
            sh(
                r#"zstd -d -q -c "$1" | tar -C "$2" -xf -"#,
                &[tarball.as_os_str(), x_tar.as_os_str()],
            ),
        )?;
        f.tar_extract = ran.sample;
        self.note(t, run, "zstd+tar extract", &f.tar_extract, "");
        self.check(t, &x_tar, Stats::default())?;

        // Ours: first commit into an empty file:// store.
        let store = format!("file://{}", dir.join("store").display());
        let state = dir.join("state");
        let (ran, c) = self.commit("first-commit", dir, &store, &state, &t.src)?;
        f.first_commit = ran.sample;
        f.first_commit_uploaded = field(&c, &["uploaded"], "first commit")?;
        self.note(
            t,
            run,
            "first commit",
            &f.first_commit,
            &format!(", uploaded {}", human_bytes(f.first_commit_uploaded)),
        );

        // Restore into a fresh directory.
        let x_file = dir.join("x-file");
        let (ran, r) = self.restore("restore-file", dir, &store, &state, &x_file)?;
        f.restore_file = ran.sample;
        f.restore_file_downloaded = field(&r, &["downloaded"], "restore")?;
        self.note(t, run, "restore file://", &f.restore_file, "");
        self.check(t, &x_file, Stats::default())?;

        // Commit of the restored directory, unchanged.
        let (ran, c) = self.commit("unchanged-commit", dir, &store, &state, &x_file)?;
        f.unchanged_commit = ran.sample;
        f.unchanged_commit_uploaded = field(&c, &["uploaded"], "unchanged commit")?;
        f.unchanged_commit_files_read = field(&c, &["files_read"], "unchanged commit")?;
        f.unchanged_commit_outcome = c["outcome"].as_str().unwrap_or("?").to_string();
        self.note(
            t,
            run,
            "unchanged commit",
            &f.unchanged_commit,
            &format!(
                ", {}, uploaded {} B",
                f.unchanged_commit_outcome, f.unchanged_commit_uploaded
            ),
        );

        // Add new files (change_percent of the bytes), commit; compare with their zstd size.
        let new_bytes = ((t.stats.bytes as f64 * self.change_percent / 100.0) as u64).max(1);
        let seed = 0x5eed_0000 + (t.index as u64) * 1000 + run as u64;
        let (tops, n) = add_new_files(&x_file, new_bytes, seed)?;
        f.change_new_files = n;
        f.change_new_bytes = new_bytes;
        let mut zst = sh(
            r#"cd "$1" && shift && tar -cf - "$@" | zstd -T0 -3 -q -c | wc -c"#,
            &std::iter::once(x_file.as_os_str())
                .chain(tops.iter().map(OsStr::new))
                .collect::<Vec<_>>(),
        );
        let o = zst.output().map_err(io("run", "tar | zstd | wc"))?;
        f.change_new_zst_bytes = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .map_err(|_| failed(&x_file, "could not measure the zstd size of the new files"))?;
        let (ran, c) = self.commit("change-commit", dir, &store, &state, &x_file)?;
        f.change_commit = ran.sample;
        f.change_commit_uploaded = field(&c, &["uploaded"], "change commit")?;
        f.change_commit_files_read = field(&c, &["files_read"], "change commit")?;
        self.note(
            t,
            run,
            "change commit",
            &f.change_commit,
            &format!(
                ", {n} new files, {} (zstd {}), uploaded {}",
                human_bytes(new_bytes),
                human_bytes(f.change_new_zst_bytes),
                human_bytes(f.change_commit_uploaded)
            ),
        );

        // S3: first commit of the same tree, restore into a fresh directory.
        if let Some(base) = &self.s3_url {
            let url = format!(
                "{}/cachevol-bench-{}-r{}-t{}",
                base.trim_end_matches('/'),
                std::process::id(),
                run + 1,
                t.index
            );
            let state = dir.join("state-s3");
            let (ran, c) = self.commit("s3-first-commit", dir, &url, &state, &t.src)?;
            f.s3_first_commit = Some(ran.sample);
            f.s3_first_commit_uploaded = Some(field(&c, &["uploaded"], "S3 first commit")?);
            self.note(t, run, "S3 first commit", &ran.sample, "");
            let x_s3 = dir.join("x-s3");
            let (ran, r) = self.restore("s3-restore", dir, &url, &state, &x_s3)?;
            f.s3_restore = Some(ran.sample);
            f.s3_restore_downloaded = Some(field(&r, &["downloaded"], "S3 restore")?);
            self.note(t, run, "S3 restore", &ran.sample, "");
            self.check(t, &x_s3, Stats::default())?;
            self.delete_store(&url).await?;
        }
        Ok(f)
    }

    /// Deletes what the benchmark wrote to an S3 store (its scope's objects).
    async fn delete_store(&self, url: &str) -> Result<(), Error> {
        let store = Store::open(url)?;
        let layout = store.layout(&self.scope)?;
        for prefix in [layout.heads(), layout.manifests(), layout.packs()] {
            for meta in store.list(&prefix).await? {
                store.delete(&meta.location).await?;
            }
        }
        store.delete(&layout.used(KEY)).await
    }
}

/// Names for the table: the paths relative to the trees' common parent.
fn display_names(trees: &[PathBuf]) -> Vec<String> {
    let parents: Vec<&Path> = trees.iter().filter_map(|t| t.parent()).collect();
    let mut common: Option<PathBuf> = parents.first().map(|p| p.to_path_buf());
    for p in &parents {
        while let Some(c) = &common {
            if p.starts_with(c) {
                break;
            }
            common = c.parent().map(Path::to_path_buf);
        }
    }
    trees
        .iter()
        .map(|t| {
            common
                .as_ref()
                .and_then(|c| t.strip_prefix(c).ok())
                .filter(|r| !r.as_os_str().is_empty())
                .unwrap_or(t)
                .display()
                .to_string()
        })
        .collect()
}

fn ratio(v: f64) -> String {
    format!("{v:.2}×")
}

fn table(
    trees: &[TreeCtx],
    sums: &[Summary],
    runs: u32,
    change_percent: f64,
    s3: bool,
    cpus: usize,
    header: &str,
) -> String {
    let mut t = String::new();
    t += header;
    t += "\n\n";
    t += &format!(
        "| tree | files | MB | tar+zstd create s | extract s | .tar.zst MB | first commit s (× create) | restore file:// s (× extract) | restore S3 s (× extract) | unchanged commit s (× create) | unchanged uploaded B | {change_percent} % change: uploaded / zstd of new files (×) | peak RSS restore / commit MiB |\n"
    );
    t += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (tree, s) in trees.iter().zip(sums) {
        let s3_cell = match (s.restore_s3_s, s.restore_s3_ratio) {
            (Some(v), Some(r)) => format!("{v:.2} ({})", ratio(r)),
            _ => "–".to_string(),
        };
        t += &format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} ({}) | {:.2} ({}) | {} | {:.3} ({}) | {} | {} / {} ({}) | {:.0} / {:.0} |\n",
            tree.name,
            tree.stats.files,
            tree.stats.bytes as f64 / 1e6,
            s.tar_create_s,
            s.tar_extract_s,
            s.tar_zst_bytes as f64 / 1e6,
            s.first_commit_s,
            ratio(s.first_commit_ratio),
            s.restore_file_s,
            ratio(s.restore_file_ratio),
            s3_cell,
            s.unchanged_commit_s,
            ratio(s.unchanged_commit_ratio),
            s.unchanged_commit_uploaded_max,
            human_bytes(s.change_commit_uploaded),
            human_bytes(s.change_new_zst_bytes),
            ratio(s.change_ratio),
            s.restore_peak_rss_mib,
            s.commit_peak_rss_mib,
        );
    }
    t += &format!(
        "\nMedians of {runs} runs; warm page cache, `sync` before each step; peak RSS is the maximum over runs and steps{}.\n",
        if s3 { "" } else { "; no S3 store given (--s3-url)" }
    );
    t += &format!(
        "Goals: restore ≤ {GOAL_RESTORE}× extract; unchanged commit ≤ {GOAL_UNCHANGED}× create with 0 B uploaded; a {change_percent} % change uploads ≤ {GOAL_CHANGE}× the zstd size of the new files; peak RSS ≤ {GOAL_RSS_MIB} MiB.\n"
    );
    // CPU time bounds the restore: on `cpus` cores it cannot take less than its CPU time
    // divided by them, whatever it overlaps.
    t += &format!(
        "CPU seconds (user + system) of a restore from file:// and of the extract, and the least a restore's wall time can be on {cpus} CPUs (its CPU time / {cpus}), against the extract's wall time:\n"
    );
    for (tree, s) in trees.iter().zip(sums) {
        let floor = s.restore_file_cpu_s / cpus.max(1) as f64;
        t += &format!(
            "- {}: restore {:.2} CPU s, extract {:.2} CPU s; floor {:.2} s = {} of the extract\n",
            tree.name,
            s.restore_file_cpu_s,
            s.tar_extract_cpu_s,
            floor,
            ratio(floor / s.tar_extract_s),
        );
    }
    let mut missed = Vec::new();
    for (tree, s) in trees.iter().zip(sums) {
        for g in s.goals.iter().filter(|g| !g.met) {
            let by = if g.limit > 0.0 {
                format!("{:.2}× the limit", g.value / g.limit)
            } else {
                format!("{} over", g.value)
            };
            missed.push(format!(
                "- {}: {} is {:.3}, goal ≤ {} ({by})",
                tree.name, g.what, g.value, g.limit
            ));
        }
    }
    if missed.is_empty() {
        t += "All goals met.\n";
    } else {
        t += "Missed:\n";
        t += &missed.join("\n");
        t += "\n";
    }
    t
}

pub async fn run(g: &Global, args: BenchArgs, out: &Out) -> Result<i32, Error> {
    let exe = std::env::current_exe().map_err(io("locate", "the cachevol binary"))?;
    let mut origins = Vec::new();
    for t in &args.trees {
        let p = std::fs::canonicalize(t).map_err(io("resolve", t))?;
        if !p.is_dir() {
            return Err(failed(p, "is not a directory"));
        }
        origins.push(p);
    }
    if args.node {
        let work = args
            .work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .join(format!(".cachevol-bench-node-{}", std::process::id()));
        let rows =
            super::bench_node::run(&origins, args.s3_url.as_deref(), &work, args.runs as usize)
                .await;
        let _ = std::fs::remove_dir_all(&work);
        let rows = rows?;
        out.line(
            &super::bench_node::table(&rows),
            &serde_json::json!({ "trees": rows }),
        );
        return Ok(super::exit::OK);
    }
    let names = display_names(&origins);
    let work = WorkDir::create(args.work_dir.as_deref(), &origins[0], args.keep, g.quiet)?;
    let bench = Bench {
        exe,
        scope: g.scope.clone(),
        work: work.path.clone(),
        runs: args.runs,
        s3_url: args.s3_url.clone(),
        change_percent: args.change_percent,
        out,
    };
    out.info(&format!("bench: work dir {}", bench.work.display()));

    // One copy of every tree in the work dir: both tar and cachevol read it, warm.
    let mut trees = Vec::new();
    for (index, (origin, name)) in origins.into_iter().zip(names).enumerate() {
        let src = bench.work.join(format!("t{index}")).join("src");
        std::fs::create_dir_all(src.parent().expect("has a parent")).map_err(io("create", &src))?;
        let st = Command::new("cp")
            .arg("-a")
            .arg(&origin)
            .arg(&src)
            .status()
            .map_err(io("run cp for", &origin))?;
        if !st.success() {
            return Err(failed(&origin, format!("cp -a failed: {st}")));
        }
        let stats = stats(&src)?;
        out.info(&format!(
            "bench: {name}: {} files, {} dirs, {} symlinks, {}",
            stats.files,
            stats.dirs,
            stats.symlinks,
            human_bytes(stats.bytes)
        ));
        trees.push(TreeCtx {
            index,
            name,
            origin,
            src,
            stats,
        });
    }

    // Keep every run's trees until the end when the disk allows (about 4× each tree per run).
    let need: u64 = trees.iter().map(|t| t.stats.bytes * 9 / 2).sum::<u64>() * args.runs as u64;
    let defer = available(&bench.work).is_none_or(|a| a > need + need / 10);
    if !defer {
        out.warn(&format!(
            "not enough free space to keep every run's trees ({} needed): each run's trees are deleted after that run, which may slow the next run's first extraction on ext4",
            human_bytes(need)
        ));
    }

    let load_start = loadavg();
    let started = Instant::now();
    let mut figures: Vec<Vec<RunFigures>> = vec![Vec::new(); trees.len()];
    for run in 0..args.runs {
        for t in &trees {
            let dir = bench
                .work
                .join(format!("t{}", t.index))
                .join(format!("run{}", run + 1));
            figures[t.index].push(bench.one(t, run, &dir).await?);
        }
        if !defer {
            for t in &trees {
                let dir = bench
                    .work
                    .join(format!("t{}", t.index))
                    .join(format!("run{}", run + 1));
                remove_tree(&dir).map_err(io("remove", &dir))?;
            }
        }
    }
    let load_end = loadavg();
    let sums: Vec<Summary> = figures.iter().map(|f| summarize(f)).collect();

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let header = format!(
        "cachevol {} bench: {} runs, {cpus} CPUs, load average {load_start} at the start and {load_end} at the end, {:.0}s in all",
        env!("CARGO_PKG_VERSION"),
        args.runs,
        started.elapsed().as_secs_f64()
    );
    let text = table(
        &trees,
        &sums,
        args.runs,
        args.change_percent,
        args.s3_url.is_some(),
        cpus,
        &header,
    );
    let doc = serde_json::json!({
        "bench": {
            "version": env!("CARGO_PKG_VERSION"),
            "runs": args.runs,
            "cpus": cpus,
            "page_cache": "warm",
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "seconds": started.elapsed().as_secs_f64(),
            "s3": args.s3_url.as_deref().map(crate::engine::store::redact_url),
            "change_percent": args.change_percent,
            "goals": {
                "restore_ratio": GOAL_RESTORE,
                "unchanged_commit_ratio": GOAL_UNCHANGED,
                "unchanged_commit_uploaded": 0,
                "change_ratio": GOAL_CHANGE,
                "peak_rss_mib": GOAL_RSS_MIB,
            },
            "trees": trees.iter().zip(&sums).zip(&figures).map(|((t, s), f)| serde_json::json!({
                "name": t.name,
                "path": t.origin,
                "stats": t.stats,
                "summary": s,
                "runs": f,
            })).collect::<Vec<_>>(),
        }
    });
    out.line(&text, &doc);
    drop(work);
    Ok(super::exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn names_are_relative_to_the_common_parent() {
        let trees = [
            PathBuf::from("/f/node_modules"),
            PathBuf::from("/f/cargo-home/registry"),
        ];
        assert_eq!(
            display_names(&trees),
            vec![
                "node_modules".to_string(),
                "cargo-home/registry".to_string()
            ]
        );
        assert_eq!(display_names(&[PathBuf::from("/f/x")]), vec!["x"]);
    }

    #[test]
    fn new_files_total_the_requested_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (tops, n) = add_new_files(dir.path(), 700_000, 1).unwrap();
        assert_eq!(tops.len(), NEW_DIRS);
        let s = stats(dir.path()).unwrap();
        assert_eq!((s.files, s.bytes), (n, 700_000));
    }
}
