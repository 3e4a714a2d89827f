//! `cachevol run`: restore every cache, run the command, commit per policy and the command's
//! exit status, exit with the command's status. A cache never fails a build: a restore that
//! fails is a warning and the command runs with what there is; a commit that fails is reported
//! but does not change the exit status. A commit cancelled by SIGINT or SIGTERM does (130,
//! 143), and so does a SIGTERM to cachevol while the command runs (passed on to it; nothing is
//! committed). `--mode locked` serializes runs on one machine with a lock file beside a
//! `file://` store.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, ValueEnum};

use super::failure::Failure;
use super::output;
use super::output::{Bars, Out};
use super::{exit, CommitArgs, FilesRoot, Global, HitArgs};
use crate::engine::{self, io, names, Engine, Error, RestoreSource};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Shared,
    Private,
    Locked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Restore at the start and commit at the end.
    PullPush,
    /// Restore only; never commit.
    Pull,
    /// Start from the directory as it is; commit at the end.
    Push,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CommitOn {
    /// Commit only when the command exits 0.
    Success,
    /// Commit a cache only when the command created `.cachevol-commit` at its root (any
    /// status); the marker is removed before the command runs and is never committed.
    Marker,
    /// Commit whatever the command's status.
    Always,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// A cache as KEY=DIR; repeat for several caches. KEY may contain {hashFiles:GLOB[,GLOB…]}.
    /// A KEY that is not a valid cache key (e.g. a branch name with '/') is a warning: the
    /// command runs without that cache.
    #[arg(long = "cache", required = true, value_parser = parse_cache)]
    caches: Vec<(String, PathBuf)>,
    /// A fallback key tried when a cache's key has no snapshot: K for every cache, or KEY=K for
    /// one cache; a key of exactly that name, else the most recently committed key starting
    /// with it. Repeat for an ordered list.
    #[arg(long = "restore-key")]
    restore_keys: Vec<String>,
    #[command(flatten)]
    hit: HitArgs,
    /// shared and private behave alike on one machine (they differ between pods on a node);
    /// locked serializes runs of the same caches on this machine.
    #[arg(long, value_enum, default_value_t = Mode::Private)]
    mode: Mode,
    #[arg(long, value_enum, default_value_t = Policy::PullPush)]
    policy: Policy,
    #[arg(long, value_enum, default_value_t = CommitOn::Success)]
    commit_on: CommitOn,
    #[command(flatten)]
    commit: CommitArgs,
    #[command(flatten)]
    files: FilesRoot,
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn parse_cache(s: &str) -> Result<(String, PathBuf), String> {
    // The last '=' splits, so a key computed from anything (a branch `a=b`) stays whole; its
    // validity is checked by run, which runs without an invalid cache rather than fail.
    let (key, dir) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("{s:?}: a cache is KEY=DIR"))?;
    if dir.is_empty() {
        return Err(format!("{s:?}: the directory is empty"));
    }
    Ok((key.to_string(), PathBuf::from(dir)))
}

/// A cache of the command line: its key as written and after `{hashFiles:…}`.
struct Cache {
    written: String,
    key: String,
    dir: PathBuf,
}

/// Restore keys per cache: `K` applies to every cache, `KEY=K` to one (KEY as written, or as
/// expanded). An invalid one is left out with a warning: a restore key is a hint, never a reason
/// to fail a build; but one whose `{hashFiles:…}` matches nothing is a usage error, like a
/// cache key's.
fn restore_keys_for(
    cache: &Cache,
    all: &[String],
    files: &FilesRoot,
    dirs: &[&Path],
    out: &Out,
) -> Result<Vec<String>, Failure> {
    let mut keys = Vec::new();
    for rk in all {
        let k = match split_outside_braces(rk) {
            Some((k, v)) if k == cache.written || k == cache.key => v,
            Some(_) => continue,
            None => rk.as_str(),
        };
        let k = files.expand(k, dirs)?;
        match names::key(&k) {
            Ok(k) => keys.push(k.to_string()),
            Err(e) => out.warn_about(
                Some(&cache.key),
                "restore_key_ignored",
                &format!("{}: restore key ignored: {e}", cache.key),
            ),
        }
    }
    Ok(keys)
}

/// Each cache its own directory, refused as a usage error before anything is restored: a
/// directory of two caches would get two snapshots written over each other, and one inside
/// another cache's would be committed in both.
fn check_paths(caches: &[Cache]) -> Result<(), Failure> {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for c in caches {
        match seen.insert(&c.key, &c.dir) {
            Some(other) if other == c.dir => {
                return Err(Failure::Usage(format!(
                    "cache {} is given twice (--cache {}={}): give it once",
                    c.key,
                    c.written,
                    c.dir.display()
                )))
            }
            Some(other) => {
                return Err(Failure::Usage(format!(
                    "cache {} is given with two directories ({} and {}): one cache holding \
                     several directories is not supported yet; give each directory its own key",
                    c.key,
                    other.display(),
                    c.dir.display()
                )))
            }
            None => {}
        }
    }
    let resolved: Vec<PathBuf> = caches.iter().map(|c| resolve(&c.dir)).collect();
    for (i, (a, pa)) in caches.iter().zip(&resolved).enumerate() {
        for (b, pb) in caches.iter().zip(&resolved).skip(i + 1) {
            let why = if pa == pb {
                format!(
                    "caches {} and {} name the same directory {}",
                    a.key,
                    b.key,
                    a.dir.display()
                )
            } else if let Some((inner, outer)) = [(a, pa, b, pb), (b, pb, a, pa)]
                .into_iter()
                .find(|(_, pi, _, po)| pi.starts_with(po))
                .map(|(i, _, o, _)| (i, o))
            {
                format!(
                    "the directory of cache {} ({}) is inside that of cache {} ({}), which \
                     would commit it too",
                    inner.key,
                    inner.dir.display(),
                    outer.key,
                    outer.dir.display()
                )
            } else {
                continue;
            };
            return Err(Failure::Usage(format!(
                "{why}: give each cache a directory of its own, outside the others"
            )));
        }
    }
    Ok(())
}

/// `dir` as an absolute path without `.`, `..` or symlinks in the part that exists, so two
/// spellings of one directory compare equal (it need not exist yet).
fn resolve(dir: &Path) -> PathBuf {
    let abs = std::env::current_dir().unwrap_or_default().join(dir);
    let mut lexical = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                lexical.pop();
            }
            c => lexical.push(c),
        }
    }
    // The deepest existing ancestor, with its symlinks resolved, then the rest as written.
    let mut missing = Vec::new();
    let mut base = lexical.as_path();
    loop {
        if let Ok(real) = base.canonicalize() {
            return missing.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                base = parent;
            }
            _ => return lexical,
        }
    }
}

/// What names a cache in `$GITHUB_OUTPUT` (`cache-hit-NAME`): its key, or for a key with
/// `{hashFiles:…}` (whose digest a workflow cannot know in advance) the key as written without
/// the placeholders and the separators they leave doubled or at its end (`npm-{hashFiles:…}`
/// → `npm`).
fn output_name(c: &Cache) -> String {
    if c.written == c.key {
        return c.key.clone();
    }
    let mut name = String::new();
    let mut rest = c.written.as_str();
    let sep = |c: char| matches!(c, '-' | '_' | '.');
    while let Some(start) = rest.find("{hashFiles:") {
        name.push_str(&rest[..start]);
        rest = rest[start..].split_once('}').map_or("", |(_, r)| r);
        // One separator where the placeholder stood between two: `go-{…}-linux` → `go-linux`.
        if name.ends_with(sep) && rest.starts_with(sep) {
            rest = &rest[1..];
        }
    }
    name.push_str(rest);
    let name = name.trim_end_matches(sep);
    if name.is_empty() {
        c.key.clone()
    } else {
        name.to_string()
    }
}

/// `KEY=K` split at its first '=' outside `{…}` (a glob may hold one).
fn split_outside_braces(s: &str) -> Option<(&str, &str)> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            '=' if depth == 0 => return Some((&s[..i], &s[i + 1..])),
            _ => {}
        }
    }
    None
}

/// An exclusive lock on one cache key, held from restore until its commit is in the store.
struct KeyLock {
    _file: File,
}

impl KeyLock {
    fn acquire(engine: &Engine, key: &str, out: &Out) -> Result<KeyLock, Error> {
        let Some(root) = engine.store().local_root() else {
            return Err(Error::Lock(format!(
                "--mode locked on one machine needs a file:// store; {} is shared by other machines, \
                 which only cachevol's Kubernetes driver serializes (with Leases)",
                engine.store().display_url()
            )));
        };
        let dir = root.join(engine.scope()).join("locks");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let path = dir.join(format!("{key}.lock"));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open", &path))?;
        // flock(2) on Linux, as before: runs of older versions still exclude each other.
        if file.try_lock().is_err() {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            out.info(&format!(
                "{key}: waiting for the lock (held by {})",
                if holder.trim().is_empty() {
                    "another run"
                } else {
                    holder.trim()
                }
            ));
            // Blocks until the holder releases it (or exits).
            if let Err(e) = file.lock() {
                return Err(Error::Lock(format!("locking {}: {e}", path.display())));
            }
        }
        let _ = file.set_len(0);
        let _ = write!(
            file,
            "pid {} ({})",
            std::process::id(),
            crate::engine::default_writer()
        );
        Ok(KeyLock { _file: file })
    }
}

pub async fn run(g: &Global, args: RunArgs, out: &Out, bars: Arc<Bars>) -> Result<i32, Failure> {
    // Keys first: a {hashFiles:…} that matches nothing is a usage error before anything else.
    let dirs: Vec<&Path> = args.caches.iter().map(|(_, d)| d.as_path()).collect();
    let mut written = Vec::new();
    for (key, dir) in &args.caches {
        written.push(Cache {
            written: key.clone(),
            key: args.files.expand(key, &dirs)?,
            dir: dir.clone(),
        });
    }
    check_paths(&written)?;
    let engine = g.engine(&bars)?;
    // A cache never fails a build: a key that cannot be a cache key (a branch name with '/')
    // leaves its directory uncached, and the command runs.
    let mut caches = Vec::new();
    let mut restore_keys = Vec::new();
    let mut output_names = Vec::new();
    for c in written {
        match names::key(&c.key) {
            Ok(_) => {
                restore_keys.push(restore_keys_for(
                    &c,
                    &args.restore_keys,
                    &args.files,
                    &dirs,
                    out,
                )?);
                output_names.push(output_name(&c));
                caches.push((c.key, c.dir));
            }
            Err(e) => out.warn_about(
                Some(&c.key),
                "invalid_key",
                &format!(
                    "{e}: {} is neither restored nor committed; the command runs without this cache",
                    c.dir.display()
                ),
            ),
        }
    }

    // Locks in key order, so two runs of overlapping caches cannot deadlock.
    let mut locks = Vec::new();
    if args.mode == Mode::Locked && !args.hit.lookup_only {
        let mut keys: Vec<&String> = caches.iter().map(|(k, _)| k).collect();
        keys.sort();
        for key in keys {
            locks.push(KeyLock::acquire(&engine, key, out)?);
        }
    }

    // What each cache would restore (nothing under policy push).
    let mut found = Vec::new();
    for ((key, dir), restore_keys) in caches.iter().zip(restore_keys) {
        let source = if args.policy == Policy::Push {
            None
        } else {
            match engine.resolve(key, &restore_keys).await {
                Ok(s) => Some(s),
                Err(e) => {
                    restore_failed(out, key, dir, &e);
                    None
                }
            }
        };
        found.push((restore_keys, source));
    }
    let is_hit = |s: &Option<RestoreSource>| matches!(s, Some(RestoreSource::Key { .. }));
    let all_hit = !caches.is_empty() && found.iter().all(|(_, s)| is_hit(s));
    let matched = |s: &Option<RestoreSource>| {
        s.as_ref()
            .and_then(output::matched_key)
            .unwrap_or("")
            .to_string()
    };
    let mut outputs = vec![("cache-hit".to_string(), all_hit.to_string())];
    // actions/cache's two key outputs name one cache: unsuffixed only when there is one.
    if let ([(key, _)], [(_, s)]) = (&caches[..], &found[..]) {
        outputs.push(("cache-primary-key".into(), key.clone()));
        outputs.push(("cache-matched-key".into(), matched(s)));
    }
    for ((name, (key, _)), (_, s)) in output_names.iter().zip(&caches).zip(&found) {
        outputs.push((format!("cache-hit-{name}"), is_hit(s).to_string()));
        outputs.push((format!("cache-primary-key-{name}"), key.clone()));
        outputs.push((format!("cache-matched-key-{name}"), matched(s)));
    }
    output::github_output(out, &outputs);
    let missed: Vec<&str> = caches
        .iter()
        .zip(&found)
        .filter(|(_, (_, s))| match s {
            Some(s) => *s == RestoreSource::Miss,
            // A failed lookup found nothing; policy push looks nothing up.
            None => args.policy != Policy::Push,
        })
        .map(|((k, _), _)| k.as_str())
        .collect();
    let fail = args.hit.fail_on_miss && !missed.is_empty();
    if args.hit.lookup_only || fail {
        for ((key, _), (restore_keys, s)) in caches.iter().zip(&found) {
            let s = s.as_ref().unwrap_or(&RestoreSource::Miss);
            if fail && out.json() {
                // What was found, not what "would be restored": nothing will be.
                out.line("", &output::found(key, restore_keys, s));
            } else {
                out.lookup(key, restore_keys, s);
            }
        }
        if fail {
            return Err(Failure::Miss(format!(
                "cache miss for {} (--fail-on-miss): the command was not run",
                missed.join(", ")
            )));
        }
        return Ok(exit::OK);
    }

    for ((key, dir), (restore_keys, source)) in caches.iter().zip(found) {
        // A marker left by an earlier run must not decide this one.
        remove_marker(dir)?;
        let Some(source) = source else {
            if args.policy == Policy::Push {
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            } else {
                engine.forget(dir);
            }
            continue;
        };
        bars.cache(key);
        match engine.restore_source(source, dir).await {
            Ok(r) => out.restore(key, &restore_keys, dir, &r),
            Err(e) => {
                restore_failed(out, key, dir, &e);
                engine.forget(dir);
            }
        }
    }

    let status = run_command(&args.command, out).await;
    let (code, terminated) = status.unwrap_or_else(|e| {
        out.warn_about(
            None,
            "command_not_started",
            &format!("could not run {:?}: {e}", args.command[0]),
        );
        (127, false)
    });

    // From here SIGINT and SIGTERM cancel the commits: the command is over, so a signal is
    // meant for cachevol (a runner cancelling the job, a Ctrl-C during a long upload).
    let stop = super::signals::Stop::watch(out);
    let engine = engine.with_cancel(stop.cancel());
    let mut cancelled: Option<i32> = None;

    let skip = match (args.policy, args.commit_on) {
        // Whatever the command's status: whoever sent SIGTERM wants the job stopped, not its
        // caches published from a command that was cut short.
        _ if terminated => Some(
            "cachevol got SIGTERM while the command ran (it was passed on to the command); nothing is committed"
                .to_string(),
        ),
        (Policy::Pull, _) => Some("policy pull never commits".to_string()),
        (_, CommitOn::Success) if code != 0 => Some(format!(
            "the command exited {code}; commit-on success commits only successful runs"
        )),
        _ => None,
    };
    let mut opts = args.commit.options();
    opts.fence |= args.mode == Mode::Locked;
    for (key, dir) in &caches {
        let unmarked = (args.commit_on == CommitOn::Marker && !dir.join(engine::MARKER).exists())
            .then(|| {
                format!(
                    "the command created no {} in {}; commit-on marker commits only marked caches",
                    engine::MARKER,
                    dir.display()
                )
            });
        let marked = remove_marker(dir);
        let stopped = cancelled.map(|_| "the commits were cancelled; nothing is committed".into());
        if let Some(why) = skip.as_ref().or(stopped.as_ref()).or(unmarked.as_ref()) {
            out.line(
                &format!("{key}: not committed: {why}"),
                &serde_json::json!({"key": key, "skipped": why}),
            );
            continue;
        }
        if let Err(e) = marked {
            out.warn_about(
                Some(key),
                "commit_failed",
                &format!("{key}: commit failed: {e}"),
            );
            continue;
        }
        bars.cache(key);
        match engine.commit(key, dir, &opts).await {
            Ok(r) => out.commit(&r),
            // Unlike a failed commit, a cancelled one changes the exit status: the signal
            // asked for the run to stop, and the runner reads 130/143 as "interrupted".
            Err(e @ Error::Cancelled { .. }) => {
                let e = Failure::from(e);
                out.error(&e);
                cancelled = Some(e.exit_code());
            }
            Err(e) => out.warn_about(
                Some(key),
                "commit_failed",
                &format!("{key}: commit failed: {e}"),
            ),
        }
    }
    drop(stop);
    drop(locks);
    let code = match (cancelled, terminated) {
        (Some(c), _) => c,
        (None, true) => 128 + libc::SIGTERM,
        (None, false) => code,
    };
    // The run's own report: a failure when its status is one, saying whose.
    let summary = serde_json::json!({"exit_code": code, "cache_hit": all_hit});
    if code == exit::OK {
        out.line("", &summary);
    } else {
        let (kind, why) = match (cancelled, terminated) {
            (Some(_), _) => (
                "cancelled",
                "the commits were cancelled: nothing was committed".to_string(),
            ),
            (None, true) => (
                "cancelled",
                "cachevol got SIGTERM while the command ran: nothing was committed".to_string(),
            ),
            (None, false) => ("command_failed", format!("the command exited {code}")),
        };
        out.json_failure(code, kind, &why, Some(summary));
    }
    Ok(code)
}

/// Removes the commit marker from a cache directory, if there is one.
fn remove_marker(dir: &std::path::Path) -> Result<(), Error> {
    let marker = dir.join(engine::MARKER);
    match std::fs::symlink_metadata(&marker) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&marker),
        Ok(_) => std::fs::remove_file(&marker),
        Err(_) => Ok(()),
    }
    .map_err(io("remove", &marker))?;
    Ok(())
}

/// Runs the command with inherited stdio; its exit code, or 128 + signal when killed, and
/// whether cachevol itself got SIGTERM meanwhile.
async fn run_command(command: &[String], out: &Out) -> std::io::Result<(i32, bool)> {
    use std::os::unix::process::ExitStatusExt;
    use tokio::signal::unix::{signal, SignalKind};
    out.info(&format!("running {}", shell_words(command)));
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    if out.json() {
        // stdout carries cachevol's JSON lines only; the command's output goes to stderr.
        use std::os::fd::AsFd;
        cmd.stdout(std::io::stderr().as_fd().try_clone_to_owned()?);
    }
    // Registered before the spawn, so no signal falls between the two to kill cachevol.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut child = cmd.spawn()?;
    let mut terminated = false;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            // Ctrl-C reaches the command (same process group); we wait for it to decide on
            // the commit.
            _ = int.recv() => continue,
            // A SIGTERM to cachevol alone (a CI runner cancelling the job) would leave the
            // command running with nobody to wait for it: it is passed on, we wait for the
            // command to end, and nothing is committed (see `run`).
            _ = term.recv() => {
                terminated = true;
                if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
        }
    };
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok((code, terminated))
}

fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:@".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A cache whose lookup or restore failed: a warning, and the command runs with what the
/// directory holds (a cache never fails a build).
fn restore_failed(out: &Out, key: &str, dir: &Path, e: &Error) {
    out.warn_about(
        Some(key),
        "restore_failed",
        &format!(
            "{key}: restore failed, running with what {} holds: {e}",
            dir.display()
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(written: &str, key: &str) -> Cache {
        Cache {
            written: written.into(),
            key: key.into(),
            dir: PathBuf::from("/d"),
        }
    }

    #[test]
    fn output_names_drop_the_placeholders_a_workflow_cannot_know() {
        assert_eq!(output_name(&cache("npm", "npm")), "npm");
        let d = "0123456789abcdef0123456789abcdef";
        for (written, name) in [
            ("npm-{hashFiles:**/package-lock.json}", "npm"),
            ("go-{hashFiles:go.sum}-linux", "go-linux"),
            ("{hashFiles:Cargo.lock}", d),
        ] {
            assert_eq!(output_name(&cache(written, d)), name, "{written}");
        }
    }

    #[test]
    fn a_restore_key_for_one_cache_splits_outside_the_globs() {
        assert_eq!(
            split_outside_braces("npm=npm-main"),
            Some(("npm", "npm-main"))
        );
        assert_eq!(split_outside_braces("npm-main"), None);
        assert_eq!(split_outside_braces("k-{hashFiles:a=b}"), None);
        assert_eq!(
            split_outside_braces("npm-{hashFiles:x}=npm-{hashFiles:a=b}"),
            Some(("npm-{hashFiles:x}", "npm-{hashFiles:a=b}"))
        );
    }

    #[test]
    fn two_spellings_of_one_directory_resolve_alike() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        let real = d.path().join("a/new");
        assert_eq!(resolve(&d.path().join("a/./b/../new")), resolve(&real));
        std::os::unix::fs::symlink(d.path().join("a"), d.path().join("link")).unwrap();
        assert_eq!(resolve(&d.path().join("link/new")), resolve(&real));
    }
}
