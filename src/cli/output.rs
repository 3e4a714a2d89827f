//! What the CLI prints: human lines on stderr/stdout, or one JSON document per report with
//! `--json`; progress bars only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::failure::Failure;
use crate::engine::{
    CommitOutcome, CommitReport, Entry, GcReport, Generation, KeyInfo, Kind, Progress,
    RestoreReport, RestoreSource,
};

/// Version of the JSON reports. Every line `--json` prints is one object: a result,
/// `{"version":1,"command":C,"ok":true,C:{…}}` with the command's own fields under its name,
/// or a failure, `{"version":1,"command":C,"ok":false,"exit_code":N,"error":{"kind":…,
/// "message":…}}` (the kinds: `failure::Failure::kind`), N being the process's exit status.
pub const JSON_VERSION: u32 = 1;

/// A failure report (see `JSON_VERSION`); `command` is None when the command line named none.
/// `context`, when there is one, goes under the command's name as a result's fields do.
pub fn json_failure(
    command: Option<&str>,
    exit_code: i32,
    kind: &str,
    message: &str,
    context: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "version": JSON_VERSION,
        "command": command,
        "ok": false,
        "exit_code": exit_code,
        "error": {"kind": kind, "message": message},
    });
    if let (Some(c), Some(ctx)) = (command, context) {
        v[c] = ctx;
    }
    v
}

/// Writes one line to stdout. A reader that went away (`cachevol show npm | head -3`) ends the
/// process quietly with status 0: there is no one left to tell, and a panic (exit 101) would
/// fail a pipeline under `set -o pipefail` for nothing.
pub fn say(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_fmt(args)
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// Writes one line to stderr; a closed stderr is ignored rather than a panic.
pub fn say_err(args: std::fmt::Arguments) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|_| err.write_all(b"\n"));
}

macro_rules! outln {
    ($($t:tt)*) => { $crate::cli::output::say(format_args!($($t)*)) };
}
macro_rules! errln {
    ($($t:tt)*) => { $crate::cli::output::say_err(format_args!($($t)*)) };
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Appends `name=value` lines to the file `$GITHUB_OUTPUT` names (GitHub Actions step outputs),
/// when it is set; a file that cannot be written is a warning, never a failure.
pub fn github_output(out: &Out, lines: &[(String, String)]) {
    let Some(path) = std::env::var_os("GITHUB_OUTPUT").filter(|p| !p.is_empty()) else {
        return;
    };
    let text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = res {
        out.warn_about(
            None,
            "github_output",
            &format!(
                "could not write GITHUB_OUTPUT {}: {e}",
                std::path::Path::new(&path).display()
            ),
        );
    }
}

/// "1 file", "2 files".
pub fn files(n: u64) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

/// The hit level scripts test: `key` (the key itself had a snapshot), `restore-key`, `miss`.
pub fn hit_level(source: &RestoreSource) -> &'static str {
    match source {
        RestoreSource::Key { .. } => "key",
        RestoreSource::RestoreKey { .. } => "restore-key",
        RestoreSource::Miss => "miss",
    }
}

/// The key whose snapshot a restore brings, if any.
pub fn matched_key(source: &RestoreSource) -> Option<&str> {
    match source {
        RestoreSource::Key { key, .. } | RestoreSource::RestoreKey { key, .. } => Some(key),
        RestoreSource::Miss => None,
    }
}

/// The fields every restore report has: `hit` (the level), `cache_hit` (true only for the key
/// itself, as actions/cache's `cache-hit`) and `matched_key`; and actions/cache's other two
/// outputs under their names, `cache_primary_key` (the key, `{hashFiles:…}` expanded) and
/// `cache_matched_key` (null on a miss).
fn hit_fields(key: &str, restore_keys: &[String], source: &RestoreSource) -> serde_json::Value {
    serde_json::json!({
        "key": key,
        "restore_keys": restore_keys,
        "hit": hit_level(source),
        "cache_hit": matches!(source, RestoreSource::Key { .. }),
        "matched_key": matched_key(source),
        "cache_primary_key": key,
        "cache_matched_key": matched_key(source),
    })
}

/// What a lookup found, for a report: the hit fields and the generation, if any.
pub fn found(key: &str, restore_keys: &[String], source: &RestoreSource) -> serde_json::Value {
    let mut v = hit_fields(key, restore_keys, source);
    if let RestoreSource::Key { generation, .. } | RestoreSource::RestoreKey { generation, .. } =
        source
    {
        v["generation"] = (*generation).into();
    }
    v
}

/// The second line of a restore's text: actions/cache's outputs as `name=value`, for scripts
/// of other CI systems to read (the matched key is empty on a miss).
fn keys_text(key: &str, source: &RestoreSource) -> String {
    format!(
        "\n  cache-primary-key={key} cache-matched-key={}",
        matched_key(source).unwrap_or("")
    )
}

/// What a miss looked for: "npm", "npm or restore keys npm-main, npm-".
pub fn tried(key: &str, restore_keys: &[String]) -> String {
    match restore_keys {
        [] => key.to_string(),
        [one] => format!("{key} or restore key {one}"),
        more => format!("{key} or restore keys {}", more.join(", ")),
    }
}

/// "1 generation", "2 generations".
pub fn generations(n: u64) -> String {
    if n == 1 {
        "1 generation".into()
    } else {
        format!("{n} generations")
    }
}

/// " (fallback from restore key K)", or "(... matched by prefix P)" for a prefix match.
fn from(source: &RestoreSource, restore_keys: &[String]) -> String {
    match source {
        RestoreSource::RestoreKey { key: k, .. } => match restore_keys
            .iter()
            .find(|p| *p != k && k.starts_with(p.as_str()))
            .filter(|_| !restore_keys.contains(k))
        {
            Some(p) => format!(" of {k} (fallback: restore key {p} matched by prefix)"),
            None => format!(" (fallback from restore key {k})"),
        },
        _ => String::new(),
    }
}

fn time(unix: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64),
    )
    .to_string()
}

pub struct Out {
    json: bool,
    quiet: bool,
    /// The subcommand, named in every JSON report.
    command: &'static str,
}

impl Out {
    pub fn new(json: bool, quiet: bool, command: &'static str) -> Out {
        Out {
            json,
            quiet,
            command,
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// A result: `value` under the command's name (see `JSON_VERSION`).
    pub fn json_ok<T: Serialize>(&self, value: &T) {
        let mut v = serde_json::json!({
            "version": JSON_VERSION,
            "command": self.command,
            "ok": true,
        });
        v[self.command] = serde_json::to_value(value).expect("reports serialize");
        outln!("{v}");
    }

    pub fn bars_enabled(&self) -> bool {
        !self.json && !self.quiet && std::io::stderr().is_terminal()
    }

    /// Plain progress lines on stderr (CI logs): not quiet and stderr no terminal.
    pub fn plain_progress(&self) -> bool {
        !self.quiet && !std::io::stderr().is_terminal()
    }

    /// A text line on stdout, or the value as JSON.
    pub fn line<T: Serialize>(&self, text: &str, value: &T) {
        if self.json {
            self.json_ok(value);
        } else if !self.quiet {
            outln!("{text}");
        }
    }

    /// Informational text on stderr (never mixed into JSON on stdout).
    pub fn info(&self, text: &str) {
        if !self.quiet {
            errln!("{text}");
        }
    }

    /// A warning on stderr, and with `--json` a result saying it (`{"warning":{"kind",
    /// "message"}}`), so a script sees what a cache did not do without reading stderr.
    pub fn warn(&self, text: &str) {
        self.warn_about(None, "warning", text);
    }

    /// A warning about one cache: `key` beside the warning in JSON.
    pub fn warn_about(&self, key: Option<&str>, kind: &str, text: &str) {
        errln!("cachevol: warning: {text}");
        if self.json {
            let mut v = serde_json::json!({"warning": {"kind": kind, "message": text}});
            if let Some(k) = key {
                v["key"] = k.into();
            }
            self.json_ok(&v);
        }
    }

    /// A failure: its message on stderr, and with `--json` its report on stdout.
    pub fn error(&self, e: &Failure) {
        self.error_with(e, None);
    }

    /// A failure with the command's fields beside it (a miss says what was looked up).
    pub fn error_with(&self, e: &Failure, context: Option<serde_json::Value>) {
        self.json_failure(e.exit_code(), e.kind(), &e.to_string(), context);
        errln!("cachevol: error: {e}");
    }

    /// With `--json`, a failure report alone (its text, if any, is the caller's).
    pub fn json_failure(
        &self,
        exit_code: i32,
        kind: &str,
        message: &str,
        context: Option<serde_json::Value>,
    ) {
        if self.json {
            let v = json_failure(Some(self.command), exit_code, kind, message, context);
            outln!("{v}");
        }
    }

    /// A restore into `dir`. A miss leaves in the directory what cachevol did not put there,
    /// so it says "starting empty" only when nothing is left.
    pub fn restore(
        &self,
        key: &str,
        restore_keys: &[String],
        dir: &std::path::Path,
        r: &RestoreReport,
    ) {
        let text = match &r.source {
            RestoreSource::Miss => {
                let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
                format!(
                    "{key}: no snapshot of {} yet; {}",
                    tried(key, restore_keys),
                    if empty {
                        "starting empty".to_string()
                    } else {
                        format!("{} is kept as it was", dir.display())
                    }
                )
            }
            RestoreSource::Key { generation, .. }
            | RestoreSource::RestoreKey { generation, .. } => format!(
                "{key}: restored generation {generation}{}: {}, {} in {:.2}s ({} fetched)",
                from(&r.source, restore_keys),
                files(r.files),
                human_bytes(r.bytes),
                r.seconds,
                human_bytes(r.downloaded)
            ),
        };
        let mut v = hit_fields(key, restore_keys, &r.source);
        v["restore"] = serde_json::json!(r);
        self.line(&(text + &keys_text(key, &r.source)), &v);
    }

    /// A restore written as an image (`restore --image`).
    pub fn image(
        &self,
        key: &str,
        restore_keys: &[String],
        path: &std::path::Path,
        r: &crate::engine::ImageReport,
    ) {
        let text = match &r.source {
            RestoreSource::Miss => format!(
                "{key}: no snapshot of {} yet: wrote an empty image to {}",
                tried(key, restore_keys),
                path.display()
            ),
            RestoreSource::Key { generation, .. }
            | RestoreSource::RestoreKey { generation, .. } => format!(
                "{key}: wrote generation {generation}{} as an image of {} to {}: {}, {} in {:.2}s ({} fetched)",
                from(&r.source, restore_keys),
                human_bytes(r.image_bytes),
                path.display(),
                files(r.files),
                human_bytes(r.bytes),
                r.seconds,
                human_bytes(r.downloaded)
            ),
        };
        let mut v = hit_fields(key, restore_keys, &r.source);
        v["image"] = serde_json::json!(r);
        self.line(&(text + &keys_text(key, &r.source)), &v);
    }

    /// What a restore would bring (`--lookup-only`): nothing is written.
    pub fn lookup(&self, key: &str, restore_keys: &[String], source: &RestoreSource) {
        let text = match source {
            RestoreSource::Miss => format!(
                "{key}: miss: no snapshot of {}; nothing would be restored",
                tried(key, restore_keys)
            ),
            RestoreSource::Key { generation, .. }
            | RestoreSource::RestoreKey { generation, .. } => format!(
                "{key}: {}: would restore generation {generation}{}",
                hit_level(source),
                from(source, restore_keys)
            ),
        };
        let mut v = found(key, restore_keys, source);
        v["lookup_only"] = true.into();
        self.line(&(text + &keys_text(key, source)), &v);
    }

    pub fn commit(&self, r: &CommitReport) {
        let text = match r.outcome {
            CommitOutcome::Committed { generation } if r.restore_key.is_some() && r.new_chunks == 0 => format!(
                "{}: created key {} from restore key {} as generation {generation}: {}, {}; no new chunks, {} uploaded (the generation object) in {:.2}s",
                r.key,
                r.key,
                r.restore_key.as_deref().unwrap_or_default(),
                files(r.files),
                human_bytes(r.bytes),
                human_bytes(r.uploaded),
                r.seconds,
            ),
            CommitOutcome::Committed { generation } => format!(
                "{}: committed generation {generation}: {}, {}; read {} changed {}, uploaded {} in {:.2}s{}",
                r.key,
                files(r.files),
                human_bytes(r.bytes),
                r.files_read,
                if r.files_read == 1 { "file" } else { "files" },
                human_bytes(r.uploaded),
                r.seconds,
                if r.merged > 0 { format!(" (merged {} newer commits)", r.merged) } else { String::new() }
            ),
            CommitOutcome::Unchanged { generation } => format!(
                "{}: unchanged{}: nothing uploaded ({:.2}s)",
                r.key,
                generation.map(|g| format!(" since generation {g}")).unwrap_or_default(),
                r.seconds
            ),
        };
        self.line(&text, &serde_json::json!({"commit": r}));
    }

    pub fn keys(&self, scope: &str, keys: &[KeyInfo]) {
        if self.json {
            self.line("", &serde_json::json!({"scope": scope, "caches": keys}));
            return;
        }
        if keys.is_empty() {
            self.info(&format!("no caches in scope {scope}"));
            return;
        }
        outln!(
            "{:<32} {:>5} {:>5} {:>9} {:>12}  {:<20}  {:<20}  WRITER",
            "KEY",
            "GEN",
            "KEPT",
            "FILES",
            "SIZE",
            "WRITTEN",
            "LAST USED"
        );
        for k in keys {
            outln!(
                "{:<32} {:>5} {:>5} {:>9} {:>12}  {:<20}  {:<20}  {}",
                k.key,
                k.newest,
                k.generations,
                k.files,
                human_bytes(k.bytes),
                time(k.written),
                k.last_used.map(time).unwrap_or_else(|| "-".into()),
                k.writer
            );
        }
    }

    pub fn show(&self, g: &Generation, entries: &[Entry]) {
        if self.json {
            // What a user can act on; the manifest's chunk refs are the store's business.
            let generation = serde_json::json!({"key": g.key, "generation": g.generation, "provenance": g.provenance, "totals": g.totals});
            self.line("", &serde_json::json!({"generation": generation, "entries": entries.iter().map(|e| serde_json::json!({"path": e.path, "kind": e.kind, "mode": format!("{:o}", e.mode), "size": e.size, "target": e.target})).collect::<Vec<_>>()}));
            return;
        }
        let p = &g.provenance;
        outln!("key:         {}", g.key);
        outln!("generation:  {}", g.generation);
        outln!("written:     {} by {}", time(p.time), p.writer);
        match &p.base {
            Some(b) => outln!("based on:    {} generation {}", b.key, b.generation),
            None => outln!("based on:    nothing (first commit or full upload)"),
        }
        if let Some(n) = &p.note {
            outln!("note:        {n}");
        }
        outln!(
            "contents:    {}, {} dirs, {} symlinks, {}",
            files(g.totals.files),
            g.totals.dirs,
            g.totals.symlinks,
            human_bytes(g.totals.bytes)
        );
        if !entries.is_empty() {
            outln!("");
            for e in entries {
                match e.kind {
                    Kind::Dir => outln!("d {:>5o} {:>12}  {}/", e.mode, "", e.path),
                    Kind::File => outln!("f {:>5o} {:>12}  {}", e.mode, e.size, e.path),
                    Kind::Symlink => outln!(
                        "l {:>5o} {:>12}  {} -> {}",
                        e.mode,
                        "",
                        e.path,
                        e.target.as_deref().unwrap_or("")
                    ),
                }
            }
        }
    }

    pub fn gc(&self, scope: &str, r: &GcReport) {
        let verb = if r.dry_run { "would delete" } else { "deleted" };
        let mut text = format!(
            "scope {scope}: {verb} {} and {} packs ({}); kept {} packs ({}); {} young packs left for later",
            generations(r.generations_deleted as u64),
            r.packs_deleted,
            human_bytes(r.bytes_freed),
            r.packs_kept,
            human_bytes(r.bytes_kept),
            r.packs_young
        );
        if !r.keys_expired.is_empty() {
            text += &format!(
                "\n  expired (unused past TTL): {}",
                r.keys_expired.join(", ")
            );
        }
        if !r.keys_evicted.is_empty() {
            text += &format!(
                "\n  evicted (scope over budget): {}",
                r.keys_evicted.join(", ")
            );
        }
        if let Some(why) = &r.sweep_skipped {
            text += &format!("\n  packs not swept: {why}");
        }
        self.line(&text, &serde_json::json!({"scope": scope, "gc": r}));
    }
}

/// A bar's time left: "-" until there is a rate to estimate it from (indicatif's own estimate
/// shows 0s, or hours, for the first moments of a phase).
fn eta_text(pos: u64, elapsed: std::time::Duration, eta: std::time::Duration) -> String {
    if pos == 0 || elapsed < std::time::Duration::from_secs(1) {
        "-".into()
    } else {
        format!("{:#}", indicatif::HumanDuration(eta))
    }
}

/// Progress of the engine's long operations: a bar when stderr is a terminal, else (a CI log)
/// a plain line every few seconds (`CACHEVOL_PROGRESS_INTERVAL`, default 5) naming the cache,
/// and one when the phase ends.
pub struct Bars {
    enabled: bool,
    plain: Option<std::time::Duration>,
    bar: Mutex<Option<ProgressBar>>,
    /// The cache the next phase is about (set by the command before each restore or commit).
    cache: Mutex<String>,
    line: Mutex<Option<Plain>>,
    /// When the last line about a directory walk was printed.
    scan_printed: Mutex<Option<std::time::Instant>>,
}

/// The state of a plain progress line.
struct Plain {
    phase: String,
    total: u64,
    done: u64,
    files_total: u64,
    files_done: u64,
    started: std::time::Instant,
    printed: std::time::Instant,
}

impl Plain {
    fn text(&self, cache: &str, end: bool) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = human_bytes((self.done as f64 / secs) as u64);
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        let what = if cache.is_empty() {
            String::new()
        } else {
            format!("{cache}: ")
        };
        let files = |n: u64| if n == 1 { "file" } else { "files" };
        if end {
            format!(
                "cachevol: {what}{} done: {}, {} {} in {secs:.1}s ({rate}/s)",
                self.phase,
                human_bytes(self.done),
                self.files_done,
                files(self.files_done)
            )
        } else {
            format!(
                "cachevol: {what}{} {} / {} ({pct}%), {} / {} {}, {rate}/s, {secs:.0}s",
                self.phase,
                human_bytes(self.done),
                human_bytes(self.total),
                self.files_done,
                self.files_total,
                files(self.files_total)
            )
        }
    }
}

impl Bars {
    /// `bars`: draw terminal bars; `plain`: otherwise print plain lines (not quiet, no tty).
    pub fn new(bars: bool, plain: bool) -> Bars {
        let interval = std::env::var("CACHEVOL_PROGRESS_INTERVAL")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s >= 0.0)
            .map(std::time::Duration::from_secs_f64)
            .unwrap_or(std::time::Duration::from_secs(5));
        Bars {
            enabled: bars,
            plain: (!bars && plain).then_some(interval),
            bar: Mutex::new(None),
            cache: Mutex::new(String::new()),
            line: Mutex::new(None),
            scan_printed: Mutex::new(None),
        }
    }

    /// Names the cache the following phases are about.
    pub fn cache(&self, key: &str) {
        *self.cache.lock().expect("not poisoned") = key.to_string();
    }

    fn cache_name(&self) -> String {
        self.cache.lock().expect("not poisoned").clone()
    }
}

impl Progress for Bars {
    fn start(&self, phase: &str, total: u64) {
        if self.plain.is_some() {
            let now = std::time::Instant::now();
            *self.line.lock().expect("not poisoned") = Some(Plain {
                phase: phase.to_string(),
                total,
                done: 0,
                files_total: 0,
                files_done: 0,
                started: now,
                printed: now,
            });
        }
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .with_key(
                "eta",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&eta_text(s.pos(), s.elapsed(), s.eta()));
                },
            )
            .progress_chars("=> "),
        );
        let cache = self.cache_name();
        bar.set_message(if cache.is_empty() {
            phase.to_string()
        } else {
            format!("{cache} {phase}")
        });
        *self.bar.lock().expect("not poisoned") = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(interval) = self.plain {
            let mut line = self.line.lock().expect("not poisoned");
            if let Some(p) = line.as_mut() {
                p.done += bytes;
                if p.printed.elapsed() >= interval {
                    p.printed = std::time::Instant::now();
                    errln!("{}", p.text(&self.cache_name(), false));
                }
            }
        }
        if let Some(b) = self.bar.lock().expect("not poisoned").as_ref() {
            b.inc(bytes);
        }
    }

    fn files(&self, total_files: u64) {
        if let Some(p) = self.line.lock().expect("not poisoned").as_mut() {
            p.files_total = total_files;
        }
    }

    fn file_done(&self) {
        if let Some(p) = self.line.lock().expect("not poisoned").as_mut() {
            p.files_done += 1;
        }
    }

    fn scanning(&self, entries: u64) {
        if !self.enabled && self.plain.is_none() {
            return;
        }
        let interval = self.plain.unwrap_or(std::time::Duration::from_secs(1));
        let mut last = self.scan_printed.lock().expect("not poisoned");
        if last.is_none_or(|t| t.elapsed() >= interval) {
            *last = Some(std::time::Instant::now());
            let cache = self.cache_name();
            let what = if cache.is_empty() {
                String::new()
            } else {
                format!("{cache}: ")
            };
            errln!("cachevol: {what}scanning the directory: {entries} entries so far");
        }
    }

    fn finish(&self) {
        if let Some(p) = self.line.lock().expect("not poisoned").take() {
            // A phase that took long enough to report on says it ended.
            if p.started.elapsed() >= self.plain.unwrap_or_default() {
                errln!("{}", p.text(&self.cache_name(), true));
            }
        }
        if let Some(b) = self.bar.lock().expect("not poisoned").take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bar_has_no_eta_before_it_has_a_rate() {
        let s = Duration::from_secs;
        assert_eq!(eta_text(0, s(5), s(0)), "-", "nothing done yet");
        assert_eq!(eta_text(10, Duration::from_millis(200), s(86_400)), "-");
        assert_eq!(eta_text(50, s(2), s(2)), "2s");
    }
}
