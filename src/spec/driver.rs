//! The driver's name (`--driver-name`) and the cluster-wide names derived from it, so that two
//! installs of cachevol in one cluster (two stores, a canary) never touch each other's objects.
//!
//! The default name keeps the exact names that installs before the flag made (Lease names, the
//! lock label, Events' reporting component), so an upgraded cluster finds its Leases again.
//! Claim annotations (`cachevol.dev/key`, ...) are the users' interface, not the driver's
//! identity: they stay `cachevol.dev/*` whatever the driver is called.

use std::fmt;

/// The default driver name: a StorageClass's `provisioner` and the CSIDriver object's name.
pub const DEFAULT: &str = "cachevol.dev";

/// A CSI driver name, checked as GetPluginInfo's name must be (CSI spec: at most 63 characters,
/// beginning and ending with an alphanumeric, dashes, dots and alphanumerics between) and as
/// Kubernetes takes it for a CSIDriver object (its lower-case form a DNS-1123 subdomain: each
/// dot-separated part begins and ends with an alphanumeric).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverName(String);

impl Default for DriverName {
    fn default() -> DriverName {
        DriverName(DEFAULT.to_string())
    }
}

impl fmt::Display for DriverName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DriverName {
    type Err = String;

    fn from_str(s: &str) -> Result<DriverName, String> {
        DriverName::parse(s)
    }
}

impl DriverName {
    /// `s` as a driver name, or why it is not one.
    pub fn parse(s: &str) -> Result<DriverName, String> {
        if s.is_empty() {
            return Err("a driver name cannot be empty".into());
        }
        if s.len() > 63 {
            return Err(format!(
                "{s:?} is {} characters long; a driver name has at most 63",
                s.len()
            ));
        }
        for part in s.split('.') {
            let ok = !part.is_empty()
                && part.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                && part.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ok {
                return Err(format!(
                    "{s:?} is not a driver name: dot-separated parts of letters, digits and \
                     dashes, each beginning and ending with a letter or digit (e.g. \
                     canary.cachevol.dev)"
                ));
            }
        }
        Ok(DriverName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT
    }

    /// What the names of this driver's Leases begin with: `cachevol` for the default driver,
    /// else `cachevol-` and the name in lower case with dots as dashes (`canary.cachevol.dev` →
    /// `cachevol-canary-cachevol-dev`), as csi-provisioner names its own leader Lease. Names
    /// that differ only there (`a.b`, `a-b`, `A.b`) share a prefix, as they share
    /// csi-provisioner's Lease: such installs cannot run in one namespace anyway.
    pub fn lease_prefix(&self) -> String {
        if self.is_default() {
            return "cachevol".into();
        }
        let slug: String = self
            .0
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!("cachevol-{slug}")
    }

    /// The label on this driver's lock Leases, which its controller's GC lists:
    /// `<driver name in lower case>/lock` (`cachevol.dev/lock` for the default driver). A label
    /// key's prefix is a DNS subdomain, which the lower-cased name is.
    pub fn lock_label(&self) -> String {
        format!("{}/lock", self.0.to_ascii_lowercase())
    }

    /// The Events' reporting component of `component` (e.g. `cachevol-node`):
    /// `<driver name>/<component>`.
    pub fn reporting_component(&self, component: &str) -> String {
        format!("{}/{component}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_the_csi_spec_and_kubernetes_take_them() {
        for good in [
            "cachevol.dev",
            "canary.cachevol.dev",
            "a",
            "Cachevol.Example-1.com",
            &"a".repeat(63),
        ] {
            assert_eq!(DriverName::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            &"a".repeat(64),
            "-cachevol.dev",
            "cachevol.dev-",
            ".cachevol.dev",
            "cachevol.dev.",
            "cachevol..dev",
            "cachevol.-dev",
            "cachevol/dev",
            "cachevol_dev",
            "cache vol",
            "cachévol.dev",
        ] {
            assert!(DriverName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_default_keeps_the_names_of_earlier_installs() {
        let d = DriverName::default();
        assert_eq!(d.as_str(), DEFAULT);
        assert!(d.is_default());
        assert_eq!(d.lease_prefix(), "cachevol");
        assert_eq!(d.lock_label(), "cachevol.dev/lock");
        assert_eq!(
            d.reporting_component("cachevol-node"),
            "cachevol.dev/cachevol-node"
        );
    }

    #[test]
    fn another_driver_gets_names_of_its_own() {
        let d = DriverName::parse("Canary.cachevol.dev").unwrap();
        assert!(!d.is_default());
        assert_eq!(d.lease_prefix(), "cachevol-canary-cachevol-dev");
        assert_eq!(d.lock_label(), "canary.cachevol.dev/lock");
        assert_eq!(
            d.reporting_component("cachevol-node"),
            "Canary.cachevol.dev/cachevol-node"
        );
        // A driver called `cachevol` must not take the default's Leases.
        let short = DriverName::parse("cachevol").unwrap();
        assert_ne!(short.lease_prefix(), DriverName::default().lease_prefix());
    }
}
