//! The `cachevol` command line: the engine for a person or a CI step, with no cluster needed.
//! Exit codes mean something (see `ExitCode`), `--json` prints machine-readable reports, and
//! long operations draw progress bars when stderr is a terminal.

// The benchmark is a tool for working on cachevol, not part of the product: only with the
// `bench` feature (docs/benchmarks.md).
#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "bench")]
mod bench_node;
mod failure;
mod keys;
mod output;
mod run;
mod signals;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::daemon::{self, RetentionArgs};
use crate::engine::{self, CommitOptions, Engine, Error, Merge, Store};
use crate::spec::parse_size;
use failure::Failure;
use output::{Bars, Out};

/// Exit codes of `cachevol` (besides `run`, which exits with its command's status).
pub mod exit {
    pub const OK: i32 = 0;
    /// Any other failure (I/O on the local side, a bug).
    pub const ERROR: i32 = 1;
    /// The command line is wrong (also clap's own code).
    pub const USAGE: i32 = 2;
    /// No such cache or generation.
    pub const NOT_FOUND: i32 = 3;
    /// Refused on purpose: fenced, over budget, too many conflicts, lock unavailable.
    pub const REFUSED: i32 = 4;
    /// The store holds something invalid: a corrupt, hostile or too new snapshot.
    pub const CORRUPT: i32 = 5;
    /// The store could not be reached, timed out, or gave no credentials to use it with.
    pub const UNAVAILABLE: i32 = 6;
}

/// `--version`: the package version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CACHEVOL_COMMIT"),
    ")"
);

/// The help heading of the options every command takes.
const GLOBAL: &str = "Global options";

#[derive(Parser, Debug)]
#[command(
    name = "cachevol",
    version = VERSION,
    about = "Persistent, incremental cache volumes for CI",
    long_about = None
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Object store URL: file:///dir or an absolute path (default: ~/.cache/cachevol/store),
    /// s3://bucket/prefix, gs://bucket/prefix, az://container/prefix. Credentials come from
    /// the environment.
    #[arg(long, global = true, env = "CACHEVOL_STORE", help_heading = GLOBAL)]
    store: Option<String>,
    /// Scope of the caches (a tenant: caches of different scopes share nothing).
    #[arg(long, global = true, env = "CACHEVOL_SCOPE", default_value = "default", help_heading = GLOBAL)]
    scope: String,
    /// Where records of restored directories are kept (default: ~/.local/state/cachevol).
    #[arg(long, global = true, env = "CACHEVOL_STATE_DIR", help_heading = GLOBAL)]
    state_dir: Option<PathBuf>,
    /// Print one JSON object per report on stdout instead of text (with run, the command's
    /// stdout goes to stderr).
    #[arg(long, global = true, help_heading = GLOBAL)]
    json: bool,
    /// No progress bars and no informational lines.
    #[arg(long, short, global = true, help_heading = GLOBAL)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Restore caches, run a command, commit the caches per policy and the command's status.
    Run(run::RunArgs),
    /// Restore the newest snapshot of KEY (or of a restore key) into DIR.
    Restore {
        /// The cache key (letters, digits, '.', '_', '-'; at most 128), which may contain
        /// {hashFiles:GLOB[,GLOB…]}.
        key: String,
        /// The directory to restore into (created if missing).
        dir: PathBuf,
        /// Fallback keys, tried in order when KEY has no snapshot: a key of exactly that name,
        /// else the most recently committed key starting with it.
        #[arg(long = "restore-key")]
        restore_keys: Vec<String>,
        #[command(flatten)]
        hit: HitArgs,
        #[command(flatten)]
        files: FilesRoot,
        /// Advanced (what a node does on its own): write the snapshot as one read-only EROFS
        /// image at the path DIR instead of a tree (`mount -t erofs -o ro,loop DIR MNT`).
        #[arg(long, hide = true)]
        image: bool,
        /// With --image: every entry's group is GID and modes are widened for it (a pod's
        /// fsGroup).
        #[arg(long, hide = true, value_name = "GID", requires = "image")]
        image_group: Option<u32>,
    },
    /// Commit DIR as the next generation of KEY (uploads only what changed).
    Commit {
        /// The cache key (letters, digits, '.', '_', '-'; at most 128), which may contain
        /// {hashFiles:GLOB[,GLOB…]}.
        key: String,
        /// The directory whose tree becomes the next generation.
        dir: PathBuf,
        #[command(flatten)]
        opts: CommitArgs,
        #[command(flatten)]
        files: FilesRoot,
    },
    /// List the caches of the scope.
    Ls,
    /// Show a generation: provenance, totals and files.
    Show {
        /// The cache key.
        key: String,
        /// The generation to show (default: the newest).
        #[arg(long)]
        generation: Option<u64>,
        /// Do not list the files.
        #[arg(long)]
        summary: bool,
    },
    /// Apply retention and delete what nothing references.
    Gc(GcArgs),
    /// Make generation N the newest again (as a new generation; history is kept).
    Rollback {
        /// The cache key.
        key: String,
        /// The generation whose tree the new generation gets (see `cachevol show KEY`).
        #[arg(long)]
        to: u64,
    },
    /// Delete a cache: every generation of KEY (packs go at the next gc, after its grace).
    Wipe {
        /// The cache key.
        key: String,
        /// Needed: wiping cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Fetch every pack of a generation and check every chunk's hash.
    Verify {
        /// The cache key.
        key: String,
        /// The generation to verify (default: the newest).
        #[arg(long)]
        generation: Option<u64>,
    },
    /// Measure restore and commit against tar+zstd on real trees.
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
    /// Serve the CSI Identity and Controller services (beside csi-provisioner).
    ///
    /// --store is the store of volumes whose StorageClass names none; --state-dir keeps the
    /// volume records (default /var/lib/cachevol-controller). With --cluster, the replicas
    /// elect a leader with a Lease, and only the leader collects garbage.
    Controller(daemon::controller::ControllerArgs),
    /// Serve the CSI Identity and Node services (the DaemonSet beside kubelet).
    ///
    /// --store is the store of volumes whose context names none; --state-dir keeps bases,
    /// views and records (default /var/lib/cachevol). Without a Kubernetes API, a volume is
    /// committed when it is unpublished.
    Node(daemon::node::NodeArgs),
}

impl Command {
    /// The subcommand's name, as JSON reports give it.
    fn name(&self) -> &'static str {
        match self {
            Command::Run(_) => "run",
            Command::Restore { .. } => "restore",
            Command::Commit { .. } => "commit",
            Command::Ls => "ls",
            Command::Show { .. } => "show",
            Command::Gc(_) => "gc",
            Command::Rollback { .. } => "rollback",
            Command::Wipe { .. } => "wipe",
            Command::Verify { .. } => "verify",
            #[cfg(feature = "bench")]
            Command::Bench(_) => "bench",
            Command::Controller(_) => "controller",
            Command::Node(_) => "node",
        }
    }

    /// Long-running servers log at info by default; one-shot commands only warn.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Controller(_) | Command::Node(_) => "info",
            _ => "warn",
        }
    }
}

/// What a script asks of a restore besides restoring.
#[derive(Args, Debug, Clone, Copy)]
pub struct HitArgs {
    /// Say what would be restored (hit level, key, generation) and restore nothing.
    #[arg(long)]
    lookup_only: bool,
    /// Exit 3 when neither the key nor any restore key has a snapshot (nothing is restored and,
    /// for run, the command does not run).
    #[arg(long)]
    fail_on_miss: bool,
}

/// Where the files of a key's `{hashFiles:…}` are (see `keys`).
#[derive(Args, Debug, Clone)]
pub struct FilesRoot {
    /// The directory the globs of {hashFiles:GLOB} in a key are relative to (default: the
    /// working directory).
    #[arg(long, value_name = "DIR")]
    files_root: Option<PathBuf>,
}

impl FilesRoot {
    /// `key` with its `{hashFiles:…}` replaced by their digests, the command's cache
    /// directories `caches` not hashed.
    pub fn expand(&self, key: &str, caches: &[&Path]) -> Result<String, Failure> {
        match &self.files_root {
            Some(root) => keys::expand(key, root, caches),
            None => {
                let cwd = std::env::current_dir()
                    .map_err(engine::io("read the working directory", Path::new(".")))?;
                keys::expand(key, &cwd, caches)
            }
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct CommitArgs {
    /// What happens when another commit to the key landed first.
    #[arg(long, value_enum, default_value_t = Merge::Replace)]
    merge: Merge,
    /// Refuse the commit when the tree is larger than this (e.g. 10Gi, 500M).
    #[arg(long, value_parser = parse_size)]
    budget: Option<u64>,
    /// Free text recorded as the writer of the generation (default: user@host).
    #[arg(long, env = "CACHEVOL_WRITER")]
    writer: Option<String>,
    /// Only create the generation right after the restored one; refuse otherwise.
    #[arg(long)]
    fence: bool,
    /// A note recorded with the generation (e.g. a pipeline URL).
    #[arg(long)]
    note: Option<String>,
}

impl CommitArgs {
    fn options(&self) -> CommitOptions {
        CommitOptions {
            merge: self.merge,
            fence: self.fence,
            budget: self.budget,
            writer: self.writer.clone().unwrap_or_else(engine::default_writer),
            note: self.note.clone(),
            group_widened: false,
        }
    }
}

#[derive(Args, Debug)]
struct GcArgs {
    /// Report what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    retention: RetentionArgs,
    /// Collect every scope of the store, not only --scope.
    #[arg(long)]
    all_scopes: bool,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

impl Global {
    pub fn store_url(&self) -> String {
        self.store.clone().unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home().join(".cache"));
            format!("file://{}", base.join("cachevol").join("store").display())
        })
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home().join(".local").join("state"))
                .join("cachevol")
        })
    }

    fn engine(&self, bars: &Arc<Bars>) -> Result<Engine, Error> {
        let store = Store::open(&self.store_url())?;
        Ok(Engine::new(store, &self.scope, self.state_dir())?.with_progress(bars.clone()))
    }
}

/// The exit code for an engine error.
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::InvalidName { .. } | Error::InvalidStore { .. } | Error::NoSuchBucket { .. } => {
            exit::USAGE
        }
        Error::NoSuchGeneration { .. } | Error::NoSuchKey { .. } => exit::NOT_FOUND,
        Error::Fenced { .. }
        | Error::OverBudget { .. }
        | Error::TooManyConflicts { .. }
        | Error::InFlightLapsed { .. }
        | Error::PacksGone { .. }
        | Error::Lock(_)
        | Error::Unsupported { .. } => exit::REFUSED,
        Error::Corrupt { .. } | Error::UnsupportedVersion { .. } => exit::CORRUPT,
        // The shell's convention for a process ended by a signal, as if the signal had killed
        // it: CI runners and `wait` read 130 and 143 as "interrupted" and "terminated".
        Error::Cancelled {
            signal: Some(sig), ..
        } => 128 + sig,
        e if e.is_store_unavailable() => exit::UNAVAILABLE,
        _ => exit::ERROR,
    }
}

/// Entry point of the binary: returns the process exit code.
pub fn main() -> i32 {
    // The benchmark's measuring wrapper: no logging, no runtime, no command line of its own.
    #[cfg(feature = "bench")]
    if let Some(code) = bench::child_main() {
        return code;
    }
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let (format, bad_format) = match &cli.command {
        Command::Controller(a) => (a.cluster.log_format, None),
        Command::Node(a) => (a.cluster.log_format, None),
        _ => daemon::logs::LogFormat::from_env(),
    };
    daemon::logs::init(cli.command.default_log_level(), format);
    if let Some(why) = bad_format {
        tracing::warn!("{why}");
    }
    // One TLS crypto provider for the whole process (S3/GCS/Azure and the Kubernetes API).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let out = Out::new(cli.global.json, cli.global.quiet, cli.command.name());
    match rt.block_on(dispatch(cli, &out)) {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            e.exit_code()
        }
    }
}

/// The command line, with the options only the CLI commands use hidden from the daemons' help;
/// or, when it is wrong, the exit status after saying so.
fn parse() -> Result<Cli, i32> {
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = Cli::command();
    // Propagates the global options into every subcommand, so they can be hidden in some.
    cmd.build();
    for daemon in ["node", "controller"] {
        // mut_args keeps the arguments in place (mut_arg would reorder them after the build
        // indexed them, and --help would stop working).
        cmd = cmd.mut_subcommand(daemon, |c| {
            c.mut_args(|a| {
                let cli_only = CLI_ONLY.contains(&a.get_id().as_str());
                a.hide(cli_only)
            })
        });
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    cmd.try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(|e| usage_error(e, &args, &names))
}

/// A command line clap refused: its text on stderr as clap prints it, and with `--json` the
/// failure report on stdout too (a script reading stdout learns of it as of any other failure).
/// `--help` and `--version` stay text.
fn usage_error(e: clap::Error, args: &[std::ffi::OsString], commands: &[String]) -> i32 {
    use clap::error::ErrorKind;
    // Before "--", which starts run's command (whose own --json is not ours).
    let ours = args
        .iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .filter_map(|a| a.to_str());
    let json = ours.clone().any(|a| a == "--json");
    let code = e.exit_code();
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit()
    }
    let command = ours.clone().find(|a| commands.iter().any(|c| c == a));
    let message = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "a command is required (cachevol --help lists them)".to_string()
    } else {
        // clap's first paragraph, without its "error: " and the usage and --help tips after it.
        let text = e.render().to_string();
        let first = text.split("\n\n").next().unwrap_or_default();
        first.trim().trim_start_matches("error: ").to_string()
    };
    let _ = e.print();
    output::say(format_args!(
        "{}",
        output::json_failure(command, code, failure::kind_of(code), &message, None)
    ));
    code
}

/// Global options that `node` and `controller` ignore (they serve volumes of any scope and
/// print logs, not reports).
const CLI_ONLY: &[&str] = &["scope", "json", "quiet"];

async fn dispatch(cli: Cli, out: &Out) -> Result<i32, Failure> {
    let g = cli.global;
    let bars = Arc::new(Bars::new(out.bars_enabled(), out.plain_progress()));
    match cli.command {
        Command::Run(args) => run::run(&g, args, out, bars).await,
        #[cfg(feature = "bench")]
        Command::Bench(args) => Ok(bench::run(&g, args, out).await?),
        Command::Node(args) => {
            Ok(daemon::node::run(args, g.store.clone(), g.state_dir.clone()).await)
        }
        Command::Controller(args) => {
            Ok(daemon::controller::run(args, g.store_url(), g.state_dir.clone()).await)
        }
        Command::Restore {
            key,
            dir,
            restore_keys,
            hit,
            files,
            image,
            image_group,
        } => {
            let key = files.expand(&key, &[&dir])?;
            let restore_keys = restore_keys
                .iter()
                .map(|k| files.expand(k, &[&dir]))
                .collect::<Result<Vec<_>, _>>()?;
            let engine = g.engine(&bars)?;
            engine::names::key(&key)?;
            for k in &restore_keys {
                engine::names::key(k)?;
            }
            let source = engine.resolve(&key, &restore_keys).await?;
            output::github_output(
                out,
                &[
                    (
                        "cache-hit".into(),
                        matches!(source, engine::RestoreSource::Key { .. }).to_string(),
                    ),
                    ("cache-primary-key".into(), key.clone()),
                    (
                        "cache-matched-key".into(),
                        output::matched_key(&source).unwrap_or("").into(),
                    ),
                ],
            );
            bars.cache(&key);
            if source == engine::RestoreSource::Miss && hit.fail_on_miss {
                if !out.json() {
                    out.lookup(&key, &restore_keys, &source);
                }
                let e = Failure::Miss(format!(
                    "{key}: cache miss (--fail-on-miss): no snapshot of {}",
                    output::tried(&key, &restore_keys)
                ));
                out.error_with(&e, Some(output::found(&key, &restore_keys, &source)));
                return Ok(e.exit_code());
            }
            if hit.lookup_only {
                out.lookup(&key, &restore_keys, &source);
            } else if image {
                let opts = engine::ImageOptions {
                    group: image_group,
                    ..Default::default()
                };
                let report = engine.restore_image(source, &dir, opts).await?;
                out.image(&key, &restore_keys, &dir, &report);
            } else {
                let report = engine.restore_source(source, &dir).await?;
                out.restore(&key, &restore_keys, &dir, &report);
            }
            Ok(exit::OK)
        }
        Command::Commit {
            key,
            dir,
            opts,
            files,
        } => {
            let key = files.expand(&key, &[&dir])?;
            // SIGINT or SIGTERM cancel the commit (Error::Cancelled: exit 130 or 143, nothing
            // committed) unless it already created its generation, which is then reported.
            let stop = signals::Stop::watch(out);
            let engine = g.engine(&bars)?.with_cancel(stop.cancel());
            bars.cache(&key);
            let report = engine.commit(&key, &dir, &opts.options()).await?;
            out.commit(&report);
            Ok(exit::OK)
        }
        Command::Ls => {
            let engine = g.engine(&bars)?;
            out.keys(engine.scope(), &engine.list_keys().await?);
            Ok(exit::OK)
        }
        Command::Show {
            key,
            generation,
            summary,
        } => {
            let engine = g.engine(&bars)?;
            let gen = engine.show(&key, generation).await?;
            let entries = if summary {
                vec![]
            } else {
                engine.load_entries(&gen).await?
            };
            out.show(&gen, &entries);
            Ok(exit::OK)
        }
        Command::Gc(a) => {
            let policy = a.retention.policy(a.dry_run);
            let store = Store::open(&g.store_url())?;
            let scopes = if a.all_scopes {
                store.scopes().await?
            } else {
                vec![g.scope.clone()]
            };
            for scope in scopes {
                let engine = Engine::new(store.clone(), &scope, g.state_dir())?;
                out.gc(&scope, &engine.gc(&policy).await?);
            }
            Ok(exit::OK)
        }
        Command::Rollback { key, to } => {
            let engine = g.engine(&bars)?;
            let gen = engine.rollback(&key, to, &engine::default_writer()).await?;
            out.line(
                &format!("{key}: generation {gen} now holds the tree of generation {to}"),
                &serde_json::json!({"key": key, "generation": gen, "rollback_of": to}),
            );
            Ok(exit::OK)
        }
        Command::Wipe { key, yes } => {
            if !yes {
                return Err(Failure::Usage(format!(
                    "wipe deletes every generation of {key:?} in scope {:?}; run again with --yes",
                    g.scope
                )));
            }
            let engine = g.engine(&bars)?;
            let n = engine.wipe(&key).await?;
            out.line(
                &format!(
                    "{key}: {} deleted; `cachevol gc` deletes their packs after the grace period",
                    output::generations(n as u64)
                ),
                &serde_json::json!({"key": key, "generations_deleted": n}),
            );
            Ok(exit::OK)
        }
        Command::Verify { key, generation } => {
            let engine = g.engine(&bars)?;
            let r = engine.verify(&key, generation).await?;
            out.line(
                &format!(
                    "{}: generation {} verified: {} packs, {} chunks, {} in {:.2}s",
                    r.key,
                    r.generation,
                    r.packs,
                    r.chunks,
                    output::human_bytes(r.bytes),
                    r.seconds
                ),
                &r,
            );
            Ok(exit::OK)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
