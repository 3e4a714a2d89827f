//! A store that hangs or refuses connections must fail a restore quickly with an error the
//! callers recognize as "store unavailable" (they degrade to a stale or empty cache): a cache
//! must never hang a build. This file sets process environment, so it holds a single test.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use cachevol::engine::{CommitOptions, Engine, Error, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_s3_store_fails_fast_as_unavailable() {
    // A server that accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn); // never read, never answered, never closed
        }
    });
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);

    std::env::set_var("CACHEVOL_STORE_TIMEOUT", "0.5");
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::remove_var("AWS_SESSION_TOKEN");

    let tmp = tempfile::tempdir().unwrap();
    for (what, port) in [("hanging", port), ("refusing", closed_port)] {
        std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"));
        let store = Store::open("s3://bucket/prefix").unwrap();
        let e = Engine::new(store, "default", tmp.path().join("state")).unwrap();
        let dir = tmp.path().join(format!("dir-{what}"));

        let started = Instant::now();
        let err = e
            .restore("npm", &["main".into()], &dir)
            .await
            .expect_err("a restore from a dead store fails");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "{what} store: restore took {took:?}: {err}"
        );
        assert!(
            err.is_store_unavailable(),
            "{what} store: not recognized as unavailable: {err:?}"
        );
        if what == "hanging" {
            assert!(matches!(err, Error::StoreTimeout { .. }), "{err:?}");
            assert!(err.to_string().contains("timed out"), "{err}");
        }
        // Nothing was written into the directory (which need not even exist).
        assert!(std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none()));

        // A commit fails the same way, quickly.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), b"x").unwrap();
        let started = Instant::now();
        let err = e
            .commit("npm", &dir, &CommitOptions::default())
            .await
            .expect_err("a commit to a dead store fails");
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        assert!(err.is_store_unavailable(), "{what}: {err:?}");
    }
}
