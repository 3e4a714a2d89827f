//! What a cachevol volume is: which cache (store, scope, key, restore keys) and how it is used
//! (mode, policy, commit-on, merge, budget). The controller builds it from StorageClass
//! parameters in CreateVolume and hands it to the node as the volume's `volume_context`; the node
//! reads it back from there. The attribute names are the contract between the two.

use std::collections::{BTreeMap, HashMap};

use crate::engine::store::{redact_url, StoreUrl};
use crate::engine::{names, Merge};

use super::Error;

/// `volume_context` keys (the node reads these).
pub mod attr {
    pub const STORE: &str = "store";
    pub const SCOPE: &str = "scope";
    pub const KEY: &str = "key";
    /// Comma-separated, in the order they are tried; empty when there are none.
    pub const RESTORE_KEYS: &str = "restore-keys";
    pub const MODE: &str = "mode";
    pub const POLICY: &str = "policy";
    pub const COMMIT_ON: &str = "commit-on";
    pub const MERGE: &str = "merge";
    /// Bytes; absent when the claim asked for no size.
    pub const BUDGET: &str = "budget";
}

/// StorageClass parameter names (CreateVolume `parameters`). Two-word names are accepted in
/// camelCase, as Kubernetes parameters usually are, and in the kebab-case of the annotations.
pub mod param {
    pub const STORE: &str = "store";
    pub const SCOPE: &str = "scope";
    pub const KEY: &str = "key";
    pub const RESTORE_KEYS: &[&str] = &["restoreKeys", "restore-keys"];
    pub const MODE: &str = "mode";
    pub const POLICY: &str = "policy";
    pub const COMMIT_ON: &[&str] = &["commitOn", "commit-on"];
    pub const MERGE: &str = "merge";
    /// Added by csi-provisioner when run with `--extra-create-metadata`.
    pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
    pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
    /// Keys under this prefix belong to the Kubernetes sidecars, never to cachevol.
    pub const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";
    /// `scope` values with a meaning of their own; anything else is a literal scope name.
    pub const SCOPE_NAMESPACE: &str = "namespace";
    pub const SCOPE_CLUSTER: &str = "cluster";
}

/// Declares a closed set of string values: parsing names the parameter and the allowed values.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }
        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
            /// Parses `value` of parameter `name`.
            pub fn parse(name: &str, value: &str) -> Result<Self, Error> {
                match value {
                    $($text => Ok($name::$variant),)+
                    other => Err(Error::parameter(
                        name,
                        format!("{other:?} is not one of {}", Self::ALL.join(", ")),
                    )),
                }
            }
        }
    };
}

choice! {
    /// How pods share a cache (DESIGN §1 "Modes").
    Mode {
        /// Pods on one node that mount it at the same time share one live view.
        Shared = "shared",
        /// Every pod gets its own fork of the newest snapshot.
        #[default]
        Private = "private",
        /// At most one pod in the cluster has it mounted.
        Locked = "locked",
    }
}

choice! {
    /// Whether a volume restores, commits, or both.
    Policy {
        #[default]
        PullPush = "pull-push",
        /// Restore only, never commit.
        Pull = "pull",
        /// Start empty, commit.
        Push = "push",
    }
}

choice! {
    /// Which terminal pods commit.
    CommitOn {
        /// Only pods that Succeeded: every container exited 0, nothing killed or deleted them.
        #[default]
        Success = "success",
        /// The job says so itself: it creates `.cachevol-commit` at the volume's root
        /// ([`crate::engine::MARKER`]); the pod's phase does not matter.
        Marker = "marker",
        /// Whatever happened.
        Always = "always",
    }
}

fn parse_merge(name: &str, value: &str) -> Result<Merge, Error> {
    match value {
        "replace" => Ok(Merge::Replace),
        "union" => Ok(Merge::Union),
        other => Err(Error::parameter(
            name,
            format!("{other:?} is not one of replace, union"),
        )),
    }
}

fn merge_str(m: Merge) -> &'static str {
    match m {
        Merge::Replace => "replace",
        Merge::Union => "union",
    }
}

/// The attributes of one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Object store URL, free of credentials (they come from secrets or the environment).
    pub store: String,
    pub scope: String,
    pub key: String,
    pub restore_keys: Vec<String>,
    pub mode: Mode,
    pub policy: Policy,
    pub commit_on: CommitOn,
    pub merge: Merge,
    /// The cache's size budget in bytes (the claim's requested storage).
    pub budget: Option<u64>,
}

impl VolumeSpec {
    /// Builds the spec from CreateVolume `parameters`, the controller's default store and the
    /// budget from `capacity_range`. Every value is validated; errors name the parameter.
    ///
    /// - `store`: default `default_store`.
    /// - `scope`: `namespace` (default) → the claim's namespace; `cluster` → "cluster"; any other
    ///   value is a scope name of its own.
    /// - `key`: default the claim's name.
    ///
    /// The claim's name and namespace come from csi-provisioner's `--extra-create-metadata`;
    /// without them, `key` and a literal `scope` must be given.
    pub fn from_parameters(
        params: &HashMap<String, String>,
        default_store: &str,
        budget: Option<u64>,
    ) -> Result<VolumeSpec, Error> {
        for k in params.keys() {
            if !is_known_parameter(k) {
                return Err(Error::parameter(
                    k,
                    format!(
                        "unknown parameter; cachevol knows {}, {}, {}, {}, {}, {}, {}, {}",
                        param::STORE,
                        param::SCOPE,
                        param::KEY,
                        param::RESTORE_KEYS[0],
                        param::MODE,
                        param::POLICY,
                        param::COMMIT_ON[0],
                        param::MERGE
                    ),
                ));
            }
        }
        let get = |k: &str| params.get(k).map(String::as_str);
        let pvc_name = get(param::PVC_NAME).filter(|s| !s.is_empty());
        let pvc_namespace = get(param::PVC_NAMESPACE).filter(|s| !s.is_empty());

        let store = match get(param::STORE) {
            Some(s) => {
                check_store_url(s).map_err(|why| Error::parameter(param::STORE, why))?;
                s.to_string()
            }
            None => default_store.to_string(),
        };

        let scope = match get(param::SCOPE).unwrap_or(param::SCOPE_NAMESPACE) {
            param::SCOPE_NAMESPACE => pvc_namespace
                .ok_or_else(|| {
                    Error::parameter(
                        param::SCOPE,
                        "\"namespace\" (the default) needs the claim's namespace: run \
                         csi-provisioner with --extra-create-metadata, or set scope to \
                         \"cluster\" or a scope name",
                    )
                })?
                .to_string(),
            param::SCOPE_CLUSTER => "cluster".to_string(),
            literal => literal.to_string(),
        };
        names::scope(&scope).map_err(|e| Error::parameter(param::SCOPE, e.to_string()))?;

        let key = match get(param::KEY) {
            Some(k) => k.to_string(),
            None => pvc_name
                .ok_or_else(|| {
                    Error::parameter(
                        param::KEY,
                        "not given, and the claim's name is unknown (run csi-provisioner \
                         with --extra-create-metadata)",
                    )
                })?
                .to_string(),
        };
        names::key(&key).map_err(|e| Error::parameter(param::KEY, e.to_string()))?;

        let restore_keys = match one_of(params, param::RESTORE_KEYS)? {
            Some((name, v)) => parse_key_list(name, v)?,
            None => Vec::new(),
        };
        let mode = get(param::MODE)
            .map(|v| Mode::parse(param::MODE, v))
            .transpose()?
            .unwrap_or_default();
        let policy = get(param::POLICY)
            .map(|v| Policy::parse(param::POLICY, v))
            .transpose()?
            .unwrap_or_default();
        let commit_on = match one_of(params, param::COMMIT_ON)? {
            Some((name, v)) => CommitOn::parse(name, v)?,
            None => CommitOn::default(),
        };
        let merge = get(param::MERGE)
            .map(|v| parse_merge(param::MERGE, v))
            .transpose()?
            .unwrap_or_default();

        Ok(VolumeSpec {
            store,
            scope,
            key,
            restore_keys,
            mode,
            policy,
            commit_on,
            merge,
            budget,
        })
    }

    /// The `volume_context` of the volume: every attribute, as strings.
    pub fn to_context(&self) -> BTreeMap<String, String> {
        let mut c = BTreeMap::new();
        c.insert(attr::STORE.into(), self.store.clone());
        c.insert(attr::SCOPE.into(), self.scope.clone());
        c.insert(attr::KEY.into(), self.key.clone());
        c.insert(attr::RESTORE_KEYS.into(), self.restore_keys.join(","));
        c.insert(attr::MODE.into(), self.mode.as_str().into());
        c.insert(attr::POLICY.into(), self.policy.as_str().into());
        c.insert(attr::COMMIT_ON.into(), self.commit_on.as_str().into());
        c.insert(attr::MERGE.into(), merge_str(self.merge).into());
        if let Some(b) = self.budget {
            c.insert(attr::BUDGET.into(), b.to_string());
        }
        c
    }

    /// Reads a `volume_context` written by [`VolumeSpec::to_context`], validating every value
    /// again (it comes back from the CO). Keys kubelet adds (`csi.storage.k8s.io/...`, the pod
    /// info) are ignored; `store`, `scope` and `key` are required.
    pub fn from_context(ctx: &HashMap<String, String>) -> Result<VolumeSpec, Error> {
        let need = |k: &'static str| {
            ctx.get(k)
                .map(String::as_str)
                .ok_or_else(|| Error::parameter(k, "missing from the volume context"))
        };
        let store = need(attr::STORE)?;
        check_store_url(store).map_err(|why| Error::parameter(attr::STORE, why))?;
        let scope = need(attr::SCOPE)?;
        names::scope(scope).map_err(|e| Error::parameter(attr::SCOPE, e.to_string()))?;
        let key = need(attr::KEY)?;
        names::key(key).map_err(|e| Error::parameter(attr::KEY, e.to_string()))?;
        let opt = |k: &str| ctx.get(k).map(String::as_str);
        Ok(VolumeSpec {
            store: store.to_string(),
            scope: scope.to_string(),
            key: key.to_string(),
            restore_keys: match opt(attr::RESTORE_KEYS) {
                Some(v) => parse_key_list(attr::RESTORE_KEYS, v)?,
                None => Vec::new(),
            },
            mode: opt(attr::MODE)
                .map(|v| Mode::parse(attr::MODE, v))
                .transpose()?
                .unwrap_or_default(),
            policy: opt(attr::POLICY)
                .map(|v| Policy::parse(attr::POLICY, v))
                .transpose()?
                .unwrap_or_default(),
            commit_on: opt(attr::COMMIT_ON)
                .map(|v| CommitOn::parse(attr::COMMIT_ON, v))
                .transpose()?
                .unwrap_or_default(),
            merge: opt(attr::MERGE)
                .map(|v| parse_merge(attr::MERGE, v))
                .transpose()?
                .unwrap_or_default(),
            budget: opt(attr::BUDGET)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        Error::parameter(attr::BUDGET, format!("{v:?} is not a number of bytes"))
                    })
                })
                .transpose()?,
        })
    }
}

/// Settings users write: claim annotations (`cachevol.dev/<name>`) and inline volume attributes
/// (`<name>`). Users may choose which cache and how they use it, never where it is stored or
/// whose it is: `store` and `scope` belong to administrators (StorageClass, driver flags).
/// The names are the `volume_context` keys ([`attr`]).
pub mod user {
    use super::attr::*;
    pub const ANNOTATION_PREFIX: &str = "cachevol.dev/";
    pub const ALL: &[&str] = &[KEY, RESTORE_KEYS, MODE, POLICY, COMMIT_ON, MERGE];
    /// Settings only an administrator may make.
    pub const ADMIN_ONLY: &[&str] = &[STORE, SCOPE];
    /// kubelet marks inline (CSI ephemeral) volumes with this volume-context key.
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
    /// kubelet's pod info on mount (the CSIDriver's `podInfoOnMount: true`).
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
}

impl VolumeSpec {
    /// Applies one user setting `field` = `value`; `shown` names it in errors as the user wrote
    /// it (`cachevol.dev/mode`, `volumeAttributes.mode`).
    fn apply_user(&mut self, field: &str, value: &str, shown: &str) -> Result<(), Error> {
        match field {
            attr::KEY => {
                names::key(value).map_err(|e| Error::parameter(shown, e.to_string()))?;
                self.key = value.to_string();
            }
            attr::RESTORE_KEYS => self.restore_keys = parse_key_list(shown, value)?,
            attr::MODE => self.mode = Mode::parse(shown, value)?,
            attr::POLICY => self.policy = Policy::parse(shown, value)?,
            attr::COMMIT_ON => self.commit_on = CommitOn::parse(shown, value)?,
            attr::MERGE => self.merge = parse_merge(shown, value)?,
            f if user::ADMIN_ONLY.contains(&f) => {
                return Err(Error::parameter(
                    shown,
                    format!(
                        "not allowed: the cache's {f} is set only by the StorageClass or the \
                         driver's configuration (an administrator), never by a claim or a pod"
                    ),
                ))
            }
            _ => {
                return Err(Error::parameter(
                    shown,
                    format!("unknown setting; users may set {}", user::ALL.join(", ")),
                ))
            }
        }
        Ok(())
    }

    /// Applies a claim's `cachevol.dev/*` annotations over the StorageClass's values. Other
    /// annotations are not cachevol's and are ignored.
    pub fn apply_annotations(
        &mut self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        for (name, value) in annotations {
            if let Some(field) = name.strip_prefix(user::ANNOTATION_PREFIX) {
                self.apply_user(field, value.trim(), name)?;
            }
        }
        Ok(())
    }

    /// The spec of a NodePublishVolume `volume_context`, read once where the CSI call arrives:
    /// the controller's attributes (a context that names no store takes `driver_store`), or for
    /// an inline volume the pod's own attributes (validated, in the pod's namespace, on
    /// `driver_store`). Errors name the attribute.
    pub fn from_publish(
        ctx: &HashMap<String, String>,
        driver_store: Option<&str>,
    ) -> Result<VolumeSpec, Error> {
        if VolumeSpec::is_inline(ctx) {
            return VolumeSpec::from_inline(ctx, driver_store);
        }
        match (ctx.contains_key(attr::STORE), driver_store) {
            (false, Some(store)) => {
                let mut ctx = ctx.clone();
                ctx.insert(attr::STORE.into(), store.to_string());
                VolumeSpec::from_context(&ctx)
            }
            _ => VolumeSpec::from_context(ctx),
        }
    }

    /// Whether a NodePublishVolume context is an inline (CSI ephemeral) volume's.
    pub fn is_inline(ctx: &HashMap<String, String>) -> bool {
        ctx.get(user::EPHEMERAL).is_some_and(|v| v == "true")
    }

    /// The spec of an inline volume from the pod's `volumeAttributes`: the scope is always the
    /// pod's namespace and the store the driver's own; `key` is required.
    pub fn from_inline(
        ctx: &HashMap<String, String>,
        driver_store: Option<&str>,
    ) -> Result<VolumeSpec, Error> {
        let scope = ctx
            .get(user::POD_NAMESPACE)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Error::parameter(
                    user::POD_NAMESPACE,
                    "inline volumes need the pod's namespace: the CSIDriver must have \
                     podInfoOnMount: true",
                )
            })?;
        names::scope(scope).map_err(|e| Error::parameter(user::POD_NAMESPACE, e.to_string()))?;
        let store = driver_store.ok_or_else(|| {
            Error::parameter(
                "store",
                "inline volumes use the driver's store, and the node plugin has no --store",
            )
        })?;
        let key = ctx.get(attr::KEY).ok_or_else(|| {
            Error::parameter("volumeAttributes.key", "required for an inline volume")
        })?;
        let mut spec = VolumeSpec {
            store: store.to_string(),
            scope: scope.to_string(),
            key: String::new(),
            restore_keys: Vec::new(),
            mode: Mode::default(),
            policy: Policy::default(),
            commit_on: CommitOn::default(),
            merge: Merge::default(),
            budget: None,
        };
        spec.apply_user(attr::KEY, key, "volumeAttributes.key")?;
        for (name, value) in ctx {
            if name.starts_with(param::RESERVED_PREFIX) || name == attr::KEY {
                continue;
            }
            spec.apply_user(name, value.trim(), &format!("volumeAttributes.{name}"))?;
        }
        Ok(spec)
    }
}

/// A spec is stored (in the node's view records) as its `volume_context`, the form the
/// controller hands the node: records keep one format whichever side wrote them, and a record
/// read back is validated as a context is.
impl serde::Serialize for VolumeSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&self.to_context(), s)
    }
}

impl<'de> serde::Deserialize<'de> for VolumeSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<VolumeSpec, D::Error> {
        let ctx: HashMap<String, String> = serde::Deserialize::deserialize(d)?;
        VolumeSpec::from_context(&ctx).map_err(serde::de::Error::custom)
    }
}

fn is_known_parameter(k: &str) -> bool {
    k.starts_with(param::RESERVED_PREFIX)
        || [
            param::STORE,
            param::SCOPE,
            param::KEY,
            param::MODE,
            param::POLICY,
            param::MERGE,
        ]
        .contains(&k)
        || param::RESTORE_KEYS.contains(&k)
        || param::COMMIT_ON.contains(&k)
}

/// The value of a parameter that has several spellings; two spellings with different values
/// are an error rather than a silent pick.
fn one_of<'a>(
    params: &'a HashMap<String, String>,
    spellings: &[&'static str],
) -> Result<Option<(&'static str, &'a str)>, Error> {
    let mut found: Option<(&'static str, &'a str)> = None;
    for name in spellings {
        if let Some(v) = params.get(*name) {
            match found {
                Some((first, fv)) if fv != v => {
                    return Err(Error::parameter(
                        *name,
                        format!("conflicts with {first:?}: give only one of them"),
                    ))
                }
                Some(_) => {}
                None => found = Some((name, v.as_str())),
            }
        }
    }
    Ok(found)
}

/// A comma-separated list of cache keys, each validated; blanks around commas are allowed.
fn parse_key_list(name: &str, value: &str) -> Result<Vec<String>, Error> {
    value
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            names::key(k)
                .map(str::to_string)
                .map_err(|e| Error::parameter(name, e.to_string()))
        })
        .collect()
}

/// Checks that a store URL is one cachevol can open and carries no credentials: it ends up in
/// volume attributes, which anyone who can read PersistentVolumes sees.
pub fn check_store_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    // Said before the URL check refuses user info or a query for its own reason: here the
    // reason that matters is who can read them.
    if let Ok(u) = url::Url::parse(url) {
        if !u.username().is_empty() || u.password().is_some() || u.query().is_some() {
            return Err(format!(
                "{shown:?} carries credentials or a query string; volume attributes are not \
                 secret, so give credentials through the provisioner/node-publish secrets or \
                 the environment"
            ));
        }
    }
    match StoreUrl::parse(url) {
        Err(why) if url.is_empty() => Err(why),
        Err(why) => Err(format!("{shown:?}: {why}")),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const STORE: &str = "s3://caches/cluster-a";

    fn with_pvc(kv: &[(&str, &str)]) -> HashMap<String, String> {
        let mut p = params(kv);
        p.insert(param::PVC_NAME.into(), "npm-cache".into());
        p.insert(param::PVC_NAMESPACE.into(), "team-a".into());
        p
    }

    #[test]
    fn defaults_come_from_the_claim_and_the_controller() {
        let s = VolumeSpec::from_parameters(&with_pvc(&[]), STORE, Some(1 << 30)).unwrap();
        assert_eq!(s.store, STORE);
        assert_eq!(s.scope, "team-a");
        assert_eq!(s.key, "npm-cache");
        assert!(s.restore_keys.is_empty());
        assert_eq!(
            (s.mode, s.policy, s.commit_on, s.merge),
            (
                Mode::Private,
                Policy::PullPush,
                CommitOn::Success,
                Merge::Replace
            )
        );
        let c = s.to_context();
        assert_eq!(c[attr::BUDGET], "1073741824");
        assert_eq!(c[attr::RESTORE_KEYS], "");
    }

    #[test]
    fn every_parameter_is_carried_to_the_context() {
        let p = with_pvc(&[
            ("store", "file:///var/cache/cv"),
            ("scope", "cluster"),
            ("key", "npm"),
            ("restoreKeys", "npm-main, npm-base"),
            ("mode", "locked"),
            ("policy", "pull"),
            ("commit-on", "always"),
            ("merge", "union"),
        ]);
        let s = VolumeSpec::from_parameters(&p, STORE, None).unwrap();
        let c = s.to_context();
        let want: BTreeMap<String, String> = [
            ("store", "file:///var/cache/cv"),
            ("scope", "cluster"),
            ("key", "npm"),
            ("restore-keys", "npm-main,npm-base"),
            ("mode", "locked"),
            ("policy", "pull"),
            ("commit-on", "always"),
            ("merge", "union"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(c, want);
        // The node reads back exactly what the controller wrote.
        let back = VolumeSpec::from_context(&c.into_iter().collect()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_literal_scope_is_a_scope_name() {
        let s =
            VolumeSpec::from_parameters(&with_pvc(&[("scope", "ci-shared")]), STORE, None).unwrap();
        assert_eq!(s.scope, "ci-shared");
    }

    #[test]
    fn bad_values_name_the_parameter_and_the_choices() {
        for (kv, name, needle) in [
            (("mode", "exclusive"), "mode", "shared, private, locked"),
            (("policy", "push-pull"), "policy", "pull-push, pull, push"),
            (("commitOn", "never"), "commitOn", "success, marker, always"),
            (("merge", "append"), "merge", "replace, union"),
            (("key", "../etc"), "key", "invalid cache key"),
            (
                ("restore-keys", "ok,a/b"),
                "restore-keys",
                "invalid cache key",
            ),
            (("scope", "a b"), "scope", "invalid scope"),
            (("store", "ftp://x/y"), "store", "unsupported scheme"),
            (("stroe", "s3://x"), "stroe", "unknown parameter"),
        ] {
            let e = VolumeSpec::from_parameters(&with_pvc(&[kv]), STORE, None).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, Error::InvalidParameter { name: n, .. } if n == name),
                "{kv:?}: {msg}"
            );
            assert!(msg.contains(needle), "{kv:?}: {msg}");
        }
    }

    #[test]
    fn two_spellings_must_agree() {
        let p = with_pvc(&[("commitOn", "always"), ("commit-on", "success")]);
        let e = VolumeSpec::from_parameters(&p, STORE, None).unwrap_err();
        assert!(e.to_string().contains("give only one"), "{e}");
        let p = with_pvc(&[("commitOn", "always"), ("commit-on", "always")]);
        assert!(VolumeSpec::from_parameters(&p, STORE, None).is_ok());
    }

    #[test]
    fn without_claim_metadata_key_and_scope_must_be_explicit() {
        let e = VolumeSpec::from_parameters(&params(&[("key", "npm")]), STORE, None).unwrap_err();
        assert!(e.to_string().contains("--extra-create-metadata"), "{e}");
        let e =
            VolumeSpec::from_parameters(&params(&[("scope", "cluster")]), STORE, None).unwrap_err();
        assert!(e.to_string().contains("\"key\""), "{e}");
        let s = VolumeSpec::from_parameters(
            &params(&[("scope", "cluster"), ("key", "npm")]),
            STORE,
            None,
        )
        .unwrap();
        assert_eq!((s.scope.as_str(), s.key.as_str()), ("cluster", "npm"));
    }

    fn annotations(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn claim_annotations_override_the_class_but_never_store_or_scope() {
        let mut s =
            VolumeSpec::from_parameters(&with_pvc(&[("mode", "shared")]), STORE, None).unwrap();
        s.apply_annotations(&annotations(&[
            ("cachevol.dev/key", "npm"),
            ("cachevol.dev/restore-keys", "npm-main,npm-base"),
            ("cachevol.dev/mode", "locked"),
            ("cachevol.dev/policy", "pull"),
            ("cachevol.dev/commit-on", "always"),
            ("cachevol.dev/merge", "union"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
        ]))
        .unwrap();
        assert_eq!(s.key, "npm");
        assert_eq!(s.restore_keys, ["npm-main", "npm-base"]);
        assert_eq!(
            (s.mode, s.policy, s.commit_on, s.merge),
            (Mode::Locked, Policy::Pull, CommitOn::Always, Merge::Union)
        );
        assert_eq!((s.store.as_str(), s.scope.as_str()), (STORE, "team-a"));

        for (kv, needle) in [
            (("cachevol.dev/scope", "team-b"), "StorageClass"),
            (("cachevol.dev/store", "s3://other/x"), "StorageClass"),
            (("cachevol.dev/mode", "lockd"), "shared, private, locked"),
            (("cachevol.dev/key", "../team-b/npm"), "invalid cache key"),
            (("cachevol.dev/restore-keys", "a,b/c"), "invalid cache key"),
            (("cachevol.dev/comit-on", "always"), "users may set"),
        ] {
            let mut s2 = s.clone();
            let e = s2.apply_annotations(&annotations(&[kv])).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(kv.0), "{kv:?}: {msg}");
            assert!(msg.contains(needle), "{kv:?}: {msg}");
            assert_eq!(s2, s, "a refused annotation changes nothing");
        }
    }

    #[test]
    fn inline_volumes_take_the_pods_namespace_and_the_drivers_store() {
        let ctx = params(&[
            ("key", "npm"),
            ("mode", "locked"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.namespace", "team-a"),
            ("csi.storage.k8s.io/pod.name", "job-1"),
        ]);
        assert!(VolumeSpec::is_inline(&ctx));
        let s = VolumeSpec::from_inline(&ctx, Some(STORE)).unwrap();
        assert_eq!(
            (s.store.as_str(), s.scope.as_str(), s.key.as_str(), s.mode),
            (STORE, "team-a", "npm", Mode::Locked)
        );
        for (extra, needle) in [
            (("scope", "team-b"), "volumeAttributes.scope"),
            (("store", "s3://other/x"), "volumeAttributes.store"),
            (("merge", "append"), "replace, union"),
            (("budget", "1"), "users may set"),
        ] {
            let mut c = ctx.clone();
            c.insert(extra.0.into(), extra.1.into());
            let e = VolumeSpec::from_inline(&c, Some(STORE))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{extra:?}: {e}");
        }
        let mut c = ctx.clone();
        c.remove("key");
        assert!(VolumeSpec::from_inline(&c, Some(STORE))
            .unwrap_err()
            .to_string()
            .contains("required"));
        assert!(VolumeSpec::from_inline(&ctx, None).is_err());
    }

    #[test]
    fn a_publish_context_is_read_once_whichever_kind_of_volume() {
        // The controller's attributes, kubelet's pod info beside them ignored.
        let mut ctx = params(&[
            ("scope", "team-a"),
            ("key", "npm"),
            ("mode", "shared"),
            ("csi.storage.k8s.io/pod.uid", "u-1"),
        ]);
        // No store named: the driver's.
        let s = VolumeSpec::from_publish(&ctx, Some(STORE)).unwrap();
        assert_eq!((s.store.as_str(), s.mode), (STORE, Mode::Shared));
        assert!(VolumeSpec::from_publish(&ctx, None).is_err());
        // A store named is kept.
        ctx.insert("store".into(), "file:///var/cache/cv".into());
        let s = VolumeSpec::from_publish(&ctx, Some(STORE)).unwrap();
        assert_eq!(s.store, "file:///var/cache/cv");
        // An invalid attribute is one error that names it.
        ctx.insert("commit-on".into(), "never".into());
        let e = VolumeSpec::from_publish(&ctx, Some(STORE)).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidParameter { name, .. } if name == "commit-on"),
            "{e}"
        );
        // An inline volume: the pod's namespace, the driver's store.
        let inline = params(&[
            ("key", "npm"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.namespace", "team-b"),
        ]);
        let s = VolumeSpec::from_publish(&inline, Some(STORE)).unwrap();
        assert_eq!((s.store.as_str(), s.scope.as_str()), (STORE, "team-b"));
    }

    #[test]
    fn store_urls_must_be_openable_and_free_of_credentials() {
        for ok in [
            "s3://bucket/prefix",
            "gs://bucket",
            "az://container/p",
            "file:///var/lib/store",
            "/var/lib/store",
        ] {
            assert_eq!(check_store_url(ok), Ok(()), "{ok}");
        }
        for (bad, needle) in [
            ("s3://key:secret@bucket/p", "credentials"),
            ("az://c/p?sig=abc", "credentials"),
            ("relative/dir", "absolute path"),
            ("s3:///prefix", "no bucket"),
            ("http://x/y", "unsupported scheme"),
            ("", "empty"),
        ] {
            let e = check_store_url(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
            assert!(!e.contains("key:secret") && !e.contains("sig=abc"), "{e}");
        }
    }
}
