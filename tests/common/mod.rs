//! Helpers shared by the integration tests: stores (file://, the S3 server and Azurite of
//! .ci/run, a real GCS bucket when one is configured), tree builders, and a tree comparison
//! that checks what a user would notice after a restore: contents byte for byte, kinds, modes,
//! symlink targets and mtimes.
#![allow(dead_code)]
pub mod apiserver;
pub mod conditional;
pub mod faultproxy;
pub mod store_suite;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cachevol::engine::format::Digest;
use cachevol::engine::{Engine, Store};

/// Whether this is a CI run: `CI` set to anything but empty or `false` (.ci/run exports
/// `CI=true` unless told otherwise). The one reading of `CI` in the tests: see [`required`].
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Who provides what a test needs from its environment (a server, a file, a privilege), which
/// decides what its absence means: [`required`].
#[derive(Clone, Copy, Debug)]
pub enum Provider {
    /// .ci/run provides it (the text says how): missing under CI is a failure, since a test that
    /// skips there proves nothing; missing locally is a skip.
    CiRun(&'static str),
    /// Nothing .ci/run can provide, so the test is opt-in (the text says how to opt in): missing
    /// is a skip everywhere, CI included. The gs:// tests are the one case: no GCS emulator that
    /// .ci/run can install serves object_store's XML API writes with preconditions (README,
    /// "Testing gs://"), so they run only where a real bucket is configured.
    OptIn(&'static str),
}

/// The one rule for a test whose dependency may be missing: `found` when it is there; else,
/// under CI ([`in_ci`]) with a [`Provider::CiRun`] dependency, the test fails saying what is
/// missing and how .ci/run provides it; otherwise None after a line `SKIPPED <test>: <missing>
/// (<how>)`, and the test returns.
pub fn required<T>(test: &str, found: Option<T>, missing: &str, by: Provider) -> Option<T> {
    if found.is_some() {
        return found;
    }
    match by {
        Provider::CiRun(how) if in_ci() => {
            panic!("{test}: {missing}, but CI is set and must run it: {how}")
        }
        Provider::CiRun(how) | Provider::OptIn(how) => {
            eprintln!("SKIPPED {test}: {missing} ({how})");
            None
        }
    }
}

/// The value of environment variable `var`, None when unset or empty.
pub fn env_nonempty(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// The S3 store URL of the test environment (`CACHEVOL_TEST_S3_URL`, set by .ci/run), with a
/// fresh prefix for `test` so tests never see each other's objects. Unset: [`required`] (fails
/// under CI, else skipped).
pub fn s3_url(test: &str) -> Option<String> {
    let how = ".ci/run starts moto's S3 server and sets CACHEVOL_TEST_S3_URL";
    env_store_url("CACHEVOL_TEST_S3_URL", "S3", how, test)
}

/// The Azure Blob store URL of the test environment (`CACHEVOL_TEST_AZ_URL`, e.g.
/// `az://cachevol/ci-123`, set by .ci/run against Azurite with the `AZURE_*` variables and
/// `AZURITE_BLOB_STORAGE_URL`), with a fresh prefix for `test`. Unset: [`required`] (fails
/// under CI, else skipped).
pub fn az_url(test: &str) -> Option<String> {
    let how = ".ci/run starts Azurite and sets CACHEVOL_TEST_AZ_URL";
    env_store_url("CACHEVOL_TEST_AZ_URL", "Azure", how, test)
}

/// The Google Cloud Storage URL of a real bucket (`CACHEVOL_TEST_GS_URL`, e.g.
/// `gs://my-bucket/cachevol-test`, with object_store's `GOOGLE_*` credentials), with a fresh
/// prefix for `test`. Unset: skipped, **also under CI**: the gs:// tests are
/// [`Provider::OptIn`], since .ci/run can start no GCS emulator for them.
pub fn gs_url(test: &str) -> Option<String> {
    let base = required(
        test,
        env_nonempty("CACHEVOL_TEST_GS_URL"),
        "CACHEVOL_TEST_GS_URL is not set",
        Provider::OptIn(
            "the GCS tests need a real bucket, gs://BUCKET/PREFIX and GOOGLE_* credentials, \
             also under CI: no GCS emulator installable here serves object_store's XML API \
             writes with preconditions (README, \"Testing gs://\")",
        ),
    )?;
    Some(fresh_prefix(&base, test))
}

fn env_store_url(var: &str, what: &str, how: &'static str, test: &str) -> Option<String> {
    let base = required(
        test,
        env_nonempty(var),
        &format!("{var} is not set, the {what} tests need it"),
        Provider::CiRun(how),
    )?;
    Some(fresh_prefix(&base, test))
}

/// `base` with a prefix below it that no other test (or run) uses.
fn fresh_prefix(base: &str, test: &str) -> String {
    format!("{}/{}-{}", base.trim_end_matches('/'), test, unique())
}

/// A number unique within this process and very likely across processes.
pub fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

pub fn open(url: &str) -> Store {
    Store::open(url).unwrap_or_else(|e| panic!("open store {url}: {e}"))
}

pub fn engine(url: &str, scope: &str, state: &Path) -> Engine {
    Engine::new(open(url), scope, state).unwrap()
}

/// Deterministic pseudo-random, incompressible bytes (xorshift64*).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets the mtime (and atime) of `path` without following a symlink, in nanoseconds.
pub fn set_mtime(path: &Path, ns: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    let times = [ts, ts];
    // SAFETY: valid NUL-terminated path and a two-element array that outlives the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A tree with everything a cache holds: nested dirs, empty files, a large file of several
/// content-defined chunks, relative, absolute and dangling symlinks, assorted modes (0755,
/// 0600, 0444 files, a 0555 dir) and nanosecond mtimes.
pub fn make_rich_tree(root: &Path, seed: u64) {
    std::fs::create_dir_all(root).unwrap();
    write(&root.join("README"), b"hello cache\n");
    write(&root.join("empty"), b"");
    write(&root.join("a/b/c/deep.txt"), b"deep content\n");
    write(&root.join("a/b/c/empty"), b"");
    std::fs::create_dir_all(root.join("a/empty-dir")).unwrap();
    write(&root.join("big.bin"), &noise(seed, 12 << 20 | 12345));
    // Mid-size compressible data (several chunks of text).
    let text: Vec<u8> = (0..300_000u32)
        .flat_map(|i| format!("line {i} of seed {seed}\n").into_bytes())
        .collect();
    write(&root.join("a/log.txt"), &text);
    for i in 0..40 {
        write(
            &root.join(format!("many/f{i:03}.json")),
            format!("{{\"i\":{i},\"seed\":{seed}}}").as_bytes(),
        );
    }
    write(&root.join("bin/tool"), b"#!/bin/sh\necho tool\n");
    chmod(&root.join("bin/tool"), 0o755);
    write(&root.join("secret"), b"only me\n");
    chmod(&root.join("secret"), 0o600);
    write(&root.join("readonly.txt"), b"do not touch\n");
    chmod(&root.join("readonly.txt"), 0o444);
    write(&root.join("ro-dir/inside.txt"), b"inside a read-only dir\n");
    std::os::unix::fs::symlink("a/b/c/deep.txt", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("../README", root.join("a/up-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("b", root.join("a/dir-link")).unwrap();

    // Distinct nanosecond mtimes everywhere, deepest first so directories keep theirs.
    let mut paths: Vec<PathBuf> = walk(root).into_iter().map(|(p, _)| p).collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in paths.iter().enumerate() {
        set_mtime(
            &root.join(p),
            1_600_000_000_123_456_789 + i as i64 * 1_000_003_007,
        );
    }
    chmod(&root.join("ro-dir"), 0o555);
}

/// One entry of a tree as a user sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        mtime: i64,
        size: u64,
        digest: Digest,
    },
    Dir {
        mode: u32,
        mtime: i64,
    },
    Symlink {
        target: PathBuf,
        mtime: i64,
    },
    Other(String),
}

fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for item in std::fs::read_dir(root.join(&rel)).unwrap() {
            let item = item.unwrap();
            let r = rel.join(item.file_name());
            let md = std::fs::symlink_metadata(root.join(&r)).unwrap();
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.push((r, md));
        }
    }
    out
}

/// Every entry below `root` (not `root` itself), by relative path, with its content hashed.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    walk(root)
        .into_iter()
        .map(|(rel, md)| {
            let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            let mode = md.mode() & 0o7777;
            let ft = md.file_type();
            let node = if ft.is_symlink() {
                Node::Symlink {
                    target: std::fs::read_link(root.join(&rel)).unwrap(),
                    mtime,
                }
            } else if ft.is_dir() {
                Node::Dir { mode, mtime }
            } else if ft.is_file() {
                let data = std::fs::read(root.join(&rel)).unwrap();
                Node::File {
                    mode,
                    mtime,
                    size: data.len() as u64,
                    digest: Digest::of(&data),
                }
            } else {
                Node::Other(format!("{ft:?}"))
            };
            (rel, node)
        })
        .collect()
}

/// Asserts two trees are equal, naming the first differences.
pub fn assert_trees_equal(expected: &Path, actual: &Path) {
    let a = tree(expected);
    let b = tree(actual);
    assert_tree_maps_equal(
        &a,
        &b,
        &format!("{} vs {}", expected.display(), actual.display()),
    );
}

pub fn assert_tree_maps_equal(
    a: &BTreeMap<PathBuf, Node>,
    b: &BTreeMap<PathBuf, Node>,
    what: &str,
) {
    let mut diffs = Vec::new();
    for (p, n) in a {
        match b.get(p) {
            None => diffs.push(format!("missing {}: {n:?}", p.display())),
            Some(m) if m != n => diffs.push(format!(
                "differs {}:\n    expected {n:?}\n    actual   {m:?}",
                p.display()
            )),
            _ => {}
        }
    }
    for (p, n) in b {
        if !a.contains_key(p) {
            diffs.push(format!("extra {}: {n:?}", p.display()));
        }
    }
    assert!(
        diffs.is_empty(),
        "trees differ ({what}), {} differences:\n  {}",
        diffs.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert!(
        !a.is_empty(),
        "comparing empty trees proves nothing ({what})"
    );
}

/// Every object below `root` of a file:// store with its size (a listing to compare).
pub fn listing(root: &Path) -> BTreeMap<PathBuf, u64> {
    if !root.exists() {
        return BTreeMap::new();
    }
    walk(root)
        .into_iter()
        .filter(|(_, md)| md.is_file())
        .map(|(p, md)| (p, md.len()))
        .collect()
}

/// Every object of a store (any backend) with its size, below the store's root.
pub async fn store_listing(url: &str) -> BTreeMap<String, u64> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let (store, prefix) = raw_store(url);
    store
        .list(Some(&prefix))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .unwrap()
}

/// The object_store behind a URL, without cachevol in between, and the URL's prefix.
pub fn raw_store(
    url: &str,
) -> (
    std::sync::Arc<dyn object_store::ObjectStore>,
    object_store::path::Path,
) {
    let parsed = url::Url::parse(url).unwrap();
    if parsed.scheme() == "file" {
        let path = parsed.to_file_path().unwrap();
        std::fs::create_dir_all(&path).unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(path).unwrap();
        return (std::sync::Arc::new(fs), object_store::path::Path::default());
    }
    let prefix = object_store::path::Path::parse(parsed.path().trim_start_matches('/')).unwrap();
    if parsed.scheme() == "gs" {
        let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
            .with_url(url)
            .build()
            .unwrap();
        return (std::sync::Arc::new(gcs), prefix);
    }
    if matches!(parsed.scheme(), "az" | "azure" | "abfs" | "abfss") {
        let az = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_url(url)
            .build()
            .unwrap();
        return (std::sync::Arc::new(az), prefix);
    }
    let s3 = object_store::aws::AmazonS3Builder::from_env()
        .with_url(url)
        .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
        .build()
        .unwrap();
    (std::sync::Arc::new(s3), prefix)
}

/// The pack objects of a scope in a listing.
pub fn packs_in(
    listing: &BTreeMap<String, u64>,
    scope: &str,
) -> std::collections::BTreeSet<String> {
    listing
        .keys()
        .filter(|k| k.contains(&format!("{scope}/packs/")))
        .map(|k| k.rsplit('/').next().unwrap().to_string())
        .collect()
}

/// The packs a generation references (its file chunks and its manifest chunks), as hex ids.
pub async fn referenced_packs(
    e: &Engine,
    key: &str,
    generation: u64,
) -> std::collections::BTreeSet<String> {
    let g = e.load_generation(key, generation).await.unwrap();
    let entries = e.load_entries(&g).await.unwrap();
    entries
        .iter()
        .flat_map(|e| &e.chunks)
        .chain(&g.manifest)
        .map(|r| r.p.to_hex())
        .collect()
}

/// A tree as `find` sees it (path, type, mode, link target) plus every file's hash: equal
/// listings mean equal trees to a user.
pub fn find_listing(root: &Path) -> Vec<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . -mindepth 1 -printf '%p %y %m %l\\n' | sort && find . -type f -exec sha1sum {{}} + | sort",
            root.display()
        ))
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// A port on 127.0.0.1 that was free a moment ago (for a server the test starts next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until a plugin (`what`: a process the test started, `child`, logging to `log`) accepts
/// connections on its unix socket, at most `timeout`. A plugin that exits meanwhile fails the
/// test at once, and a late one at the deadline; both with its log.
pub fn wait_for_socket(
    what: &str,
    child: &mut std::process::Child,
    socket: &Path,
    log: &Path,
    timeout: std::time::Duration,
) {
    let logs = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = std::time::Instant::now() + timeout;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what} exited ({st}):\n{}", logs());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {} within {timeout:?}:\n{}",
            socket.display(),
            logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A gRPC channel over a unix socket, dialled as kubelet and the CSI sidecars do.
pub async fn dial_unix(socket: &Path) -> tonic::transport::Channel {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::1]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect to the plugin's socket")
}

/// The store of a test that runs on any backend: `CACHEVOL_TEST_STORE` picks it (`file`, the
/// default: a `file://` store at `dir`, so the test always runs; `s3` or `az`: the servers of
/// .ci/run, which must then be configured).
pub fn test_store_url(test: &str, dir: &Path) -> String {
    let backend = std::env::var("CACHEVOL_TEST_STORE").unwrap_or_default();
    match backend.as_str() {
        "" | "file" => {
            std::fs::create_dir_all(dir).unwrap();
            file_url(dir)
        }
        "s3" => s3_url(test).expect("CACHEVOL_TEST_STORE=s3 needs CACHEVOL_TEST_S3_URL"),
        "az" => az_url(test).expect("CACHEVOL_TEST_STORE=az needs CACHEVOL_TEST_AZ_URL"),
        other => panic!("CACHEVOL_TEST_STORE={other}: expected file, s3 or az"),
    }
}

/// Flips one byte in the middle of the largest pack of the scope; returns its id.
pub async fn corrupt_largest_pack(url: &str) -> String {
    use object_store::ObjectStoreExt;
    let (store, _) = raw_store(url);
    let listing = store_listing(url).await;
    let (name, _) = listing
        .iter()
        .filter(|(k, _)| k.contains("/packs/"))
        .max_by_key(|(_, size)| **size)
        .expect("a pack");
    let loc = object_store::path::Path::from(name.as_str());
    let mut data = store
        .get(&loc)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let mid = data.len() / 2;
    data[mid] ^= 0x5a;
    store.put(&loc, data.into()).await.unwrap();
    name.rsplit('/').next().unwrap().to_string()
}
