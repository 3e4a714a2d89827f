//! Settings as people write them: sizes (`10Gi`), durations (`30d`) and the retention rules
//! shared by `cachevol gc` and the controller's periodic GC. The command-line flags that carry
//! them live with the commands (`cli`, `daemon`); the values and their meaning live here.

use std::time::Duration;

use crate::engine::GcPolicy;

/// Parses `10Gi`, `500M`, `1.5G`, `4096` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "k" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024f64.powi(2),
        "Gi" | "GiB" => 1024f64.powi(3),
        "Ti" | "TiB" => 1024f64.powi(4),
        u => {
            return Err(format!(
                "unknown size unit {u:?} (use K, M, G, T, Ki, Mi, Gi, Ti)"
            ))
        }
    };
    Ok((n * mult) as u64)
}

/// Parses `90s`, `30d`, `1h 30m` (humantime's syntax) into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Retention rules of a store's scopes (DESIGN §1, "Retention").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Generations kept per key.
    pub keep_last: usize,
    /// Drop keys unused for this long; zero disables.
    pub ttl: Duration,
    /// Evict least recently used keys while the scope stores more than this many bytes.
    pub scope_budget: Option<u64>,
    /// Unreferenced packs younger than this are kept (in-flight commits).
    pub grace: Duration,
}

impl Retention {
    /// The engine's GC policy for these rules.
    pub fn policy(&self, dry_run: bool) -> GcPolicy {
        GcPolicy {
            keep_last: self.keep_last,
            ttl: (!self.ttl.is_zero()).then_some(self.ttl),
            scope_budget: self.scope_budget,
            grace: self.grace,
            dry_run,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5G").unwrap(), 1_500_000_000);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn a_zero_ttl_turns_expiry_off() {
        let r = Retention {
            keep_last: 3,
            ttl: Duration::ZERO,
            scope_budget: Some(1 << 30),
            grace: Duration::from_secs(3600),
        };
        let p = r.policy(true);
        assert_eq!(p.ttl, None);
        assert_eq!(
            (p.keep_last, p.scope_budget, p.dry_run),
            (3, Some(1 << 30), true)
        );
        let p = Retention {
            ttl: Duration::from_secs(60),
            ..r
        }
        .policy(false);
        assert_eq!(p.ttl, Some(Duration::from_secs(60)));
        assert!(!p.dry_run);
    }
}
