//! A corrupt pack does not poison its cache: the `cachevol run` that finds it runs cold, its
//! commit uploads the damaged chunks again instead of deduplicating against them, the next
//! restore succeeds, and GC deletes the quarantined pack once nothing kept references it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    url: String,
}

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .arg("--store")
            .arg(&self.url)
            .arg("--state-dir")
            .arg(self.root.join("state"))
            .env_remove("CACHEVOL_STORE")
            .env_remove("CACHEVOL_SCOPE")
            .args(args)
            .output()
            .unwrap()
    }

    /// `cachevol run` of a CI step on a fresh runner: the cache dir is new, the command
    /// (re)creates the cache content from `src` when it is not there.
    fn ci_step(&self, dir: &Path) -> Output {
        let cache = format!("k={}", dir.display());
        let script = format!(
            "cp -a {}/. {}/",
            self.root.join("src").display(),
            dir.display()
        );
        self.run(&["run", "--cache", &cache, "--", "sh", "-c", &script])
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn corrupt_pack_is_quarantined(url: String) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let env = Env {
        _tmp: tmp,
        root: root.clone(),
        url: url.clone(),
    };
    let src = root.join("src");
    for i in 0..4u64 {
        write(&src.join(format!("lib/f{i}.bin")), &noise(i + 1, 150_000));
    }
    write(&src.join("index.json"), b"{\"v\":1}\n");

    // First CI run: a miss; the command fills the cache, which is committed.
    let out = env.ci_step(&root.join("run1"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let bad = corrupt_largest_pack(&url).await;

    // Second run finds the corrupt pack: it warns and runs cold, and commits the tree again.
    let run2 = root.join("run2");
    let out = env.ci_step(&run2);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restore failed"),
        "{}",
        text(&out)
    );

    // The generation it wrote restores, byte for byte, and verifies.
    let back = root.join("back");
    let out = env.run(&["restore", "k", back.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_trees_equal(&src, &back);
    let out = env.run(&["verify", "k"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // And so does every later run's restore.
    let out = env.ci_step(&root.join("run3"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("restore failed"),
        "{}",
        text(&out)
    );

    // GC deletes the quarantined pack once no kept generation references it (whatever its
    // age), and forgets the quarantine with it.
    let listing = store_listing(&url).await;
    assert!(
        listing
            .keys()
            .any(|k| k.ends_with(&format!("quarantine/{bad}"))),
        "the corrupt pack is quarantined: {listing:#?}"
    );
    let out = env.run(&["gc", "--keep-last", "1", "--grace", "1h"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let listing = store_listing(&url).await;
    assert!(
        !listing.keys().any(|k| k.contains(&bad)),
        "the corrupt pack and its quarantine are gone: {listing:#?}"
    );
    let out = env.run(&["restore", "k", root.join("back2").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_trees_equal(&src, &root.join("back2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_pack_is_quarantined_file_store() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(&tmp.path().join("store"));
    corrupt_pack_is_quarantined(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_pack_is_quarantined_s3_store() {
    let Some(url) = s3_url("quarantine") else {
        return;
    };
    corrupt_pack_is_quarantined(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_pack_is_quarantined_azure_store() {
    let Some(url) = az_url("quarantine") else {
        return;
    };
    corrupt_pack_is_quarantined(url).await;
}
