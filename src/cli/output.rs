//! What the CLI prints: human lines on stderr/stdout, or one JSON document per report with
//! `--json`; progress bars only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::engine::{
    CommitOutcome, CommitReport, Entry, Error, GcReport, Generation, KeyInfo, Kind, Progress,
    RestoreReport, RestoreSource,
};

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

fn time(unix: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64),
    )
    .to_string()
}

pub struct Out {
    json: bool,
    quiet: bool,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Out {
        Out { json, quiet }
    }

    pub fn bars_enabled(&self) -> bool {
        !self.json && !self.quiet && std::io::stderr().is_terminal()
    }

    /// A text line on stdout, or the value as JSON.
    pub fn line<T: Serialize>(&self, text: &str, value: &T) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string(value).expect("reports serialize")
            );
        } else if !self.quiet {
            println!("{text}");
        }
    }

    /// Informational text on stderr (never mixed into JSON on stdout).
    pub fn info(&self, text: &str) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }

    pub fn warn(&self, text: &str) {
        eprintln!("cachevol: warning: {text}");
    }

    pub fn error(&self, e: &Error) {
        if self.json {
            println!(
                "{}",
                serde_json::json!({"error": e.to_string(), "exit_code": super::exit_code(e)})
            );
        }
        eprintln!("cachevol: error: {e}");
    }

    pub fn restore(&self, key: &str, r: &RestoreReport) {
        let text = match &r.source {
            RestoreSource::Miss => format!("{key}: no snapshot yet, starting empty"),
            RestoreSource::Key { generation, .. }
            | RestoreSource::RestoreKey { generation, .. } => {
                let from = match &r.source {
                    RestoreSource::RestoreKey { key: k, .. } => {
                        format!(" (fallback from restore key {k})")
                    }
                    _ => String::new(),
                };
                format!(
                    "{key}: restored generation {generation}{from}: {} files, {} in {:.2}s ({} fetched)",
                    r.files,
                    human_bytes(r.bytes),
                    r.seconds,
                    human_bytes(r.downloaded)
                )
            }
        };
        self.line(&text, &serde_json::json!({"key": key, "restore": r}));
    }

    pub fn commit(&self, r: &CommitReport) {
        let text = match r.outcome {
            CommitOutcome::Committed { generation } if r.restore_key.is_some() && r.new_chunks == 0 => format!(
                "{}: created key {} from restore key {} as generation {generation}: {} files, {}; no new chunks, {} uploaded (the generation object) in {:.2}s",
                r.key,
                r.key,
                r.restore_key.as_deref().unwrap_or_default(),
                r.files,
                human_bytes(r.bytes),
                human_bytes(r.uploaded),
                r.seconds,
            ),
            CommitOutcome::Committed { generation } => format!(
                "{}: committed generation {generation}: {} files, {}; read {} changed files, uploaded {} in {:.2}s{}",
                r.key,
                r.files,
                human_bytes(r.bytes),
                r.files_read,
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
        println!(
            "{:<32} {:>5} {:>5} {:>9} {:>12}  {:<20}  {:<20}  WRITER",
            "KEY", "GEN", "KEPT", "FILES", "SIZE", "WRITTEN", "LAST USED"
        );
        for k in keys {
            println!(
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
            self.line("", &serde_json::json!({"generation": g, "entries": entries.iter().map(|e| serde_json::json!({"path": e.path, "kind": e.kind, "mode": format!("{:o}", e.mode), "size": e.size, "target": e.target})).collect::<Vec<_>>()}));
            return;
        }
        let p = &g.provenance;
        println!("key:         {}", g.key);
        println!("generation:  {}", g.generation);
        println!("written:     {} by {}", time(p.time), p.writer);
        match &p.base {
            Some(b) => println!("based on:    {} generation {}", b.key, b.generation),
            None => println!("based on:    nothing (first commit or full upload)"),
        }
        if let Some(n) = &p.note {
            println!("note:        {n}");
        }
        println!(
            "contents:    {} files, {} dirs, {} symlinks, {}",
            g.totals.files,
            g.totals.dirs,
            g.totals.symlinks,
            human_bytes(g.totals.bytes)
        );
        if !entries.is_empty() {
            println!();
            for e in entries {
                match e.kind {
                    Kind::Dir => println!("d {:>5o} {:>12}  {}/", e.mode, "", e.path),
                    Kind::File => println!("f {:>5o} {:>12}  {}", e.mode, e.size, e.path),
                    Kind::Symlink => println!(
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
            "scope {scope}: {verb} {} generations and {} packs ({}); kept {} packs ({}); {} young packs left for later",
            r.generations_deleted,
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

/// Progress bars for the engine's long operations.
pub struct Bars {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub fn new(enabled: bool) -> Bars {
        Bars {
            enabled,
            bar: Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn start(&self, phase: &str, total: u64) {
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(phase.to_string());
        *self.bar.lock().expect("not poisoned") = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = self.bar.lock().expect("not poisoned").as_ref() {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().expect("not poisoned").take() {
            b.finish_and_clear();
        }
    }
}
