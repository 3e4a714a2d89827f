//! Where the process's logs go and how they look: stderr, filtered by `CACHEVOL_LOG` (an
//! `EnvFilter`), as text — coloured only when stderr is a terminal, so pod logs and CI logs carry
//! no escape codes — or as one JSON object a line for log pipelines (`--log-format json`, or
//! `CACHEVOL_LOG_FORMAT=json` for any command).

use std::io::IsTerminal;

/// The env var that picks the log format when no flag does.
pub const LOG_FORMAT_ENV: &str = "CACHEVOL_LOG_FORMAT";

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, fields (message included).
    Json,
}

impl LogFormat {
    /// From `CACHEVOL_LOG_FORMAT` (text when unset or unknown, with a warning once logging is
    /// up) — for the commands without a `--log-format` flag.
    pub fn from_env() -> (LogFormat, Option<String>) {
        match std::env::var(LOG_FORMAT_ENV) {
            Err(_) => (LogFormat::Text, None),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "text" => (LogFormat::Text, None),
                "json" => (LogFormat::Json, None),
                _ => (
                    LogFormat::Text,
                    Some(format!(
                        "{LOG_FORMAT_ENV}={v:?} is neither text nor json: logging as text"
                    )),
                ),
            },
        }
    }
}

/// Installs the process's subscriber: `default_level` unless `CACHEVOL_LOG` says otherwise.
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHEVOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
