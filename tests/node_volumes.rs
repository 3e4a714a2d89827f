//! The node plugin's volumes with real mounts (the tests run as root): node-local bases shared
//! by pods, overlay views, the copy fallback, commits from a view's upper dir, the committed
//! tree kept as the next base, private/shared/locked modes, and a restart between unpublish and
//! commit.
//!
//! Every test runs with the node's default, bases written as EROFS images; `.ci/run` runs the
//! file again with `CACHEVOL_TEST_BASE_IMAGES=0` for bases written as trees of files (kernels
//! that cannot mount images).

use std::collections::HashMap;
use std::path::Path;

mod common;

use cachevol::engine::CommitOutcome;
use cachevol::node::{CommitDecision, NodeConfig, Publish, ViewKind, Volumes};
use cachevol::spec::{Ending, PodRef, VolumeSpec};

/// Whether the nodes of this run write their bases as images (the default) or as trees.
fn images() -> bool {
    std::env::var("CACHEVOL_TEST_BASE_IMAGES").map_or(true, |v| v != "0")
}

struct Node {
    volumes: Volumes,
}

/// Unmounts what the test's nodes left mounted under `dir` (image bases) when the test ends,
/// so its temporary directory can be removed.
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = cachevol::node::mount::unmount_all_under(self.0);
    }
}

fn node(root: &Path, name: &str, force_copy: bool) -> Node {
    let state = root.join(name);
    let volumes = Volumes::new(NodeConfig {
        node_id: name.into(),
        state_dir: state.clone(),
        default_store: None,
        force_copy,
        base_budget: None,
        base_images: images(),
    })
    .unwrap();
    Node { volumes }
}

fn ctx(store: &str, key: &str, mode: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut c: HashMap<String, String> = [
        ("store", store),
        ("scope", "team-a"),
        ("key", key),
        ("mode", mode),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        c.insert(k.to_string(), v.to_string());
    }
    c
}

fn pod(name: &str) -> PodRef {
    PodRef {
        name: name.into(),
        namespace: "ci".into(),
        uid: format!("uid-{name}"),
        service_account: "default".into(),
    }
}

/// Publishes volume `cv-vol` at `target` for pod `p` (of fsGroup `group`).
async fn try_publish(
    n: &Node,
    target: &Path,
    c: &HashMap<String, String>,
    p: &str,
    group: Option<u32>,
) -> cachevol::node::Result<cachevol::node::Published> {
    n.volumes
        .publish(Publish {
            volume_id: "cv-vol".into(),
            target: target.to_path_buf(),
            spec: VolumeSpec::from_publish(c, None).unwrap(),
            read_only: false,
            pod: Some(pod(p)),
            group,
            selinux_context: None,
        })
        .await
}

async fn publish_async(
    n: &Node,
    target: &Path,
    c: &HashMap<String, String>,
    p: &str,
) -> cachevol::node::Published {
    try_publish(n, target, c, p, None).await.unwrap()
}

/// Unpublishes and commits as a pod that ended with `ending`.
async fn finish(n: &Node, target: &Path, ending: Ending) -> CommitDecision {
    let pending = n.volumes.unpublish("cv-vol", target).await.unwrap();
    let view = pending.expect("the last target of the view");
    n.volumes.commit(&view.id, ending).await.unwrap()
}

fn generation(d: &CommitDecision) -> Option<u64> {
    match d {
        CommitDecision::Committed(r) => match r.outcome {
            CommitOutcome::Committed { generation } => Some(generation),
            CommitOutcome::Unchanged { .. } => None,
        },
        CommitDecision::Skipped(_) | CommitDecision::Fenced(_) | CommitDecision::NotPending => None,
    }
}

/// Commits `src` as `key` of scope team-a, as a CI step with the CLI would (state under `t`).
async fn commit_with_cli(store: &str, t: &Path, key: &str, src: &Path) {
    cachevol::engine::Engine::new(
        cachevol::engine::Store::open(store).unwrap(),
        "team-a",
        t.join("cli-state"),
    )
    .unwrap()
    .commit(key, src, &cachevol::engine::CommitOptions::default())
    .await
    .unwrap();
}

/// The commit found nothing changed since generation `g` and uploaded nothing.
fn assert_unchanged(d: &CommitDecision, g: u64) {
    match d {
        CommitDecision::Committed(r) => assert!(
            matches!(r.outcome, CommitOutcome::Unchanged { generation: Some(x) } if x == g)
                && r.uploaded == 0,
            "{r:?}"
        ),
        other => panic!("{other:?}"),
    }
}

fn mounted(p: &Path) -> bool {
    cachevol::node::mount::is_mount_point(p).unwrap()
}

#[tokio::test]
async fn private_views_commit_and_the_next_pod_starts_from_the_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let n1 = node(t, "node1", false);
    let c = ctx(&store, "npm", "private", &[]);

    // Pod A: a miss, writes, succeeds.
    let ta = t.join("pods/a/mount");
    let p = publish_async(&n1, &ta, &c, "a").await;
    assert!(mounted(&ta));
    assert_eq!(n1.volumes.load(&p.view).unwrap().kind, ViewKind::Overlay);
    std::fs::create_dir_all(ta.join("pkgs")).unwrap();
    std::fs::write(ta.join("pkgs/left-pad.tgz"), vec![1u8; 100_000]).unwrap();
    let d = finish(&n1, &ta, Ending::Succeeded).await;
    assert_eq!(generation(&d), Some(1), "{d:?}");
    assert!(!mounted(&ta));

    // Pod B on the same node: warm (the committed tree became the base), sees A's file.
    let tb = t.join("pods/b/mount");
    let p = publish_async(&n1, &tb, &c, "b").await;
    assert!(p.warm, "the committed tree is the node's base: {p:?}");
    assert_eq!(
        std::fs::read(tb.join("pkgs/left-pad.tgz")).unwrap().len(),
        100_000
    );
    // Unchanged: nothing uploaded.
    let d = finish(&n1, &tb, Ending::Succeeded).await;
    assert_unchanged(&d, 1);

    // A second node downloads it cold.
    let n2 = node(t, "node2", false);
    let tc = t.join("pods/c/mount");
    let p = publish_async(&n2, &tc, &c, "c").await;
    assert!(!p.warm);
    assert_eq!(
        std::fs::read(tc.join("pkgs/left-pad.tgz")).unwrap(),
        vec![1u8; 100_000]
    );
    std::fs::remove_file(tc.join("pkgs/left-pad.tgz")).unwrap();
    std::fs::write(tc.join("new"), "n").unwrap();
    // Failed pod, commit-on success: nothing committed.
    let d = finish(&n2, &tc, Ending::Failed).await;
    assert!(matches!(d, CommitDecision::Skipped(_)), "{d:?}");
    // Same on always: committed, with the deletion.
    let c_always = ctx(&store, "npm", "private", &[("commit-on", "always")]);
    publish_async(&n2, &tc, &c_always, "c2").await;
    assert!(
        tc.join("pkgs/left-pad.tgz").exists(),
        "the failed pod's deletion was not kept"
    );
    std::fs::remove_file(tc.join("pkgs/left-pad.tgz")).unwrap();
    let d = finish(&n2, &tc, Ending::Failed).await;
    assert_eq!(generation(&d), Some(2), "{d:?}");
    // An aborted pod (OOM, evicted) never commits, whatever commit-on says.
    publish_async(&n2, &tc, &c_always, "c3").await;
    std::fs::write(tc.join("oom"), "x").unwrap();
    let d = finish(&n2, &tc, Ending::Aborted).await;
    assert!(matches!(d, CommitDecision::Skipped(_)), "{d:?}");

    // Node 1 now restores generation 2: the file is gone.
    let td = t.join("pods/d/mount");
    publish_async(&n1, &td, &c, "d").await;
    assert!(!td.join("pkgs/left-pad.tgz").exists());
    assert!(!td.join("oom").exists());
    finish(&n1, &td, Ending::Succeeded).await;
}

#[tokio::test]
async fn shared_views_are_one_live_view_committed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let n = node(t, "node1", false);
    let c = ctx(&store, "go", "shared", &[]);
    let (ta, tb) = (t.join("a"), t.join("b"));
    let pa = publish_async(&n, &ta, &c, "a").await;
    let pb = publish_async(&n, &tb, &c, "b").await;
    assert_eq!(pa.view, pb.view);
    std::fs::write(ta.join("from-a"), "a").unwrap();
    assert_eq!(std::fs::read_to_string(tb.join("from-a")).unwrap(), "a");
    // The first to leave does not commit; the last one does, once.
    assert!(n.volumes.unpublish("cv-vol", &ta).await.unwrap().is_none());
    std::fs::write(tb.join("from-b"), "b").unwrap();
    let d = finish(&n, &tb, Ending::Succeeded).await;
    assert_eq!(generation(&d), Some(1));

    // Private views of the same cache do not see each other.
    let cp = ctx(&store, "go", "private", &[]);
    let (tc, td) = (t.join("c"), t.join("d"));
    publish_async(&n, &tc, &cp, "c").await;
    publish_async(&n, &td, &cp, "d").await;
    std::fs::write(tc.join("only-c"), "c").unwrap();
    assert!(!td.join("only-c").exists());
    assert!(td.join("from-a").exists() && td.join("from-b").exists());
    finish(&n, &tc, Ending::Aborted).await;
    finish(&n, &td, Ending::Aborted).await;
}

#[tokio::test]
async fn locked_is_exclusive_on_the_node_and_publish_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let n = node(t, "node1", false);
    let c = ctx(&store, "cargo", "locked", &[]);
    let (ta, tb) = (t.join("a"), t.join("b"));
    publish_async(&n, &ta, &c, "a").await;
    // The same publish again: OK, nothing new.
    publish_async(&n, &ta, &c, "a").await;
    let err = try_publish(&n, &tb, &c, "b", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("locked") && err.contains("ci/a"), "{err}");
    std::fs::write(ta.join("x"), "1").unwrap();
    assert_eq!(
        generation(&finish(&n, &ta, Ending::Succeeded).await),
        Some(1)
    );
    publish_async(&n, &tb, &c, "b").await;
    assert_eq!(std::fs::read_to_string(tb.join("x")).unwrap(), "1");
    // Unpublishing twice is fine.
    finish(&n, &tb, Ending::Succeeded).await;
    assert!(n.volumes.unpublish("cv-vol", &tb).await.unwrap().is_none());
}

#[tokio::test]
async fn copy_views_and_a_restart_before_the_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let c = ctx(&store, "pip", "private", &[]);
    {
        let n = node(t, "node1", true);
        let ta = t.join("a");
        let p = publish_async(&n, &ta, &c, "a").await;
        assert_eq!(n.volumes.load(&p.view).unwrap().kind, ViewKind::Copy);
        std::fs::write(ta.join("wheel"), vec![7u8; 50_000]).unwrap();
        assert_eq!(
            generation(&finish(&n, &ta, Ending::Succeeded).await),
            Some(1)
        );
        let tb = t.join("b");
        publish_async(&n, &tb, &c, "b").await;
        std::fs::write(tb.join("second"), "2").unwrap();
        // The plugin stops between unpublish and the commit decision.
        let pending = n.volumes.unpublish("cv-vol", &tb).await.unwrap();
        assert!(pending.is_some());
    }
    let n = node(t, "node1", true);
    let pending = n.volumes.recover();
    assert_eq!(pending.len(), 1);
    let d = n
        .volumes
        .commit(&pending[0].id, Ending::Succeeded)
        .await
        .unwrap();
    assert_eq!(generation(&d), Some(2));
    let n2 = node(t, "node2", false);
    let tc = t.join("c");
    publish_async(&n2, &tc, &c, "c").await;
    assert_eq!(std::fs::read_to_string(tc.join("second")).unwrap(), "2");
    assert_eq!(std::fs::read(tc.join("wheel")).unwrap(), vec![7u8; 50_000]);
    finish(&n2, &tc, Ending::Succeeded).await;
}

#[tokio::test]
async fn bases_past_the_node_budget_are_evicted_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    // Three caches of ~300 kB each, committed from a source dir with the CLI engine.
    let engine = cachevol::engine::Engine::new(
        cachevol::engine::Store::open(&store).unwrap(),
        "team-a",
        t.join("cli-state"),
    )
    .unwrap();
    for key in ["k1", "k2", "k3"] {
        let src = t.join(format!("src-{key}"));
        std::fs::create_dir_all(&src).unwrap();
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(src.join("blob"), data).unwrap();
        engine
            .commit(key, &src, &cachevol::engine::CommitOptions::default())
            .await
            .unwrap();
    }
    let state = t.join("node1");
    let n = Node {
        volumes: Volumes::new(NodeConfig {
            node_id: "node1".into(),
            state_dir: state.clone(),
            default_store: None,
            force_copy: false,
            base_budget: Some(700_000),
            base_images: images(),
        })
        .unwrap(),
    };
    // Bases live under a directory of their store: whichever it is, generation 1 of `key`.
    let base = |key: &str| {
        std::fs::read_dir(state.join("bases"))
            .unwrap()
            .flatten()
            .map(|e| {
                e.path()
                    .join(format!("team-a/{key}/00000000000000000001/tree"))
            })
            .find(|p| p.exists())
            .unwrap_or_default()
    };
    for key in ["k1", "k2"] {
        let target = t.join(format!("t-{key}"));
        publish_async(&n, &target, &ctx(&store, key, "private", &[]), key).await;
        finish(&n, &target, Ending::Aborted).await;
    }
    assert!(base("k1").exists() && base("k2").exists());
    // k2 was used after k1: said with the mtimes of their generations' directories, which order
    // eviction, rather than by sleeping between the two and hoping the clock moved.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    for (key, ago_s) in [("k1", 20), ("k2", 10)] {
        common::set_mtime(base(key).parent().unwrap(), now - ago_s * 1_000_000_000);
    }
    // k1 is used again: k2 is now the least recently used.
    let target = t.join("t-k1b");
    publish_async(&n, &target, &ctx(&store, "k1", "private", &[]), "k1b").await;
    // A third base pushes the node past 700 kB: k2 goes, k1 (in use) stays.
    let target3 = t.join("t-k3");
    publish_async(&n, &target3, &ctx(&store, "k3", "private", &[]), "k3").await;
    assert!(base("k1").exists(), "in use");
    assert!(base("k3").exists(), "just restored");
    assert!(!base("k2").exists(), "least recently used, evicted");
    finish(&n, &target, Ending::Aborted).await;
    finish(&n, &target3, Ending::Aborted).await;
}

#[tokio::test]
async fn pods_asking_at_once_share_one_download_and_read_only_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let src = t.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("dep.tgz"), vec![5u8; 200_000]).unwrap();
    commit_with_cli(&store, t, "npm", &src).await;

    let n = std::sync::Arc::new(node(t, "node1", false));
    let c = ctx(&store, "npm", "private", &[]);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (n, c, target) = (n.clone(), c.clone(), t.join(format!("p{i}")));
        tasks.push(tokio::spawn(async move {
            publish_async(&n, &target, &c, &format!("p{i}")).await
        }));
    }
    let mut cold = 0;
    for task in tasks {
        if !task.await.unwrap().warm {
            cold += 1;
        }
    }
    assert_eq!(cold, 1, "one download for four pods");
    for i in 0..4 {
        let target = t.join(format!("p{i}"));
        assert_eq!(
            std::fs::read(target.join("dep.tgz")).unwrap().len(),
            200_000
        );
        finish(&n, &target, Ending::Aborted).await;
    }

    // A read-only publish: the pod cannot write, and nothing is committed.
    let ro = t.join("ro");
    n.volumes
        .publish(Publish {
            volume_id: "cv-vol".into(),
            target: ro.clone(),
            spec: VolumeSpec::from_publish(&c, None).unwrap(),
            read_only: true,
            pod: Some(pod("ro")),
            group: None,
            selinux_context: None,
        })
        .await
        .unwrap();
    let err = std::fs::write(ro.join("x"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(ro.join("dep.tgz").exists());
    let d = finish(&n, &ro, Ending::Succeeded).await;
    assert!(
        matches!(&d, CommitDecision::Committed(r) if r.uploaded == 0),
        "{d:?}"
    );
}

#[tokio::test]
async fn a_shared_view_pending_its_commit_is_never_discarded_by_a_new_pod() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let n = node(t, "node1", false);
    let c = ctx(&store, "m2", "shared", &[]);
    let ta = t.join("a");
    publish_async(&n, &ta, &c, "a").await;
    std::fs::write(ta.join("from-a"), "a").unwrap();
    let pending = n.volumes.unpublish("cv-vol", &ta).await.unwrap().unwrap();

    // A new pod comes before the commit ran: it is told to wait, and nothing is lost.
    let tb = t.join("b");
    let err = try_publish(&n, &tb, &c, "b", None).await.unwrap_err();
    assert!(err.to_string().contains("pending"), "{err}");
    let d = n
        .volumes
        .commit(&pending.id, Ending::Succeeded)
        .await
        .unwrap();
    assert_eq!(generation(&d), Some(1));
    publish_async(&n, &tb, &c, "b").await;
    assert_eq!(std::fs::read_to_string(tb.join("from-a")).unwrap(), "a");
    finish(&n, &tb, Ending::Aborted).await;
}

/// Runs `script` with sh as uid `uid` with supplementary group `gid` (a non-root CI container
/// whose pod has `fsGroup: gid`); whether it succeeded.
fn as_user(uid: u32, gid: u32, script: &str) -> bool {
    std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            &format!("--groups={gid}"),
            "sh",
            "-c",
            script,
        ])
        .status()
        .unwrap()
        .success()
}

// With the pod's fsGroup (VOLUME_MOUNT_GROUP), a non-root container can change the cache it
// restored, and the next pod of that group — another uid — can change what the first wrote.
#[tokio::test]
async fn an_fs_group_makes_the_view_writable_by_non_root_pods() {
    for copy in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let _unmount = Unmount(t);
        // Let the unprivileged users reach the targets under the temp dir.
        std::fs::set_permissions(t, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let store = format!("file://{}", t.join("store").display());
        let n = node(t, "node1", copy);
        let c = ctx(&store, "npm", "private", &[]);
        let src = t.join("seed");
        common::write(&src.join("pkg/index.js"), b"v1");
        let e = common::engine(&store, "team-a", &t.join("seed-state"));
        e.commit("npm", &src, &Default::default()).await.unwrap();

        let a = t.join("a");
        try_publish(&n, &a, &c, "a", Some(4242)).await.unwrap();
        let d = a.display();
        assert!(
            as_user(5000, 4242, &format!("echo v2 > {d}/pkg/index.js && mkdir {d}/pkg/lib && echo new > {d}/pkg/lib/x.js")),
            "copy={copy}: uid 5000 in group 4242 cannot write the restored cache"
        );
        assert!(
            !as_user(5000, 5000, &format!("touch {d}/pkg/other")),
            "outside the group: no"
        );
        let done = finish(&n, &a, Ending::Succeeded).await;
        assert!(generation(&done).is_some(), "{done:?}");

        // Another uid of the same group.
        let b = t.join("b");
        let p = try_publish(&n, &b, &c, "b", Some(4242)).await.unwrap();
        // Overlay views leave the committed tree as the group's base; copies do not.
        assert_eq!(p.warm, !copy, "copy={copy}: {p:?}");
        let d = b.display();
        assert_eq!(std::fs::read(b.join("pkg/lib/x.js")).unwrap(), b"new\n");
        assert!(
            as_user(
                6000,
                4242,
                &format!("echo v3 > {d}/pkg/lib/x.js && rm {d}/pkg/index.js")
            ),
            "copy={copy}: the next pod of the group cannot change what the first wrote"
        );
        finish(&n, &b, Ending::Succeeded).await;
        let out = t.join("check");
        e.restore("npm", &[], &out).await.unwrap();
        assert_eq!(std::fs::read(out.join("pkg/lib/x.js")).unwrap(), b"v3\n");
        assert!(!out.join("pkg/index.js").exists());
    }
}

// Two stores (two StorageClasses, or an inline volume beside a PV) with the same scope, key and
// generation: each pod sees its own store's content, never the other's, and neither view
// gains the other's files.
#[tokio::test]
async fn bases_of_two_stores_are_never_shared() {
    for copy in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let _unmount = Unmount(t);
        let (store_a, store_b) = (
            format!("file://{}", t.join("store-a").display()),
            format!("file://{}", t.join("store-b").display()),
        );
        for (store, file, content) in [
            (&store_a, "secret.txt", "team A's secret"),
            (&store_b, "other.txt", "team B's content"),
        ] {
            let src = t.join(format!("src-{file}"));
            common::write(&src.join(file), content.as_bytes());
            let e = common::engine(store, "team-a", &t.join(format!("cli-{file}")));
            let r = e.commit("npm", &src, &Default::default()).await.unwrap();
            assert_eq!(r.outcome, CommitOutcome::Committed { generation: 1 });
        }
        let n = node(t, "node1", copy);
        let (ta, tb) = (t.join("pods/a/mount"), t.join("pods/b/mount"));
        publish_async(&n, &ta, &ctx(&store_a, "npm", "private", &[]), "a").await;
        let pb = try_publish(&n, &tb, &ctx(&store_b, "npm", "private", &[]), "b", None)
            .await
            .unwrap();
        assert!(!pb.warm, "copy={copy}: B's base is not A's: {pb:?}");
        assert!(
            !tb.join("secret.txt").exists(),
            "copy={copy}: store B's pod sees store A's file"
        );
        assert_eq!(
            std::fs::read_to_string(tb.join("other.txt")).unwrap(),
            "team B's content"
        );
        assert!(
            !ta.join("other.txt").exists(),
            "copy={copy}: A's live view gained store B's file"
        );
        assert_eq!(
            std::fs::read_to_string(ta.join("secret.txt")).unwrap(),
            "team A's secret"
        );
        // Both commit their own change to their own store.
        std::fs::write(ta.join("a.txt"), "a").unwrap();
        std::fs::write(tb.join("b.txt"), "b").unwrap();
        assert_eq!(
            generation(&finish(&n, &ta, Ending::Succeeded).await),
            Some(2)
        );
        assert_eq!(
            generation(&finish(&n, &tb, Ending::Succeeded).await),
            Some(2)
        );
        for (store, has, lacks) in [
            (&store_a, ["secret.txt", "a.txt"], ["other.txt", "b.txt"]),
            (&store_b, ["other.txt", "b.txt"], ["secret.txt", "a.txt"]),
        ] {
            let out = t.join(format!("check-{}", has[0]));
            let e = common::engine(store, "team-a", &t.join("check-state"));
            e.restore("npm", &[], &out).await.unwrap();
            for f in has {
                assert!(out.join(f).exists(), "copy={copy}: {store} lacks {f}");
            }
            for f in lacks {
                assert!(!out.join(f).exists(), "copy={copy}: {store} has {f}");
            }
        }
    }
}

// Two stores without any snapshot yet: each view starts from an empty base of its own store,
// so the first pod's commit is not refused when a pod of the other store published meanwhile.
#[tokio::test]
async fn empty_bases_of_two_stores_are_never_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let (store_a, store_b) = (
        format!("file://{}", t.join("store-a").display()),
        format!("file://{}", t.join("store-b").display()),
    );
    let n = node(t, "node1", false);
    let (ta, tb) = (t.join("pods/a/mount"), t.join("pods/b/mount"));
    publish_async(&n, &ta, &ctx(&store_a, "npm", "private", &[]), "a").await;
    std::fs::write(ta.join("work.txt"), "A's work").unwrap();
    publish_async(&n, &tb, &ctx(&store_b, "npm", "private", &[]), "b").await;
    let view = n.volumes.unpublish("cv-vol", &ta).await.unwrap().unwrap();
    let d = n.volumes.commit(&view.id, Ending::Succeeded).await;
    assert!(
        matches!(&d, Ok(d) if generation(d) == Some(1)),
        "A's commit: {d:?}"
    );
    let out = t.join("check");
    common::engine(&store_a, "team-a", &t.join("check-state"))
        .restore("npm", &[], &out)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("work.txt")).unwrap(),
        "A's work"
    );
    finish(&n, &tb, Ending::Aborted).await;
}

// After an upgrade, bases of the earlier layout (without the store in their path) are dropped
// when the node starts: the next pod restores its cache again.
#[tokio::test]
async fn bases_of_the_earlier_layout_are_dropped_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let src = t.join("src");
    common::write(&src.join("f"), b"from the store");
    common::engine(&store, "team-a", &t.join("cli"))
        .commit("npm", &src, &Default::default())
        .await
        .unwrap();
    let old = t.join("node1/bases/team-a/npm/00000000000000000001/tree");
    common::write(&old.join("f"), b"stale");
    let n = node(t, "node1", false);
    assert!(
        !t.join("node1/bases/team-a").exists(),
        "the old base is gone"
    );
    let ta = t.join("pods/a/mount");
    let p = publish_async(&n, &ta, &ctx(&store, "npm", "private", &[]), "a").await;
    assert!(!p.warm, "{p:?}");
    assert_eq!(std::fs::read(ta.join("f")).unwrap(), b"from the store");
    finish(&n, &ta, Ending::Aborted).await;
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

// A pod's fsGroup makes its view group-writable, but that widening is the node's business, not
// the cache's: an untouched cache commits as unchanged (overlay and copy views), and a pod that
// changed some files commits them with the modes they had, except where it set a mode itself.
#[tokio::test]
async fn an_fs_group_never_reaches_the_snapshot() {
    for copy in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let _unmount = Unmount(t);
        std::fs::set_permissions(t, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let store = format!("file://{}", t.join("store").display());
        let n = node(t, "node1", copy);
        let c = ctx(&store, "npm", "private", &[]);
        let src = t.join("seed");
        common::write(&src.join("seed.txt"), b"seed");
        common::write(&src.join("pkg/index.js"), b"v1");
        common::write(&src.join("bin/tool"), b"#!/bin/sh\n");
        common::write(&src.join("private.txt"), b"p");
        for (p, m) in [
            ("seed.txt", 0o644),
            ("pkg", 0o755),
            ("pkg/index.js", 0o644),
            ("bin", 0o750),
            ("bin/tool", 0o755),
            ("private.txt", 0o600),
        ] {
            common::chmod(&src.join(p), m);
        }
        let e = common::engine(&store, "team-a", &t.join("seed-state"));
        e.commit("npm", &src, &Default::default()).await.unwrap();

        // Untouched: unchanged, no generation.
        let a = t.join("a");
        try_publish(&n, &a, &c, "a", Some(4242)).await.unwrap();
        assert_eq!(mode_of(&a.join("seed.txt")), 0o664, "the view is widened");
        let d = finish(&n, &a, Ending::Succeeded).await;
        match &d {
            CommitDecision::Committed(r) => assert_eq!(
                (r.outcome.clone(), r.uploaded),
                (
                    CommitOutcome::Unchanged {
                        generation: Some(1)
                    },
                    0
                ),
                "copy={copy}: an untouched cache under an fsGroup"
            ),
            other => panic!("copy={copy}: {other:?}"),
        }
        assert_eq!(e.newest("npm").await.unwrap(), Some(1), "copy={copy}");

        // Changed by a non-root pod of the group; one mode set by the pod itself.
        let b = t.join("b");
        try_publish(&n, &b, &c, "b", Some(4242)).await.unwrap();
        let d = b.display();
        assert!(as_user(
            5000,
            4242,
            &format!("umask 022 && echo v2 > {d}/pkg/index.js && mkdir {d}/pkg/lib && echo n > {d}/pkg/lib/new.js && echo t >> {d}/bin/tool")
        ));
        common::chmod(&b.join("private.txt"), 0o640);
        let done = finish(&n, &b, Ending::Succeeded).await;
        assert_eq!(generation(&done), Some(2), "copy={copy}: {done:?}");
        let out = t.join("check");
        e.restore("npm", &[], &out).await.unwrap();
        assert_eq!(std::fs::read(out.join("pkg/index.js")).unwrap(), b"v2\n");
        for (p, m) in [
            ("seed.txt", 0o644),
            ("pkg", 0o755),
            ("pkg/index.js", 0o644),
            ("bin", 0o750),
            ("bin/tool", 0o755),
            ("private.txt", 0o640),
            ("pkg/lib", 0o755),
            ("pkg/lib/new.js", 0o644),
        ] {
            assert_eq!(
                format!("{:o}", mode_of(&out.join(p))),
                format!("{m:o}"),
                "copy={copy}: {p}"
            );
        }

        // The next pod of the group, over the tree this commit left: untouched is unchanged.
        let c2 = t.join("c");
        try_publish(&n, &c2, &c, "c", Some(4242)).await.unwrap();
        let d = finish(&n, &c2, Ending::Succeeded).await;
        assert_eq!(generation(&d), None, "copy={copy}: {d:?}");
        assert_eq!(e.newest("npm").await.unwrap(), Some(2), "copy={copy}");
    }
}

// A view opened by an earlier version over a base of the earlier layout still commits after
// the upgrade: its base is kept while the view uses it, and its commit is a generation.
#[tokio::test]
async fn a_view_over_a_base_of_the_earlier_layout_still_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let src = t.join("src");
    common::write(&src.join("f"), b"v1");
    common::engine(&store, "team-a", &t.join("cli"))
        .commit("npm", &src, &Default::default())
        .await
        .unwrap();
    let state = t.join("node1");
    let n = node(t, "node1", false);
    let ta = t.join("pods/a/mount");
    let p = publish_async(&n, &ta, &ctx(&store, "npm", "private", &[]), "a").await;
    std::fs::write(ta.join("g"), "written before the upgrade").unwrap();
    drop(n);
    // What the earlier version left: the view's base at `bases/<scope>/<key>/<generation>`,
    // recorded by the node's engine.
    let old = state.join("bases/team-a/npm/00000000000000000001/tree");
    std::fs::create_dir_all(&old).unwrap();
    common::engine(&store, "team-a", &state.join("engine"))
        .restore("npm", &[], &old)
        .await
        .unwrap();
    let record = state.join(format!("views/{}.json", p.view));
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    v["base_dir"] = serde_json::Value::String(old.display().to_string());
    std::fs::write(&record, serde_json::to_vec(&v).unwrap()).unwrap();

    let n = node(t, "node1", false);
    assert!(old.join("f").exists(), "a base a view uses is kept");
    let d = finish(&n, &ta, Ending::Succeeded).await;
    assert_eq!(generation(&d), Some(2), "{d:?}");
    let tb = t.join("pods/b/mount");
    let p = publish_async(&n, &tb, &ctx(&store, "npm", "private", &[]), "b").await;
    assert!(
        p.warm,
        "the committed tree is a base of the new layout: {p:?}"
    );
    assert_eq!(
        std::fs::read_to_string(tb.join("g")).unwrap(),
        "written before the upgrade"
    );
    finish(&n, &tb, Ending::Aborted).await;
}

/// A pack found corrupt by one node's restore is quarantined: another node whose local base
/// still holds a good copy of the tree commits its pod's changes without deduplicating against
/// the corrupt pack (the unchanged files are read again from its base), so the generation it
/// writes restores everywhere.
#[tokio::test]
async fn a_corrupt_pack_found_by_one_node_is_not_reused_by_another_nodes_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store_dir = t.join("store");
    let store = format!("file://{}", store_dir.display());
    let c = ctx(&store, "npm", "private", &[]);
    let n1 = node(t, "node1", false);
    let ta = t.join("pods/a/mount");
    publish_async(&n1, &ta, &c, "a").await;
    for i in 0..3u64 {
        common::write(
            &ta.join(format!("pkgs/p{i}.tgz")),
            &common::noise(i, 200_000),
        );
    }
    assert_eq!(
        generation(&finish(&n1, &ta, Ending::Succeeded).await),
        Some(1)
    );

    // One byte of the data pack rots in the store.
    let pack = common::listing(&store_dir)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains("/packs/"))
        .max_by_key(|(_, size)| *size)
        .map(|(p, _)| store_dir.join(p))
        .unwrap();
    let mut data = std::fs::read(&pack).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x5a;
    std::fs::write(&pack, data).unwrap();

    // Node 2 cannot restore it: the pod is refused, and the pack is quarantined.
    let n2 = node(t, "node2", false);
    assert!(try_publish(&n2, &t.join("pods/b/mount"), &c, "b", None)
        .await
        .is_err());

    // Node 1 still has a good base: its next pod changes one file and commits.
    let tc = t.join("pods/c/mount");
    let p = publish_async(&n1, &tc, &c, "c").await;
    assert!(p.warm, "{p:?}");
    std::fs::write(tc.join("pkgs/new.txt"), "new").unwrap();
    assert_eq!(
        generation(&finish(&n1, &tc, Ending::Succeeded).await),
        Some(2)
    );

    // A third node restores generation 2 whole.
    let n3 = node(t, "node3", false);
    let td = t.join("pods/d/mount");
    publish_async(&n3, &td, &c, "d").await;
    for i in 0..3u64 {
        assert_eq!(
            std::fs::read(td.join(format!("pkgs/p{i}.tgz"))).unwrap(),
            common::noise(i, 200_000)
        );
    }
    assert_eq!(
        std::fs::read_to_string(td.join("pkgs/new.txt")).unwrap(),
        "new"
    );
    finish(&n3, &td, Ending::Succeeded).await;
}

/// The mounts under `dir` as (mount point, file system type).
fn mounts_under(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    cachevol::node::mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .map(|m| (m.mount_point, m.fstype))
        .collect()
}

#[tokio::test]
async fn a_fresh_node_mounts_an_image_and_commits_stack_on_it_as_layers() {
    if !images() {
        return; // this run writes trees; the same scenarios run in the other tests
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let _unmount = Unmount(t);
    let store = format!("file://{}", t.join("store").display());
    let src = t.join("src");
    std::fs::create_dir_all(src.join("pkgs/big")).unwrap();
    for i in 0..300 {
        std::fs::write(src.join(format!("pkgs/big/f{i:03}")), format!("{i}")).unwrap();
    }
    std::fs::write(src.join("pkgs/left-pad.tgz"), vec![3u8; 70_000]).unwrap();
    std::fs::create_dir_all(src.join("old-dir/inner")).unwrap();
    std::fs::write(src.join("old-dir/inner/x"), "x").unwrap();
    std::os::unix::fs::symlink("pkgs/left-pad.tgz", src.join("link")).unwrap();
    commit_with_cli(&store, t, "npm", &src).await;
    let state = t.join("node1");
    let n = node(t, "node1", false);
    let c = ctx(&store, "npm", "private", &[]);

    // Cold: the base is an image, mounted read-only; the view shows the snapshot.
    let ta = t.join("pods/a/mount");
    let p = publish_async(&n, &ta, &c, "a").await;
    assert_eq!(p.form, Some(cachevol::node::BaseForm::Image), "{p:?}");
    let bases = state.join("bases");
    let types: Vec<String> = mounts_under(&bases).into_iter().map(|m| m.1).collect();
    assert!(types.contains(&"erofs".to_string()), "{types:?}");
    assert_eq!(
        std::fs::read(ta.join("pkgs/left-pad.tgz")).unwrap(),
        vec![3u8; 70_000]
    );
    assert_eq!(
        std::fs::read_to_string(ta.join("pkgs/big/f299")).unwrap(),
        "299"
    );
    assert_eq!(
        std::fs::read_link(ta.join("link")).unwrap(),
        Path::new("pkgs/left-pad.tgz")
    );
    // The pod changes, deletes, replaces a directory and leaves a commit marker behind.
    std::fs::remove_file(ta.join("pkgs/left-pad.tgz")).unwrap();
    std::fs::remove_dir_all(ta.join("old-dir")).unwrap();
    std::fs::create_dir_all(ta.join("old-dir")).unwrap();
    std::fs::write(ta.join("old-dir/new"), "new").unwrap();
    std::fs::write(ta.join("pkgs/big/f000"), "changed").unwrap();
    std::fs::write(ta.join(".cachevol-commit"), "").unwrap();
    let d = finish(&n, &ta, Ending::Succeeded).await;
    assert_eq!(generation(&d), Some(2), "{d:?}");

    // The next pod is warm: the committed upper dir is a layer over the same image.
    let tb = t.join("pods/b/mount");
    let p = publish_async(&n, &tb, &c, "b").await;
    assert!(p.warm && p.form.is_none(), "{p:?}");
    let check = |root: &Path| {
        assert!(!root.join("pkgs/left-pad.tgz").exists(), "deleted below");
        assert!(
            !root.join("old-dir/inner").exists(),
            "a replaced directory is opaque"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("old-dir/new")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("pkgs/big/f000")).unwrap(),
            "changed"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("pkgs/big/f001")).unwrap(),
            "1"
        );
        assert!(
            !root.join(".cachevol-commit").exists(),
            "a marker never reaches a view"
        );
    };
    check(&tb);
    let gen_dirs: Vec<_> = std::fs::read_dir(
        bases
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("team-a/npm"),
    )
    .unwrap()
    .flatten()
    .map(|e| e.file_name().to_string_lossy().into_owned())
    .collect();
    assert_eq!(
        gen_dirs,
        ["00000000000000000002"],
        "the image moved to the new generation"
    );
    // Unchanged: milliseconds, nothing uploaded.
    let d = finish(&n, &tb, Ending::Succeeded).await;
    assert_unchanged(&d, 2);

    // A reboot unmounts everything: the next publish mounts the image and its layer again.
    for (m, _) in mounts_under(&bases).into_iter().rev() {
        cachevol::node::mount::unmount(&m).unwrap();
    }
    assert!(mounts_under(&bases).is_empty());
    let n = node(t, "node1", false);
    let tc = t.join("pods/c/mount");
    let p = publish_async(&n, &tc, &c, "c").await;
    assert!(p.warm, "{p:?}");
    check(&tc);
    std::fs::write(tc.join("third"), "3").unwrap();
    // A marker the job made as a directory is not kept either.
    std::fs::create_dir_all(tc.join(".cachevol-commit/x")).unwrap();
    assert_eq!(
        generation(&finish(&n, &tc, Ending::Succeeded).await),
        Some(3)
    );
    let te = t.join("pods/e/mount");
    let p = publish_async(&n, &te, &c, "e").await;
    assert!(p.warm, "the commit stacked a second layer: {p:?}");
    check(&te);
    assert_eq!(std::fs::read_to_string(te.join("third")).unwrap(), "3");
    finish(&n, &te, Ending::Aborted).await;

    // Another node restores generation 3 from the store: the same tree.
    let n2 = node(t, "node2", false);
    let td = t.join("pods/d/mount");
    publish_async(&n2, &td, &c, "d").await;
    check(&td);
    assert_eq!(std::fs::read_to_string(td.join("third")).unwrap(), "3");
    finish(&n2, &td, Ending::Aborted).await;
}
