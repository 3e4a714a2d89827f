//! The object store: opening one from a URL (file://, s3://, gs://, az://), the layout of a scope
//! inside it, and the few operations the engine needs, each with a timeout and an error that
//! names the object. Credentials come from the usual environment variables and never appear in
//! logs or errors: the URL is kept only in redacted form.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};

use super::error::{io, Error, Result};
use super::names;

/// Default per-request timeout; `CACHEVOL_STORE_TIMEOUT` (seconds) overrides it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: Path,
    display: String,
    /// The directory and the store behind a `file://` URL (the same store as `inner`): ranged
    /// reads of packs go to the files directly (object_store zero-fills every buffer first).
    local: Option<(PathBuf, Arc<object_store::local::LocalFileSystem>)>,
    timeout: Duration,
    conditional_update: bool,
    /// A cloud store whose only source of credentials is the instance metadata service (none
    /// in the environment): a failed metadata request means "no credentials", said in the
    /// user's terms with what to set, not a raw HTTP error about a token endpoint.
    metadata_only: Option<&'static Credentials>,
    /// Told of each failed or timed-out request (its op: get, head, put, delete, list, copy,
    /// other), for whoever counts them; the engine itself keeps no metrics.
    on_error: Option<ErrorHook>,
    /// Told how long each request took (answered, failed or timed out), by op as for
    /// `on_error`, for whoever keeps a latency histogram.
    on_latency: Option<LatencyHook>,
    /// Told whether each request was answered (normal answers such as not found included) or
    /// failed, for whoever tracks whether the store works at all.
    on_answer: Option<AnswerHook>,
}

/// What a [`Store`] calls on a failed request: the operation's metric name.
pub type ErrorHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// What a [`Store`] calls after each request: the operation's metric name and how long it took.
pub type LatencyHook = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

/// What a [`Store`] calls after each request: whether the store answered (`true`, whatever the
/// answer) or the request failed or timed out (`false`, as [`ErrorHook`] is told).
pub type AnswerHook = Arc<dyn Fn(bool) + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.display).finish()
    }
}

/// A URL with any user info, query string and fragment removed (SAS tokens, keys).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        // A bare local path carries no secret, but an unparseable URL might: show only its scheme.
        Err(_) if !url.contains("://") => url.to_string(),
        Err(_) => format!("{}://<redacted>", url.split("://").next().unwrap_or("?")),
    }
}

/// What a store URL names, once checked: a local directory or a bucket (container) of one of
/// the object stores cachevol speaks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// An absolute path, or the path of a `file://` URL.
    Local(PathBuf),
    /// `s3://` (or `s3a://`).
    S3,
    /// `gs://`.
    Gcs,
    /// `az://` (or `azure://`, `abfs://`, `abfss://`).
    Azure,
}

/// The schemes of the object stores, each with what it opens and the characters its bucket
/// (container) name may hold besides lowercase letters and digits (which it must start and
/// end with): the rules S3, GCS and Azure give their names, so a name the store would refuse
/// is refused before anything is sent. Besides these, a store is `file:///dir` or `/dir`.
///
/// The one list of what a store URL may be: the chart's values schema states the same grammar
/// (tests/store_urls.rs checks its patterns against this table and [`StoreUrl::parse`]).
pub const BUCKET_SCHEMES: &[(&str, StoreUrl, &str)] = &[
    ("s3", StoreUrl::S3, ".-"),
    // Hadoop's spelling, which object_store reads as s3.
    ("s3a", StoreUrl::S3, ".-"),
    ("gs", StoreUrl::Gcs, "._-"),
    ("az", StoreUrl::Azure, "-"),
    // object_store's other spellings of a container (`abfss://container@account...` carries
    // user info, which no store URL may).
    ("azure", StoreUrl::Azure, "-"),
    ("abfs", StoreUrl::Azure, "-"),
    ("abfss", StoreUrl::Azure, "-"),
];

/// What a path segment of an object store's URL may hold besides ASCII letters and digits
/// (RFC 3986's unreserved characters): nothing a URL parser would escape, rewrite or read as
/// user info, query or fragment, so the prefix cachevol writes under is the text the user wrote.
pub const PATH_CHARS: &str = "-._~";

/// What a local store's path (`/dir` or `file:///dir`) may not hold besides control
/// characters: what would make its `file://` form mean another directory (a query, a fragment,
/// a percent escape). Anything else a directory's name may hold, so `$HOME` with a space or an
/// `@` is a store.
pub const LOCAL_PATH_REFUSED: &str = "?#%";

impl StoreUrl {
    /// Checks a store URL: the one test of which URLs are stores, shared by [`Store::open`] and
    /// the volume model (which adds its own rule: no credentials in volume attributes). The
    /// reason given on refusal does not repeat the URL; callers name it (redacted).
    ///
    /// One spelling per store: a lowercase scheme, `file:///dir` (no host), a prefix without
    /// empty, `.` or `..` segments. The store URL names the node's bases and the volume
    /// attributes, and a second spelling of one store would be a second set of them.
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if url.is_empty() {
            return Err("must not be empty".into());
        }
        if url.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            // Only an absolute path is a local store: `s3:/bucket` or `bucket/prefix` is a
            // mistyped URL far more often than a directory under the working directory.
            return if url.starts_with('/') {
                check_path(url, local_char).map(|()| StoreUrl::Local(PathBuf::from(url)))
            } else {
                Err(
                    "neither a URL (file:///dir, s3://bucket/prefix, gs://bucket/prefix, \
                     az://container/prefix) nor an absolute path"
                        .into(),
                )
            };
        };
        if scheme == "file" {
            if !rest.starts_with('/') {
                return Err("a file:// URL needs an absolute path and no host: file:///dir".into());
            }
            return check_path(rest, local_char).map(|()| StoreUrl::Local(PathBuf::from(rest)));
        }
        let Some((_, store, extra)) = BUCKET_SCHEMES.iter().find(|(s, ..)| *s == scheme) else {
            let lower = scheme.to_ascii_lowercase();
            return Err(
                if lower == "file" || BUCKET_SCHEMES.iter().any(|(s, ..)| *s == lower) {
                    format!("the scheme {scheme:?} must be written in lowercase: {lower}://")
                } else {
                    format!("unsupported scheme {scheme:?} (use file://, s3://, gs:// or az://)")
                },
            );
        };
        if rest.contains(['@', '?', '#']) {
            return Err(
                "carries credentials, a query or a fragment, which cachevol never \
                        reads: give credentials and options through the environment"
                    .into(),
            );
        }
        let (bucket, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err("names no bucket or container".into());
        }
        let edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        if !bucket.starts_with(edge)
            || !bucket.ends_with(edge)
            || !bucket.chars().all(|c| edge(c) || extra.contains(c))
        {
            let also: String = extra.chars().map(|c| format!(", '{c}'")).collect();
            return Err(format!(
                "bucket or container {bucket:?}: lowercase letters, digits{also} only, \
                 starting and ending with a letter or digit"
            ));
        }
        if !path.is_empty() {
            check_path(path, |c| {
                c.is_ascii_alphanumeric() || PATH_CHARS.contains(c)
            })?;
        }
        Ok(store.clone())
    }
}

fn local_char(c: char) -> bool {
    !LOCAL_PATH_REFUSED.contains(c)
}

/// Checks the path of a store URL (or a local store's absolute path), from its leading `/`:
/// segments of characters `allowed` allows, none empty or of dots only (`.`, `..`); one
/// trailing `/` is allowed (`s3://bucket/prefix/`).
fn check_path(path: &str, allowed: impl Fn(char) -> bool) -> Result<(), String> {
    let inner = path.strip_prefix('/').unwrap_or(path);
    if inner.is_empty() {
        return Ok(());
    }
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    for segment in inner.split('/') {
        if segment.is_empty() {
            return Err("the path has an empty segment (//)".into());
        }
        // `..` would be resolved away by a URL parser (and `.` dropped): the prefix would not
        // be the one written. No store's path needs a segment of dots only, so none may be.
        if segment.chars().all(|c| c == '.') {
            return Err(format!("the path has a {segment:?} segment"));
        }
        if let Some(c) = segment.chars().find(|c| !allowed(*c)) {
            return Err(format!("the path must not contain {c:?}"));
        }
    }
    Ok(())
}

impl Store {
    /// Opens a store from a URL: `file:///abs/dir` (or an absolute path), `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`. Cloud credentials and endpoints come from
    /// the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`) as their SDKs define them.
    pub fn open(url: &str) -> Result<Store> {
        let timeout = std::env::var("CACHEVOL_STORE_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(DEFAULT_TIMEOUT);
        let invalid = |why: String| Error::InvalidStore {
            url: redact_url(url),
            why,
        };
        let parsed = StoreUrl::parse(url).map_err(invalid)?;
        // Every object's name starts with the URL's path, so it must be an object path (no
        // empty segments), a file:// URL's too; a bare path is a directory, never parsed so.
        let prefix = match url::Url::parse(url) {
            Ok(u) => {
                Path::parse(u.path().trim_start_matches('/')).map_err(|e| invalid(e.to_string()))?
            }
            Err(_) => Path::default(),
        };
        let metadata_only = Credentials::of(&parsed).filter(|c| !(c.in_env)());
        if let Some(c) = metadata_only {
            if !(c.metadata_allowed)() {
                return Err(Error::NoCredentials {
                    url: redact_url(url),
                    scheme: c.scheme,
                    hint: c.hint,
                });
            }
        }
        let inner: Arc<dyn ObjectStore> = match parsed {
            StoreUrl::Local(path) => return Self::open_local(path, timeout),
            StoreUrl::S3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_retry(retry_config(timeout))
                    .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            StoreUrl::Gcs => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry_config(timeout))
                    .build()
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            StoreUrl::Azure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry_config(timeout))
                    .build()
                    .map_err(|e| match e {
                        // "Account must be specified": the account is how Azure names a store.
                        object_store::Error::Generic { .. }
                            if e.to_string().contains("Account must be specified") =>
                        {
                            Error::NoCredentials {
                                url: redact_url(url),
                                scheme: "az",
                                hint: AZURE.hint,
                            }
                        }
                        e => invalid(e.to_string()),
                    })?,
            ),
        };
        Ok(Store {
            inner,
            root: prefix,
            display: redact_url(url),
            local: None,
            timeout,
            on_error: None,
            on_latency: None,
            on_answer: None,
            // Every object store cachevol opens (S3 with ETag matches, GCS, Azure) can
            // compare-and-swap; only the local directory cannot.
            conditional_update: true,
            metadata_only,
        })
    }

    fn open_local(path: PathBuf, timeout: Duration) -> Result<Store> {
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .map_err(io("resolve", &path))?
                .join(path)
        };
        std::fs::create_dir_all(&path).map_err(io("create store directory", &path))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&path)
            .map_err(|e| Error::InvalidStore {
                url: path.display().to_string(),
                why: e.to_string(),
            })?
            .with_automatic_cleanup(true);
        let fs = Arc::new(fs);
        Ok(Store {
            inner: fs.clone(),
            root: Path::default(),
            display: format!("file://{}", path.display()),
            local: Some((path, fs)),
            timeout,
            on_error: None,
            on_latency: None,
            on_answer: None,
            conditional_update: false,
            metadata_only: None,
        })
    }

    /// The store's URL without secrets, for logs and output.
    pub fn display_url(&self) -> &str {
        &self.display
    }

    /// The directory behind a `file://` store.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local.as_ref().map(|(root, _)| root.as_path())
    }

    /// Whether the store offers compare-and-swap on an existing object (S3 with conditional put,
    /// GCS, Azure). The local file system offers only create-only puts.
    pub fn has_conditional_update(&self) -> bool {
        self.conditional_update
    }

    pub fn layout(&self, scope: &str) -> Result<Layout> {
        names::scope(scope)?;
        Ok(Layout {
            base: self.root.clone().join(scope),
        })
    }

    /// The scopes that hold anything in this store.
    pub async fn scopes(&self) -> Result<Vec<String>> {
        self.list_dirs(&self.root).await
    }

    /// Calls `hook` with the operation of every request that fails or times out (normal answers
    /// such as not found or a lost create race are no failures).
    pub fn on_error(mut self, hook: ErrorHook) -> Store {
        self.on_error = Some(hook);
        self
    }

    /// Calls `hook` with the operation and duration of every request, whatever its answer.
    pub fn on_latency(mut self, hook: LatencyHook) -> Store {
        self.on_latency = Some(hook);
        self
    }

    /// Calls `hook` after every request: `true` when the store answered (normal answers
    /// included), `false` when the request failed or timed out.
    pub fn on_answer(mut self, hook: AnswerHook) -> Store {
        self.on_answer = Some(hook);
        self
    }

    fn failed(&self, op: &'static str) {
        if let Some(hook) = &self.on_error {
            hook(metric_op(op));
        }
    }

    fn answered(&self, ok: bool) {
        if let Some(hook) = &self.on_answer {
            hook(ok);
        }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        location: &Path,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, fut).await;
        if let Some(hook) = &self.on_latency {
            hook(metric_op(op), started.elapsed());
        }
        match answer {
            Ok(Ok(v)) => {
                self.answered(true);
                Ok(v)
            }
            Ok(Err(source)) => {
                let failure = is_failure(op, &source);
                if failure {
                    self.failed(op);
                }
                self.answered(!failure);
                if is_missing_bucket(&source) {
                    return Err(Error::NoSuchBucket {
                        url: self.display.clone(),
                        bucket: url::Url::parse(&self.display)
                            .ok()
                            .and_then(|u| u.host_str().map(str::to_string))
                            .unwrap_or_default(),
                    });
                }
                if let Some(c) = self.metadata_only.filter(|c| (c.metadata_failure)(&source)) {
                    return Err(Error::NoCredentials {
                        url: self.display.clone(),
                        scheme: c.scheme,
                        hint: c.hint,
                    });
                }
                Err(Error::Store {
                    op,
                    location: location.to_string(),
                    source,
                })
            }
            Err(_) => {
                self.failed(op);
                self.answered(false);
                Err(Error::StoreTimeout {
                    op,
                    location: location.to_string(),
                    seconds: self.timeout.as_secs(),
                })
            }
        }
    }

    /// The whole object, with its version for a later conditional update; `None` when absent.
    pub async fn get(&self, location: &Path) -> Result<Option<(Bytes, UpdateVersion)>> {
        let res = self
            .timed("get", location, async {
                let r = self.inner.get(location).await?;
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                Ok((r.bytes().await?, version))
            })
            .await;
        not_found_is_none(res)
    }

    pub async fn get_range(&self, location: &Path, range: Range<u64>) -> Result<Bytes> {
        let (start, want) = (range.start, range.end - range.start);
        let bytes = match &self.local {
            Some((_, fs)) => {
                let read = async {
                    let path = fs.path_to_filesystem(location)?;
                    let name = location.to_string();
                    tokio::task::spawn_blocking(move || read_file_range(&path, &name, range))
                        .await
                        .expect("a file read does not panic")
                };
                self.timed("get", location, read).await?
            }
            None => {
                self.timed("get", location, self.inner.get_range(location, range))
                    .await?
            }
        };
        if bytes.len() as u64 != want {
            return Err(Error::corrupt(
                location.to_string(),
                format!(
                    "object is truncated: wanted {want} bytes at offset {start}, got {}",
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }

    pub async fn head(&self, location: &Path) -> Result<Option<ObjectMeta>> {
        not_found_is_none(
            self.timed("head", location, self.inner.head(location))
                .await,
        )
    }

    /// One put in `mode`, timed and counted as `op`.
    async fn put_mode(
        &self,
        op: &'static str,
        location: &Path,
        data: Bytes,
        mode: PutMode,
    ) -> Result<object_store::PutResult> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.timed(
            op,
            location,
            self.inner
                .put_opts(location, PutPayload::from_bytes(data), opts),
        )
        .await
    }

    /// Creates the object only if nothing is there yet; `Ok(false)` when it already existed.
    pub async fn put_create(&self, location: &Path, data: Bytes) -> Result<bool> {
        let refused = match self
            .put_mode("create", location, data.clone(), PutMode::Create)
            .await
        {
            Ok(_) => return Ok(true),
            // Some S3 implementations answer a lost If-None-Match race with 412 instead of 409.
            Err(Error::Store {
                source:
                    source @ (object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. }),
                ..
            }) => source,
            Err(e) => return Err(e),
        };
        // object_store sends a create again when the connection dropped before its answer, even
        // though the store may have created the object by then: the resend is refused by our
        // own first attempt. Counted as a lost race, a commit would take the next generation
        // number for the same tree, or a fenced one would report itself fenced. Only a resent
        // create can be refused so, and then only the content tells ours from a rival's.
        if !was_retried(&refused) {
            return Ok(false);
        }
        Ok(self
            .get(location)
            .await?
            .is_some_and(|(there, _)| there == data))
    }

    /// Replaces the object if it is still at `expected` (or creates it if `expected` is None and
    /// nothing is there). `Ok(false)` when someone else changed it first. On stores without
    /// compare-and-swap this is a plain overwrite: callers use it only for hints.
    pub async fn put_swap(
        &self,
        location: &Path,
        data: Bytes,
        expected: Option<UpdateVersion>,
    ) -> Result<bool> {
        let mode = match (self.conditional_update, expected) {
            (false, _) => PutMode::Overwrite,
            (true, Some(v)) => PutMode::Update(v),
            (true, None) => PutMode::Create,
        };
        match self.put_mode("swap", location, data, mode).await {
            Ok(_) => Ok(true),
            Err(Error::Store {
                source:
                    object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. },
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn put(&self, location: &Path, data: Bytes) -> Result<()> {
        self.timed(
            "put",
            location,
            self.inner.put(location, PutPayload::from_bytes(data)),
        )
        .await
        .map(|_| ())
    }

    /// Deletes the object; deleting something already gone is fine.
    pub async fn delete(&self, location: &Path) -> Result<()> {
        match self
            .timed("delete", location, self.inner.delete(location))
            .await
        {
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(()),
            other => other,
        }
    }

    /// Every object below `prefix`, recursively.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>> {
        self.timed(
            "list",
            prefix,
            again_if_cut(|| self.inner.list(Some(prefix)).try_collect::<Vec<_>>()),
        )
        .await
    }

    /// The names of the "directories" directly below `prefix`.
    pub async fn list_dirs(&self, prefix: &Path) -> Result<Vec<String>> {
        let res = self
            .timed(
                "list",
                prefix,
                again_if_cut(|| self.inner.list_with_delimiter(Some(prefix))),
            )
            .await?;
        let mut out: Vec<String> = res
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// object_store's own retries of a request (5xx such as S3's 503 SlowDown, 429, dropped
/// connections), fitted to the per-request `timeout` so that it, not a retry count, is what a
/// throttle must outlast. object_store's default stops after 10 retries, and its jittered
/// backoff (each sleep drawn from [100 ms, 2 × the last)) adds up to 1.4 s to 12 s for those,
/// 2.6 s typically: a store throttling for 2 s failed a commit about one time in four (tests/
/// store_faults.rs), long before the 60 s the timeout allows. Base 3 (decorrelated jitter as
/// AWS describes it) makes the sleeps grow rather than hover near 100 ms, so a minute of
/// throttling costs a request some 20 retries, not 90. Retries stop at 70% of the timeout and
/// no sleep exceeds 20% of it, so the last attempt starts before the timeout and its answer
/// (the store's own error) is what is reported, rather than a bare "timed out".
fn retry_config(timeout: Duration) -> object_store::RetryConfig {
    let max_backoff = Duration::from_secs(15).min(timeout.mul_f64(0.2));
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100).min(max_backoff),
            max_backoff,
            base: 3.0,
        },
        max_retries: 1000,
        retry_timeout: timeout.mul_f64(0.7),
    }
}

/// A listing, asked again when the connection dropped in the middle of an answer: object_store
/// retries a list request that got no answer, and resumes a cut GET body, but reads a list
/// body once (tests/store_faults.rs: a commit failed on a listing cut half way). Listing is
/// safe to repeat; the caller's timeout still bounds all the tries.
async fn again_if_cut<T, F, Fut>(list: F) -> object_store::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut tries = 0u32;
    loop {
        match list().await {
            Err(e) if tries < 3 && e.to_string().contains("Error getting list response body") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100) * tries).await;
            }
            other => return other,
        }
    }
}

/// Whether object_store sent the request more than once before this answer (its error then
/// says "after N retries"; it has no accessor for the count).
fn was_retried(e: &object_store::Error) -> bool {
    let mut next: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = next {
        if err.to_string().contains(" retries, max_retries: ") {
            return true;
        }
        next = err.source();
    }
    false
}

/// Whether the environment names AWS credentials object_store uses before it falls back to the
/// instance metadata service: static keys, a web identity (IRSA), a container credentials
/// endpoint (ECS, EKS Pod Identity), or unsigned requests.
/// Where a cloud store's credentials come from when none are in the environment (the instance
/// metadata service: EC2's, GCE's, Azure's managed identity), how to tell a failed request to
/// it, and what to tell the user.
pub(crate) struct Credentials {
    scheme: &'static str,
    hint: &'static str,
    in_env: fn() -> bool,
    metadata_allowed: fn() -> bool,
    metadata_failure: fn(&object_store::Error) -> bool,
}

/// Turns instance-metadata credentials off for every store (`off`): a cloud store without
/// credentials in the environment is refused at once, without a request to a metadata address.
/// For tests and for machines where a request to 169.254.169.254 must never be sent.
pub const INSTANCE_METADATA_ENV: &str = "CACHEVOL_INSTANCE_METADATA";

fn env_true(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn env_set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

fn metadata_on() -> bool {
    !std::env::var(INSTANCE_METADATA_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

static AWS: Credentials = Credentials {
    scheme: "s3",
    hint: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE and \
           AWS_ROLE_ARN (IRSA), or run where the instance metadata service grants a role",
    in_env: aws_credentials_in_env,
    // The AWS SDKs' own switch is honoured too.
    metadata_allowed: || metadata_on() && !env_true("AWS_EC2_METADATA_DISABLED"),
    metadata_failure: is_metadata_failure,
};

static GCS: Credentials = Credentials {
    scheme: "gs",
    hint: "set GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT_KEY to a service \
           account key, or run where the metadata server grants a service account (Workload \
           Identity)",
    in_env: || {
        [
            "GOOGLE_SERVICE_ACCOUNT",
            "GOOGLE_SERVICE_ACCOUNT_PATH",
            "GOOGLE_SERVICE_ACCOUNT_KEY",
            "GOOGLE_APPLICATION_CREDENTIALS",
        ]
        .iter()
        .any(|v| env_set(v))
            // gcloud's application default credentials, which object_store reads too.
            || std::env::var_os("HOME").is_some_and(|h| {
                std::path::Path::new(&h)
                    .join(".config/gcloud/application_default_credentials.json")
                    .exists()
            })
    },
    // google-auth's switch for "not on GCE".
    metadata_allowed: || metadata_on() && !env_true("NO_GCE_CHECK"),
    metadata_failure: |e| e.to_string().contains("computeMetadata"),
};

static AZURE: Credentials = Credentials {
    scheme: "az",
    hint: "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or a SAS token, a \
           client secret, or workload identity's AZURE_FEDERATED_TOKEN_FILE), or run where a \
           managed identity is granted the container",
    in_env: || {
        env_true("AZURE_STORAGE_USE_EMULATOR")
            || [
                "AZURE_STORAGE_ACCOUNT_KEY",
                "AZURE_STORAGE_ACCESS_KEY",
                "AZURE_STORAGE_MASTER_KEY",
                "AZURE_STORAGE_SAS_KEY",
                "AZURE_STORAGE_SAS_TOKEN",
                "AZURE_STORAGE_TOKEN",
                "AZURE_CLIENT_SECRET",
                "AZURE_FEDERATED_TOKEN_FILE",
            ]
            .iter()
            .any(|v| env_set(v))
            || env_true("AZURE_SKIP_SIGNATURE")
    },
    metadata_allowed: metadata_on,
    metadata_failure: |e| e.to_string().contains("/metadata/identity/"),
};

impl Credentials {
    fn of(url: &StoreUrl) -> Option<&'static Credentials> {
        match url {
            StoreUrl::S3 => Some(&AWS),
            StoreUrl::Gcs => Some(&GCS),
            StoreUrl::Azure => Some(&AZURE),
            StoreUrl::Local(_) => None,
        }
    }
}

fn aws_credentials_in_env() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
        || std::env::var("AWS_SKIP_SIGNATURE").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Whether an S3 error is a failed request to the instance metadata service (the IMDS token
/// or role endpoints, all under `/latest/`), which object_store reports as a generic error.
fn is_metadata_failure(e: &object_store::Error) -> bool {
    let text = e.to_string();
    matches!(e, object_store::Error::Generic { .. })
        && (text.contains("/latest/api/token") || text.contains("/latest/meta-data/"))
}

/// Whether a store error counts in `cachevol_store_request_errors_total`: "not found" is a normal
/// answer, and so is a conditional put losing its race (`create` and `swap` turn both into
/// `Ok(false)`).
fn is_failure(op: &str, e: &object_store::Error) -> bool {
    match e {
        object_store::Error::NotFound { .. } => false,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            !matches!(op, "create" | "swap")
        }
        _ => true,
    }
}

/// Whether the store answered that the bucket or container itself does not exist (S3's
/// `NoSuchBucket`, Azure's `ContainerNotFound`, GCS's "bucket does not exist"): object_store
/// passes these on as generic errors with the service's XML.
fn is_missing_bucket(e: &object_store::Error) -> bool {
    let text = e.to_string();
    [
        "<Code>NoSuchBucket</Code>",
        "<Code>ContainerNotFound</Code>",
        "The specified bucket does not exist",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// The metric's op label for one of [`Store::timed`]'s operation names.
fn metric_op(op: &'static str) -> &'static str {
    match op {
        "create" | "swap" => "put",
        other => other,
    }
}

/// Reads `range` of a local file into a buffer that is never zero-filled first (a restore reads
/// every pack once; zeroing them cost as much as reading them). A short file gives short bytes,
/// which the caller reports as truncated.
fn read_file_range(
    path: &std::path::Path,
    name: &str,
    range: Range<u64>,
) -> object_store::Result<Bytes> {
    use std::io::{Read, Seek, SeekFrom};
    let failed = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => object_store::Error::NotFound {
            path: name.to_string(),
            source: Box::new(source),
        },
        _ => object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(source),
        },
    };
    let mut file = std::fs::File::open(path).map_err(failed)?;
    file.seek(SeekFrom::Start(range.start)).map_err(failed)?;
    let want = range.end.saturating_sub(range.start);
    let mut buf = Vec::with_capacity(want as usize);
    file.take(want).read_to_end(&mut buf).map_err(failed)?;
    Ok(Bytes::from(buf))
}

fn not_found_is_none<T>(res: Result<T>) -> Result<Option<T>> {
    match res {
        Ok(v) => Ok(Some(v)),
        Err(Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where a scope's objects live:
/// `<prefix>/<scope>/manifests/<key>/<generation, 20 digits>` (create-only; the truth),
/// `<prefix>/<scope>/heads/<key>` (a hint naming the newest generation),
/// `<prefix>/<scope>/used/<key>` (last restore, for TTL and LRU retention),
/// `<prefix>/<scope>/packs/<hh>/<pack hash>`,
/// `<prefix>/<scope>/inflight/<id>` (a running commit and the packs it relies on),
/// `<prefix>/<scope>/doomed/<id>` (packs a running GC is about to delete),
/// `<prefix>/<scope>/quarantine/<pack hash>` (a pack found corrupt, truncated or missing).
#[derive(Clone, Debug)]
pub struct Layout {
    base: Path,
}

impl Layout {
    pub fn manifests(&self) -> Path {
        self.base.clone().join("manifests")
    }
    pub fn generations(&self, key: &str) -> Path {
        self.manifests().join(key)
    }
    pub fn generation(&self, key: &str, generation: u64) -> Path {
        self.generations(key).join(format!("{generation:020}"))
    }
    pub fn heads(&self) -> Path {
        self.base.clone().join("heads")
    }
    pub fn head(&self, key: &str) -> Path {
        self.heads().join(key)
    }
    pub fn used(&self, key: &str) -> Path {
        self.base.clone().join("used").join(key)
    }
    pub fn packs(&self) -> Path {
        self.base.clone().join("packs")
    }
    pub fn pack(&self, id: &str) -> Path {
        self.packs().join(&id[..2]).join(id)
    }
    pub fn inflight(&self) -> Path {
        self.base.clone().join("inflight")
    }
    pub fn doomed(&self) -> Path {
        self.base.clone().join("doomed")
    }
    pub fn quarantine(&self) -> Path {
        self.base.clone().join("quarantine")
    }
}

/// The generation number a manifest object's name encodes.
pub fn parse_generation(location: &Path) -> Option<u64> {
    let name = location.filename()?;
    if name.len() != 20 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Store::open refuses exactly what StoreUrl::parse refuses, with its reason: the CLI, the
    // daemons and the volume model give one answer for one URL.
    #[test]
    fn open_refuses_what_the_url_check_refuses_and_says_why() {
        for bad in [
            "",
            "bucket/prefix",
            "s3:///prefix",
            "ftp://x/y",
            "file://host/x",
            "file://rel",
            "S3://b/p",
            "s3://b//p",
            "s3://b/../p",
            "az://c.d/p",
        ] {
            let why = StoreUrl::parse(bad).unwrap_err();
            match Store::open(bad) {
                Err(Error::InvalidStore { why: said, .. }) => assert_eq!(said, why, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let abs = path.to_str().unwrap();
        assert_eq!(StoreUrl::parse(abs), Ok(StoreUrl::Local(path.clone())));
        assert_eq!(
            StoreUrl::parse(&format!("file://{abs}")),
            Ok(StoreUrl::Local(path))
        );
        assert_eq!(StoreUrl::parse("s3://b/p"), Ok(StoreUrl::S3));
        assert_eq!(StoreUrl::parse("gs://b"), Ok(StoreUrl::Gcs));
        assert_eq!(StoreUrl::parse("az://c/p"), Ok(StoreUrl::Azure));
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact_url("s3://AKIA:secret@bucket/p?x-amz-security-token=abc"),
            "s3://bucket/p"
        );
        assert_eq!(
            redact_url("az://container/p?sv=2020&sig=SECRET"),
            "az://container/p"
        );
        assert_eq!(redact_url("/var/cache"), "/var/cache");
    }

    #[test]
    fn generation_names_sort_numerically() {
        let l = Layout {
            base: Path::from("root/s"),
        };
        let a = l.generation("k", 9).to_string();
        let b = l.generation("k", 10).to_string();
        assert!(a < b);
        assert_eq!(parse_generation(&l.generation("k", 42)), Some(42));
        assert_eq!(parse_generation(&Path::from("x/12")), None);
    }
}
