//! An S3 store that throttles (503 SlowDown, 429), answers slowly or drops connections, put
//! between cachevol and the tests' S3 server by a proxy on 127.0.0.1 (tests/common/faultproxy.rs).
//! Each test states the outcome it asserts: a commit through a short throttle finishes once the
//! store recovers (object_store's retries, backoff with jitter); one through a throttle longer
//! than the retry budget fails as "store unavailable" and moves no head; a slow store that drops
//! connections still restores and commits correctly; a warm restore under a throttle fails fast
//! as "unavailable" and leaves the directory and its local state as they were (DESIGN.md §1: a
//! cache must never fail or hang a build; callers degrade to the stale copy).
//!
//! The S3 client reads its endpoint from the environment, which is process-wide: every test
//! holds [`ENV`] for its whole run, so they run one at a time and each sees its own settings.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cachevol::engine::{CommitOptions, CommitOutcome, Engine, Error, RestoreSource, Store};
use common::faultproxy::{Fault, FaultProxy};
use common::Provider;

/// Held by each test for its whole run (across awaits, and a panicking test releases it).
static ENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The S3 server's address, read once from `AWS_ENDPOINT_URL` before any test points that at
/// a proxy.
fn upstream() -> Option<SocketAddr> {
    static UPSTREAM: OnceLock<Option<SocketAddr>> = OnceLock::new();
    *UPSTREAM.get_or_init(|| {
        let endpoint = common::env_nonempty("AWS_ENDPOINT_URL")?;
        let u = url::Url::parse(&endpoint).ok()?;
        let host = u.host_str()?;
        format!("{host}:{}", u.port()?).parse().ok()
    })
}

/// One test's world: the S3 URL (a fresh prefix), the proxy in front of the S3 server, and a
/// temporary directory. The environment points the S3 client at the proxy while it lives.
struct World {
    url: String,
    upstream: SocketAddr,
    proxy: FaultProxy,
    tmp: tempfile::TempDir,
    _env: tokio::sync::MutexGuard<'static, ()>,
}

/// Sets up `test` with a per-request timeout of `timeout` seconds; None (after `required`'s
/// skip message) without the S3 server.
async fn world(test: &str, timeout: &str) -> Option<World> {
    let env = ENV.lock().await;
    let url = common::s3_url(test)?;
    let upstream = common::required(
        test,
        upstream(),
        "AWS_ENDPOINT_URL names no host:port of an S3 server",
        Provider::CiRun(".ci/run starts moto's S3 server and sets AWS_ENDPOINT_URL"),
    )?;
    let proxy = FaultProxy::start(upstream).await;
    std::env::set_var("AWS_ENDPOINT_URL", proxy.endpoint());
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("CACHEVOL_STORE_TIMEOUT", timeout);
    Some(World {
        url,
        upstream,
        proxy,
        tmp: tempfile::tempdir().unwrap(),
        _env: env,
    })
}

impl World {
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// An engine whose requests go through the proxy.
    fn engine(&self, state: &str) -> Engine {
        Engine::new(Store::open(&self.url).unwrap(), "default", self.path(state)).unwrap()
    }

    /// An engine that talks to the S3 server directly, with a fresh local state: what another
    /// node sees.
    fn direct_engine(&self, state: &str) -> Engine {
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://{}", self.upstream));
        let store = Store::open(&self.url);
        std::env::set_var("AWS_ENDPOINT_URL", self.proxy.endpoint());
        Engine::new(store.unwrap(), "default", self.path(state)).unwrap()
    }

    /// Every object below the URL's prefix, listed directly from the S3 server.
    async fn listing(&self) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        let parsed = url::Url::parse(&self.url).unwrap();
        let prefix =
            object_store::path::Path::parse(parsed.path().trim_start_matches('/')).unwrap();
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_url(&self.url)
            .with_endpoint(format!("http://{}", self.upstream))
            .build()
            .unwrap();
        let mut names: Vec<String> = s3
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        names.sort();
        names
    }

    /// The generation objects of `key`, by name, listed directly.
    async fn generation_objects(&self, key: &str) -> Vec<String> {
        let marker = format!("/default/manifests/{key}/");
        self.listing()
            .await
            .into_iter()
            .filter(|n| n.contains(&marker))
            .collect()
    }

    /// Restores the newest generation of `key` on a fresh engine, straight from the S3 server,
    /// and checks it equals `expected`, naming `what`.
    async fn assert_restores(&self, key: &str, expected: &Path, generation: u64, what: &str) {
        let state = format!("verify-state-{}", common::unique());
        let dir = self.path(&format!("verify-{}", common::unique()));
        let report = self
            .direct_engine(&state)
            .restore(key, &[], &dir)
            .await
            .unwrap_or_else(|e| panic!("{what}: the fresh restore failed: {e}"));
        assert_eq!(
            report.source,
            RestoreSource::Key {
                key: key.into(),
                generation
            },
            "{what}"
        );
        common::assert_trees_equal(expected, &dir);
    }

    /// A summary of the proxy's log for messages: how many requests got each fault.
    fn faults_seen(&self) -> String {
        let log = self.proxy.log();
        let count = |f| log.iter().filter(|s| s.fault == f).count();
        format!(
            "{} requests seen, {} forwarded; slowdown {}, 429 {}, dropped {}, cut {}",
            self.proxy.seen(),
            self.proxy.forwarded(),
            count(Fault::SlowDown),
            count(Fault::TooMany),
            count(Fault::Drop),
            count(Fault::Cut)
        )
    }
}

fn committed(outcome: &CommitOutcome) -> u64 {
    match outcome {
        CommitOutcome::Committed { generation } => *generation,
        other => panic!("expected a new generation, got {other:?}"),
    }
}

/// A small tree: a few files, one of a few chunks, so a commit is several requests.
fn small_tree(root: &Path, seed: u64) {
    common::write(&root.join("README"), format!("seed {seed}\n").as_bytes());
    common::write(&root.join("big.bin"), &common::noise(seed, 3 << 20));
    for i in 0..10 {
        common::write(
            &root.join(format!("many/f{i:02}.json")),
            format!("{{\"i\":{i},\"seed\":{seed}}}").as_bytes(),
        );
    }
}

/// Commits a tree while the proxy answers every request with `fault` for `window`, from the
/// moment the first pack upload went through (so the throttle meets the commit's parallel pack
/// uploads, and what follows them), then lets everything pass: the commit must finish on
/// object_store's own retries, the requests it retried seen by the proxy but not forwarded.
async fn commit_through_throttle(test: &str, fault: Fault, window: Duration) {
    let Some(w) = world(test, "60").await else {
        return;
    };
    let src = w.path("src");
    common::make_rich_tree(&src, 7);
    let e = w.engine("state");
    let started = Instant::now();
    w.proxy.set_after("PUT", "/packs/", fault);
    let lift = {
        let proxy = w.proxy.handle();
        tokio::spawn(async move {
            while !proxy.fired() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let began = Instant::now();
            tokio::time::sleep(window).await;
            proxy.set(Fault::Pass);
            (began, Instant::now())
        })
    };
    let report = e
        .commit("npm", &src, &CommitOptions::default())
        .await
        .unwrap_or_else(|err| {
            panic!(
                "{test}: the commit failed under a {window:?} throttle: {err} ({})",
                w.faults_seen()
            )
        });
    assert!(w.proxy.fired(), "{test}: no pack upload, so no throttle");
    let (began, lifted) = lift.await.unwrap();
    let took = started.elapsed();
    let throttled: std::collections::BTreeSet<String> = w
        .proxy
        .log()
        .iter()
        .filter(|s| s.fault == fault)
        .map(|s| {
            format!(
                "{} {}",
                s.method,
                s.path.rsplit("/default/").next().unwrap()
            )
        })
        .collect();
    let generation = committed(&report.outcome);
    let refused = w.proxy.log().iter().filter(|s| s.fault == fault).count() as u64;
    eprintln!(
        "{test}: committed generation {generation} in {took:?}, {:?} after the throttle ended; {}; \
         throttled: {throttled:?}",
        Instant::now().duration_since(lifted),
        w.faults_seen()
    );
    // The commit really met the throttle and got through it by retrying.
    assert!(refused > 0, "{test}: no request was throttled");
    assert!(
        w.proxy.seen() > w.proxy.forwarded(),
        "{test}: {}",
        w.faults_seen()
    );
    assert_eq!(w.proxy.seen(), w.proxy.forwarded() + refused);
    // It was still running when the throttle ended: it rode the whole throttle out.
    assert!(
        Instant::now().duration_since(began) >= window,
        "{test}: finished before the store recovered"
    );
    assert_eq!(
        w.generation_objects("npm").await.len(),
        1,
        "{test}: exactly one generation"
    );
    w.assert_restores("npm", &src, generation, test).await;
}

/// A 4 s burst of 503 SlowDown from the start of a commit: the commit finishes once the store
/// recovers, and the generation restores whole elsewhere. (With object_store's default of 10
/// retries, about 2.6 s of backoff, this failed four times in five; see `retry_config` in
/// src/engine/store.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_through_a_short_slowdown_throttle_succeeds() {
    commit_through_throttle("faults-slowdown", Fault::SlowDown, Duration::from_secs(4)).await;
}

/// The same with 429 Too Many Requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_through_a_short_429_throttle_succeeds() {
    commit_through_throttle("faults-429", Fault::TooMany, Duration::from_secs(4)).await;
}

/// A throttle that outlasts the retry budget (a 3 s per-request timeout here) fails the commit as
/// "store unavailable", quickly, after it had begun uploading packs; no new generation object
/// exists, so the previous generation is still the newest and restores whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_through_a_long_throttle_fails_unavailable_and_moves_no_head() {
    let test = "faults-long-throttle";
    let Some(w) = world(test, "3").await else {
        return;
    };
    let src = w.path("src");
    small_tree(&src, 1);
    let e = w.engine("state");
    let g1 = committed(
        &e.commit("npm", &src, &CommitOptions::default())
            .await
            .unwrap()
            .outcome,
    );
    // What generation 1 holds, to compare with after the failed commit.
    let first = w.path("first");
    w.assert_restores("npm", &src, g1, test).await;
    w.direct_engine("first-state")
        .restore("npm", &[], &first)
        .await
        .unwrap();
    let before = w.listing().await;

    // Changed content: new packs to upload. The throttle starts once the first pack upload went
    // through, so the commit is caught half way.
    common::write(&src.join("big.bin"), &common::noise(2, 3 << 20));
    common::write(&src.join("new.txt"), b"new\n");
    w.proxy.reset_counts();
    w.proxy.set_after("PUT", "/packs/", Fault::SlowDown);
    let started = Instant::now();
    let err = e
        .commit("npm", &src, &CommitOptions::default())
        .await
        .expect_err("a commit through a throttle longer than the retry budget fails");
    let took = started.elapsed();
    eprintln!("{test}: failed after {took:?}: {err}; {}", w.faults_seen());
    assert!(
        err.is_store_unavailable(),
        "{test}: not recognized as unavailable: {err:?}"
    );
    // object_store gave up before the timeout, so the error is the store's own answer.
    assert!(
        matches!(err, Error::Store { .. }) && err.to_string().contains("SlowDown"),
        "{test}: {err:?}"
    );
    assert!(
        w.proxy.log().iter().any(|s| s.fault == Fault::SlowDown),
        "{test}: the throttle never started"
    );
    // Bounded by the per-request timeout (3 s), plus a margin for the requests before it.
    assert!(took < Duration::from_secs(8), "{test}: took {took:?}");

    w.proxy.set(Fault::Pass);
    let after = w.listing().await;
    let new: Vec<&String> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(
        new.iter()
            .all(|n| !n.contains("/manifests/") && !n.contains("/heads/")),
        "{test}: the failed commit left a generation or head object: {new:?}"
    );
    assert_eq!(
        w.generation_objects("npm").await.len(),
        1,
        "{test}: {after:?}"
    );
    assert_eq!(
        w.direct_engine("check").newest("npm").await.unwrap(),
        Some(g1)
    );
    w.assert_restores("npm", &first, g1, test).await;
}

/// A slow store (300 ms, then 150 ms a request) that loses every 4th request: first by closing
/// the connection without answering (the request never reached the store), then by cutting the
/// answer in half after the store did it (so object_store resends creates, puts, deletes and
/// reads the store already served). Each time a restore on a fresh node and a commit from it
/// complete, retried by object_store, and what they moved is exact: the restored tree, one new
/// generation per commit, which restores whole elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_store_losing_requests_restores_and_commits_correctly() {
    let test = "faults-slow-drops";
    let Some(w) = world(test, "60").await else {
        return;
    };
    let src = w.path("src");
    small_tree(&src, 3);
    let mut newest = committed(
        &w.direct_engine("writer")
            .commit("npm", &src, &CommitOptions::default())
            .await
            .unwrap()
            .outcome,
    );
    let mut expected = src;
    // The second round is less slow: what it tests is the cut answers, and the file must stay
    // within its minute in CI.
    for (round, (fault, delay)) in [(Fault::Drop, 300), (Fault::Cut, 150)]
        .into_iter()
        .enumerate()
    {
        w.proxy.reset_counts();
        w.proxy.delay(Duration::from_millis(delay));
        w.proxy.every(4, fault);
        let e = w.engine(&format!("state-{round}"));
        let dir = w.path(&format!("dir-{round}"));
        let started = Instant::now();
        let report = e.restore("npm", &[], &dir).await.unwrap_or_else(|err| {
            panic!(
                "{test}: {fault:?}: restore failed: {err} ({})",
                w.faults_seen()
            )
        });
        eprintln!(
            "{test}: {fault:?}: restore took {:?}; {}",
            started.elapsed(),
            w.faults_seen()
        );
        assert_eq!(
            report.source,
            RestoreSource::Key {
                key: "npm".into(),
                generation: newest
            }
        );
        common::assert_trees_equal(&expected, &dir);

        common::write(
            &dir.join("big.bin"),
            &common::noise(4 + round as u64, 3 << 20),
        );
        common::write(&dir.join(format!("many/extra{round}.json")), b"{}");
        let started = Instant::now();
        let g = committed(
            &e.commit("npm", &dir, &CommitOptions::default())
                .await
                .unwrap_or_else(|err| {
                    panic!(
                        "{test}: {fault:?}: commit failed: {err} ({})",
                        w.faults_seen()
                    )
                })
                .outcome,
        );
        let hit: Vec<String> = w
            .proxy
            .log()
            .iter()
            .filter(|s| s.fault == fault)
            .map(|s| {
                format!(
                    "{} {}",
                    s.method,
                    s.path.rsplit("/default/").next().unwrap()
                )
            })
            .collect();
        eprintln!(
            "{test}: {fault:?}: commit took {:?}; {}; {fault:?}: {hit:?}",
            started.elapsed(),
            w.faults_seen()
        );
        let lost = w.proxy.log().iter().filter(|s| s.fault == fault).count();
        assert!(lost > 1, "{test}: {fault:?}: {}", w.faults_seen());
        assert_eq!(
            g,
            newest + 1,
            "{test}: {fault:?}: one commit, one generation"
        );
        assert_eq!(
            w.generation_objects("npm").await.len() as u64,
            g,
            "{test}: {fault:?}"
        );
        w.assert_restores("npm", &dir, g, test).await;
        (newest, expected) = (g, dir);
    }
}

/// A warm restore (the directory already holds the newest generation, and the engine's local
/// state says so) reads the head, the generation and its manifest pages, no file data. While
/// the store throttles, it fails within the retry budget as "store unavailable", and the
/// directory and its local state are as they were: the caller degrades to the stale copy
/// (DESIGN.md §1), and once the store is back the unchanged directory commits as unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_restore_under_a_throttle_fails_fast_and_keeps_the_copy() {
    let test = "faults-warm-restore";
    let Some(w) = world(test, "3").await else {
        return;
    };
    let src = w.path("src");
    small_tree(&src, 5);
    let g1 = committed(
        &w.direct_engine("writer")
            .commit("npm", &src, &CommitOptions::default())
            .await
            .unwrap()
            .outcome,
    );
    let e = w.engine("state");
    let dir = w.path("dir");
    e.restore("npm", &[], &dir).await.unwrap();
    let cold = w.proxy.log();
    assert!(cold.iter().any(|s| s.path.contains("/packs/")), "{cold:?}");

    // Warm, with the store answering: no file data is fetched; the only pack reads are ranged
    // reads of the generation's manifest pages (format 2 keeps them in packs), a few KiB.
    w.proxy.reset_counts();
    let report = e.restore("npm", &[], &dir).await.unwrap();
    let warm = w.proxy.log();
    eprintln!(
        "{test}: warm restore, {} requests: {:?}",
        warm.len(),
        warm.iter()
            .map(|s| format!(
                "{} {}",
                s.method,
                s.path.rsplit("/default/").next().unwrap()
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(report.downloaded, 0);
    let page_bytes: u64 =
        warm.iter()
            .filter(|s| s.path.contains("/packs/"))
            .map(|s| {
                let range = s.range.as_deref().unwrap_or_else(|| {
                    panic!("{test}: a warm restore read a whole pack: {warm:?}")
                });
                let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap();
                b.parse::<u64>().unwrap() + 1 - a.parse::<u64>().unwrap()
            })
            .sum();
    assert!(
        page_bytes < 64 << 10,
        "{test}: {page_bytes} bytes of packs read: {warm:?}"
    );
    common::assert_trees_equal(&src, &dir);

    // Warm, with the store throttling.
    w.proxy.reset_counts();
    w.proxy.set(Fault::SlowDown);
    let started = Instant::now();
    let err = e
        .restore("npm", &[], &dir)
        .await
        .expect_err("a restore from a throttling store fails");
    let took = started.elapsed();
    eprintln!(
        "{test}: throttled warm restore failed after {took:?}: {err}; {}",
        w.faults_seen()
    );
    assert!(err.is_store_unavailable(), "{test}: {err:?}");
    assert!(
        matches!(err, Error::Store { .. }) && err.to_string().contains("SlowDown"),
        "{test}: {err:?}"
    );
    // Within the 3 s per-request timeout: retried for 70% of it, then the store's answer.
    assert!(took < Duration::from_secs(4), "{test}: took {took:?}");
    common::assert_trees_equal(&src, &dir);

    // The local state still knows the directory: with the store back, nothing to upload.
    w.proxy.set(Fault::Pass);
    let report = e
        .commit("npm", &dir, &CommitOptions::default())
        .await
        .unwrap();
    assert_eq!(
        report.outcome,
        CommitOutcome::Unchanged {
            generation: Some(g1)
        }
    );
    assert_eq!(report.uploaded, 0);
    assert_eq!(w.generation_objects("npm").await.len(), 1);
}

/// The store creates a generation, then the connection drops in the middle of its answer:
/// object_store sends the create again and the store refuses it (the object exists: ours).
/// The commit must still report the generation it created, once: not a second generation of
/// the same tree (before the fix: generations 2 and 3 for one commit), and not a refusal as if
/// another writer had taken the number (before the fix: a fenced commit reported `Fenced`
/// though its generation was in the store). And a listing whose answer is cut half way does
/// not fail the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_answers_to_a_generation_create_or_a_listing_commit_exactly_once() {
    let test = "faults-cut-create";
    let Some(w) = world(test, "60").await else {
        return;
    };
    let src = w.path("src");
    small_tree(&src, 8);
    let e = w.engine("state");
    let g1 = committed(
        &e.commit("npm", &src, &CommitOptions::default())
            .await
            .unwrap()
            .outcome,
    );
    for fence in [false, true] {
        common::write(&src.join("README"), format!("fence {fence}\n").as_bytes());
        w.proxy.reset_counts();
        w.proxy
            .fail_next_matching(1, "PUT", "/default/manifests/npm/", Fault::Cut);
        let opts = CommitOptions {
            fence,
            ..CommitOptions::default()
        };
        let result = e.commit("npm", &src, &opts).await;
        let creates: Vec<_> = w
            .proxy
            .log()
            .into_iter()
            .filter(|s| s.method == "PUT" && s.path.contains("/manifests/"))
            .map(|s| (s.path.rsplit('/').next().unwrap().to_string(), s.fault))
            .collect();
        let gens = w.generation_objects("npm").await;
        eprintln!(
            "{test}: fence {fence}: {:?}; creates {creates:?}; generations {:?}",
            result.as_ref().map(|r| &r.outcome),
            gens.iter()
                .map(|g| g.rsplit('/').next().unwrap())
                .collect::<Vec<_>>()
        );
        let expected = g1 + 1 + fence as u64;
        let name = format!("{expected:020}");
        // The fault happened as meant: the create was cut, then sent again, and nothing else.
        assert_eq!(
            creates,
            [(name.clone(), Fault::Cut), (name.clone(), Fault::Pass)],
            "{test}: fence {fence}"
        );
        let report = result.unwrap_or_else(|e| panic!("{test}: fence {fence}: {e}"));
        assert_eq!(
            report.outcome,
            CommitOutcome::Committed {
                generation: expected
            },
            "{test}: fence {fence}"
        );
        assert_eq!(
            gens.len() as u64,
            expected,
            "{test}: fence {fence}: {gens:?}"
        );
        w.assert_restores("npm", &src, expected, test).await;
    }

    // A listing cut half way: object_store reads a list body once, so cachevol asks again.
    common::write(&src.join("README"), b"after a cut listing\n");
    w.proxy.reset_counts();
    w.proxy
        .fail_next_matching(1, "GET", "list-type=2", Fault::Cut);
    let report = e
        .commit("npm", &src, &CommitOptions::default())
        .await
        .unwrap_or_else(|err| panic!("{test}: a cut listing failed the commit: {err}"));
    let lists: Vec<Fault> = w
        .proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "GET" && !s.path.contains("/default/"))
        .map(|s| s.fault)
        .collect();
    assert_eq!(lists.first(), Some(&Fault::Cut), "{test}: {lists:?}");
    assert!(
        lists.len() >= 2,
        "{test}: the listing was not asked again: {lists:?}"
    );
    assert_eq!(
        report.outcome,
        CommitOutcome::Committed { generation: g1 + 3 }
    );
    w.assert_restores("npm", &src, g1 + 3, test).await;
}

/// The proxy itself: it frames chunked bodies both ways and decides per request on one
/// keep-alive connection (a chunked PUT forwarded and its chunked answer passed back whole,
/// then a GET on the same connection refused with 503). No S3 server needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_frames_chunked_messages_and_decides_per_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that reads one chunked request per connection and answers in chunks.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let got = received.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = upstream.accept().await {
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.ends_with(b"0\r\n\r\n") {
                let n = c.read(&mut buf).await.unwrap();
                assert!(
                    n > 0,
                    "request cut short: {:?}",
                    String::from_utf8_lossy(&req)
                );
                req.extend_from_slice(&buf[..n]);
            }
            got.lock().unwrap().extend_from_slice(&req);
            c.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nTrailer: t\r\n\r\n",
            )
            .await
            .unwrap();
        }
    });
    let proxy = FaultProxy::start(addr).await;
    proxy.fail_next_matching(1, "GET", "/second", Fault::SlowDown);
    let mut c = tokio::net::TcpStream::connect(proxy.endpoint().trim_start_matches("http://"))
        .await
        .unwrap();
    let put = b"PUT /first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n";
    c.write_all(put).await.unwrap();
    let answer: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                          5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nTrailer: t\r\n\r\n";
    let mut first = vec![0u8; answer.len()];
    c.read_exact(&mut first).await.unwrap();
    assert_eq!(first, answer);
    assert_eq!(received.lock().unwrap().as_slice(), &put[..]);

    c.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut second = Vec::new();
    c.read_to_end(&mut second).await.unwrap();
    let second = String::from_utf8(second).unwrap();
    assert!(second.starts_with("HTTP/1.1 503 "), "{second}");
    assert!(second.contains("<Code>SlowDown</Code>"), "{second}");
    assert!(second.contains("Connection: close"), "{second}");
    assert_eq!((proxy.seen(), proxy.forwarded()), (2, 1));
    let log = proxy.log();
    assert_eq!(
        log.iter()
            .map(|s| (s.method.as_str(), s.path.as_str(), s.fault))
            .collect::<Vec<_>>(),
        [
            ("PUT", "/first", Fault::Pass),
            ("GET", "/second", Fault::SlowDown)
        ]
    );
}
