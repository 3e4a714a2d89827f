//! Publish, unpublish and the commit decision without root: mounts go to a fake
//! [`Mounter`](super::Mounter) that records them, and the pods' writes are made where an overlay
//! would have put them (its upper dir). The store is a `file://` directory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::mount::fake::{Fake, Mount};
use super::report::{CommitOutcome, EventType, RestoreLevel, RestoreOutcome};
use super::*;
use crate::engine::{self, Engine, Store};

/// What the node reported, in order.
#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

impl Seen {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    /// What was counted (no events).
    fn counted(&self) -> Vec<String> {
        let all = self.all();
        all.into_iter()
            .filter(|s| !s.starts_with("event"))
            .collect()
    }
    fn events(&self) -> Vec<String> {
        let all = self.all();
        all.into_iter().filter(|s| s.starts_with("event")).collect()
    }
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
}

impl Report for Seen {
    fn restore(&self, level: RestoreLevel, outcome: RestoreOutcome, _: u64, _: f64) {
        self.push(format!("restore {} {}", level.label(), outcome.label()));
    }
    fn base_written(&self, form: BaseForm, _: f64) {
        self.push(format!("base {}", form.label()));
    }
    fn commit(&self, outcome: CommitOutcome, _: u64, _: f64) {
        self.push(format!("commit {}", outcome.label()));
    }
    fn unreadable_record(&self) {
        self.push("unreadable record".into());
    }
    fn node_gauges(&self, g: &crate::node::NodeGauges) {
        self.push(format!("gauges {} {}", g.active_views, g.pending_views));
    }
    fn event<'a>(
        &'a self,
        pod: &'a PodRef,
        kind: EventType,
        reason: &'static str,
        message: String,
    ) -> BoxFuture<'a, ()> {
        self.push(format!("event {kind:?} {reason} {}: {message}", pod.name));
        Box::pin(async {})
    }
}

struct Node {
    tmp: tempfile::TempDir,
    store: String,
    mounts: Arc<Fake>,
    seen: Arc<Seen>,
    volumes: Volumes,
}

impl Node {
    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
}

fn node_with(tmp: tempfile::TempDir, mounts: Fake) -> Node {
    node_of(tmp, mounts, false)
}

fn node_of(tmp: tempfile::TempDir, mounts: Fake, base_images: bool) -> Node {
    let store = super::fixture::store_url(tmp.path());
    let (mounts, seen) = (Arc::new(mounts), Arc::new(Seen::default()));
    let volumes = Volumes::with(
        NodeConfig {
            node_id: "node1".into(),
            state_dir: tmp.path().join("state"),
            default_store: None,
            force_copy: false,
            base_budget: None,
            base_images,
        },
        mounts.clone(),
        seen.clone(),
    )
    .unwrap();
    Node {
        tmp,
        store,
        mounts,
        seen,
        volumes,
    }
}

/// A node whose store holds generation 1 of `ci/npm`: one file, `f`.
async fn node(mounts: Fake) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    super::fixture::commit(tmp.path(), "npm", "one").await;
    node_with(tmp, mounts)
}

fn pod(name: &str) -> PodRef {
    PodRef {
        name: name.into(),
        namespace: "ci".into(),
        uid: format!("uid-{name}"),
        service_account: "default".into(),
    }
}

fn publish_req(n: &Node, pod_name: &str, mode: &str, extra: &[(&str, &str)]) -> Publish {
    let mut context: HashMap<String, String> = [
        ("store", n.store.as_str()),
        ("scope", "ci"),
        ("key", "npm"),
        ("mode", mode),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    context.insert("commit-on".into(), "success".into());
    for (k, v) in extra {
        context.insert(k.to_string(), v.to_string());
    }
    Publish {
        volume_id: "cv-1".into(),
        target: n.tmp.path().join("pods").join(pod_name).join("mount"),
        spec: VolumeSpec::from_publish(&context, None).unwrap(),
        read_only: false,
        pod: Some(pod(pod_name)),
        group: None,
        selinux_context: None,
    }
}

/// Where the pods' writes to an overlay view land.
fn upper(n: &Node, view: &str) -> PathBuf {
    n.state().join("views").join(view).join("upper")
}

fn generation(d: &CommitDecision) -> Option<u64> {
    match d {
        CommitDecision::Committed(r) => match r.outcome {
            engine::CommitOutcome::Committed { generation } => Some(generation),
            _ => None,
        },
        _ => None,
    }
}

#[tokio::test]
async fn publish_binds_an_overlay_of_the_restored_base_once() {
    let n = node(Fake::default()).await;
    let req = publish_req(&n, "a", "private", &[]);
    let target = req.target.clone();
    let p = n.volumes.publish(req.clone()).await.unwrap();
    assert!(!p.warm);
    let view = n.state().join("views").join(&p.view).join("view");
    let record = n.volumes.load(&p.view).unwrap();
    assert_eq!(record.kind, ViewKind::Overlay);
    assert_eq!(record.state, ViewState::Active);
    assert_eq!(record.pods, vec![pod("a")]);
    assert_eq!(
        std::fs::read_to_string(record.base_dir.join("f")).unwrap(),
        "one",
        "the base holds generation 1"
    );
    let dir = n.state().join("views").join(&p.view);
    assert_eq!(
        n.mounts.at(&view),
        Some(Mount::Overlay {
            lower: vec![record.base_dir.clone()],
            upper: upper(&n, &p.view),
            data: format!(
                "lowerdir={},upperdir={},workdir={},metacopy=off,redirect_dir=off,index=off",
                record.base_dir.display(),
                dir.join("upper").display(),
                dir.join("work").display()
            ),
        })
    );
    assert_eq!(
        n.mounts.at(&target),
        Some(Mount::Bind {
            source: view.clone(),
            read_only: false
        })
    );
    assert_eq!(n.seen.counted(), ["restore key restored", "base tree"]);
    let events = n.seen.events();
    assert_eq!(events.len(), 1);
    assert!(
        events[0].starts_with(
            "event Normal CacheRestored a: cache npm: restored generation 1 of npm, 0.0 MiB"
        ),
        "{events:?}"
    );
    assert_eq!(
        n.volumes.view_of_target(&target).map(|v| v.id),
        Some(p.view.clone())
    );

    // kubelet repeats the call: nothing is mounted again, nothing reported.
    let again = n.volumes.publish(req).await.unwrap();
    assert_eq!(again.view, p.view);
    assert!(again.source.is_none());
    assert_eq!(n.mounts.table.lock().unwrap().len(), 2);
    assert_eq!(n.seen.all().len(), 3, "restore, base, event: nothing more");

    // A read-only publish of another pod's view is bound read-only.
    let mut ro = publish_req(&n, "b", "private", &[]);
    ro.read_only = true;
    let pb = n.volumes.publish(ro.clone()).await.unwrap();
    assert!(pb.warm, "the base is on the node");
    assert_eq!(
        n.mounts.at(&ro.target),
        Some(Mount::Bind {
            source: n.state().join("views").join(&pb.view).join("view"),
            read_only: true
        })
    );
}

#[tokio::test]
async fn a_locked_cache_is_refused_while_another_pods_view_holds_it() {
    let n = node(Fake::default()).await;
    let a = n
        .volumes
        .publish(publish_req(&n, "a", "locked", &[]))
        .await
        .unwrap();
    let e = n
        .volumes
        .publish(publish_req(&n, "b", "locked", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Unavailable(m) if m.contains("pod ci/a")),
        "{e}"
    );
    assert_eq!(
        n.seen.counted(),
        ["restore key restored", "base tree"],
        "a refusal is no failed restore"
    );
    // Once a's view is decided, b gets the cache.
    let target = n.tmp.path().join("pods/a/mount");
    let pending = n.volumes.unpublish("cv-1", &target).await.unwrap();
    assert_eq!(pending.map(|v| v.id), Some(a.view.clone()));
    n.volumes.decide(&a.view, Ending::Succeeded).await.unwrap();
    n.volumes
        .publish(publish_req(&n, "b", "locked", &[]))
        .await
        .unwrap();
}

#[tokio::test]
async fn unpublishing_the_last_target_unmounts_and_leaves_the_view_pending() {
    let n = node(Fake::default()).await;
    let req = publish_req(&n, "a", "private", &[]);
    let p = n.volumes.publish(req.clone()).await.unwrap();
    // Another volume's id at the same target is not ours to unmount.
    assert!(matches!(
        n.volumes.unpublish("cv-other", &req.target).await,
        Err(Error::NotPublished(..))
    ));
    let pending = n.volumes.unpublish("cv-1", &req.target).await.unwrap();
    let pending = pending.expect("the last target went: pending");
    assert_eq!(pending.state, ViewState::Pending);
    assert_eq!(n.volumes.load(&p.view).unwrap().state, ViewState::Pending);
    assert!(
        n.mounts.table.lock().unwrap().is_empty(),
        "target and view unmounted"
    );
    // Idempotent.
    assert!(n
        .volumes
        .unpublish("cv-1", &req.target)
        .await
        .unwrap()
        .is_none());
    // A new pod of the same private volume does not wait for it; a restart finds it pending.
    drop(n.volumes);
    let n = node_with(n.tmp, Fake::default());
    let pending = n.volumes.recover();
    assert_eq!(pending.iter().map(|v| &v.id).collect::<Vec<_>>(), [&p.view]);
}

/// Publishes for pod `name`, writes `files` where the pod's writes land, unpublishes, and
/// decides as the pod ended.
async fn run_pod(
    n: &Node,
    name: &str,
    extra: &[(&str, &str)],
    files: &[&str],
    ending: Ending,
) -> CommitDecision {
    let req = publish_req(n, name, "private", extra);
    let p = n.volumes.publish(req.clone()).await.unwrap();
    for f in files {
        std::fs::write(upper(n, &p.view).join(f), *f).unwrap();
    }
    let v = n.volumes.unpublish("cv-1", &req.target).await.unwrap();
    assert_eq!(v.map(|v| v.id), Some(p.view.clone()));
    let d = n.volumes.decide(&p.view, ending).await.unwrap();
    assert!(n.volumes.load(&p.view).is_none(), "a decided view is gone");
    assert!(!n.state().join("views").join(&p.view).exists());
    assert!(n.mounts.table.lock().unwrap().is_empty());
    d
}

#[tokio::test]
async fn the_commit_decision_follows_commit_on_the_ending_and_the_marker() {
    let n = node(Fake::default()).await;
    // commit-on success: a failed pod's writes are dropped, and the pod is told why.
    let d = run_pod(&n, "a", &[], &["x"], Ending::Failed).await;
    assert!(
        matches!(&d, CommitDecision::Skipped(w) if w.contains("failed")),
        "{d:?}"
    );
    assert_eq!(
        n.seen.counted(),
        ["restore key restored", "base tree", "commit skipped"]
    );
    let seen = n.seen.events();
    assert!(
        seen[1].starts_with("event Normal CacheCommitSkipped a: cache npm: not committed"),
        "{seen:?}"
    );

    // A succeeded pod's writes are generation 2, and the committed tree is the next base.
    let d = run_pod(&n, "b", &[], &["y"], Ending::Succeeded).await;
    assert_eq!(generation(&d), Some(2), "{d:?}");
    assert_eq!(n.seen.counted().last().unwrap(), "commit committed");
    let seen = n.seen.all();
    assert!(
        seen[seen.len() - 1]
            .contains("CacheCommitted b: cache npm: committed generation 2 (pod succeeded)"),
        "{seen:?}"
    );

    // commit-on marker: the marker decides, whatever the pod's ending.
    let marker = [("commit-on", "marker")];
    let d = run_pod(&n, "c", &marker, &["z"], Ending::Aborted).await;
    assert!(
        matches!(&d, CommitDecision::Skipped(w) if w.contains("no marker")),
        "{d:?}"
    );
    let d = run_pod(&n, "d", &marker, &["w", engine::MARKER], Ending::Failed).await;
    assert_eq!(generation(&d), Some(3), "{d:?}");
    assert!(n.seen.all().last().unwrap().contains("(marked by the job)"));

    // The next pod starts warm from what d committed: y and w, not x or z, and no marker.
    let p = publish_private(&n, "e").await;
    assert!(p.warm, "{p:?}");
    let base = n.volumes.load(&p.view).unwrap().base_dir;
    let mut names: Vec<String> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["f", "w", "y"]);

    // An untouched view is unchanged: nothing uploaded.
    let target = n.tmp.path().join("pods/e/mount");
    n.volumes.unpublish("cv-1", &target).await.unwrap();
    let d = n.volumes.decide(&p.view, Ending::Succeeded).await.unwrap();
    assert!(
        matches!(&d, CommitDecision::Committed(r) if r.uploaded == 0
            && matches!(r.outcome, engine::CommitOutcome::Unchanged { generation: Some(3) })),
        "{d:?}"
    );
    // Deciding again: nothing to decide.
    assert!(matches!(
        n.volumes.decide(&p.view, Ending::Succeeded).await.unwrap(),
        CommitDecision::NotPending
    ));
}

/// A locked view whose writer lost its lock is fenced: dropped, nothing uploaded, counted once
/// as fenced and told once to its pod, by the node (the agent only says how the lock stands).
#[tokio::test]
async fn a_lost_lock_fences_the_commit_and_is_reported_once() {
    let n = node(Fake::default()).await;
    let req = publish_req(&n, "a", "locked", &[]);
    let p = n.volumes.publish(req.clone()).await.unwrap();
    std::fs::write(upper(&n, &p.view).join("x"), "x").unwrap();
    n.volumes.unpublish("cv-1", &req.target).await.unwrap();
    let lost = Lock::Lost {
        pod: "ci/a".into(),
        holder: "ci/b".into(),
    };
    let d = n
        .volumes
        .decide_with_lock(&p.view, Ending::Succeeded, &lost)
        .await
        .unwrap();
    assert!(
        matches!(&d, CommitDecision::Fenced(w) if w.contains("pod ci/a lost its lock")
            && w.contains("held by ci/b")),
        "{d:?}"
    );
    assert!(
        n.volumes.load(&p.view).is_none(),
        "a fenced view is dropped"
    );
    assert_eq!(
        n.seen.counted(),
        ["restore key restored", "base tree", "commit fenced"]
    );
    let fenced: Vec<String> = n
        .seen
        .events()
        .into_iter()
        .filter(|e| e.contains("CacheFenced"))
        .collect();
    assert_eq!(fenced.len(), 1, "{fenced:?}");
    assert!(fenced[0].starts_with("event Warning CacheFenced a: commit of cache npm refused"));
    let engine = Engine::new(
        Store::open(&n.store).unwrap(),
        "ci",
        n.tmp.path().join("check"),
    )
    .unwrap();
    assert_eq!(
        engine.newest("npm").await.unwrap(),
        Some(1),
        "nothing committed"
    );
}

/// Publishes the cache for pod `pod_name` as a private view.
async fn publish_private(n: &Node, pod_name: &str) -> Published {
    n.volumes
        .publish(publish_req(n, pod_name, "private", &[]))
        .await
        .unwrap()
}

/// A node whose store holds generation 1 of `ci/npm` and whose bases are images.
async fn image_node(mounts: Fake) -> Node {
    let Node {
        tmp,
        mounts: _,
        volumes,
        ..
    } = node(Fake::default()).await;
    drop(volumes);
    node_of(tmp, mounts, true)
}

#[tokio::test]
async fn a_fresh_base_is_an_image_mounted_read_only_under_the_view() {
    let n = image_node(Fake::default()).await;
    let p = publish_private(&n, "a").await;
    assert_eq!(p.form, Some(BaseForm::Image));
    let record = n.volumes.load(&p.view).unwrap();
    let gen_dir = record.base_dir.parent().unwrap();
    assert!(gen_dir.join("image.erofs").is_file());
    assert_eq!(
        n.mounts.at(&gen_dir.join("image")),
        Some(Mount::Erofs {
            image: gen_dir.join("image.erofs")
        })
    );
    assert_eq!(
        n.mounts.at(&record.base_dir),
        Some(Mount::Bind {
            source: gen_dir.join("image"),
            read_only: true
        })
    );
    let events = n.seen.events();
    assert!(events[0].ends_with("as an image"), "{events:?}");
    assert_eq!(n.seen.counted(), ["restore key restored", "base image"]);
}

/// After a reboot, an image base is mounted again only if it reached the disk (the
/// background fsync marked it) or was written in this boot; else it may be torn, and the
/// next pod writes it again.
#[tokio::test]
async fn an_image_a_reboot_may_have_torn_is_written_again() {
    let n = image_node(Fake::default()).await;
    let p = publish_private(&n, "a").await;
    let base = n.volumes.load(&p.view).unwrap().base_dir;
    let gen_dir = base.parent().unwrap().to_path_buf();
    let synced = gen_dir.join("image.synced");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !synced.exists() {
        assert!(std::time::Instant::now() < deadline, "never marked durable");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    n.volumes
        .unpublish("cv-1", &publish_req(&n, "a", "private", &[]).target)
        .await
        .unwrap();
    n.volumes.decide(&p.view, Ending::Failed).await.unwrap();
    let reboot = |n: &Node, boot: &str, durable: bool| {
        n.mounts.table.lock().unwrap().clear();
        std::fs::write(gen_dir.join("image.boot"), boot).unwrap();
        if !durable {
            let _ = std::fs::remove_file(&synced);
        }
    };

    // Rebooted after the image reached the disk: mounted again, warm.
    reboot(&n, "an-earlier-boot", true);
    let p = publish_private(&n, "b").await;
    assert!(p.warm, "{p:?}");
    assert!(n.mounts.at(&gen_dir.join("image")).is_some());
    n.volumes
        .unpublish("cv-1", &publish_req(&n, "b", "private", &[]).target)
        .await
        .unwrap();
    n.volumes.decide(&p.view, Ending::Failed).await.unwrap();

    // Rebooted before it did: never mounted as it is; written again.
    reboot(&n, "an-earlier-boot", false);
    let p = publish_private(&n, "c").await;
    assert!(!p.warm, "{p:?}");
    assert_eq!(p.form, Some(BaseForm::Image));
}

#[tokio::test]
async fn where_the_kernel_refuses_images_bases_are_trees() {
    let n = image_node(Fake {
        refuse_erofs: true,
        ..Default::default()
    })
    .await;
    let p = publish_private(&n, "a").await;
    assert_eq!(p.form, Some(BaseForm::Tree));
    let record = n.volumes.load(&p.view).unwrap();
    assert_eq!(
        std::fs::read_to_string(record.base_dir.join("f")).unwrap(),
        "one"
    );
    let gen_dir = record.base_dir.parent().unwrap();
    assert!(
        !gen_dir.join("image.erofs").exists(),
        "no image left behind"
    );
    assert_eq!(
        n.mounts.table.lock().unwrap().len(),
        2,
        "view and target only"
    );
    let events = n.seen.events();
    assert!(events[0].ends_with("as files"), "{events:?}");
    assert_eq!(n.seen.counted(), ["restore key restored", "base tree"]);
}

#[tokio::test]
async fn where_overlayfs_is_refused_views_are_copies() {
    let n = node(Fake {
        refuse_overlay: true,
        ..Default::default()
    })
    .await;
    let req = publish_req(&n, "a", "private", &[]);
    let p = n.volumes.publish(req.clone()).await.unwrap();
    let record = n.volumes.load(&p.view).unwrap();
    assert_eq!(record.kind, ViewKind::Copy);
    let view = n.state().join("views").join(&p.view).join("view");
    assert_eq!(std::fs::read_to_string(view.join("f")).unwrap(), "one");
    assert_eq!(
        n.mounts.table.lock().unwrap().len(),
        1,
        "only the bind mount"
    );
    std::fs::write(view.join("g"), "two").unwrap();
    n.volumes.unpublish("cv-1", &req.target).await.unwrap();
    let d = n.volumes.decide(&p.view, Ending::Succeeded).await.unwrap();
    assert_eq!(generation(&d), Some(2), "{d:?}");
}

const CONTEXT: &str = "system_u:object_r:container_file_t:s0:c1,c2";

/// A publish of pod `pod_name` whose mount flags named SELinux context `context`.
fn labelled(n: &Node, pod_name: &str, mode: &str, context: &str) -> Publish {
    Publish {
        selinux_context: Some(context.into()),
        ..publish_req(n, pod_name, mode, &[])
    }
}

/// The data of the overlay mount at view `id`.
fn overlay_data_of(n: &Node, id: &str) -> String {
    match n.mounts.at(&n.state().join("views").join(id).join("view")) {
        Some(Mount::Overlay { data, .. }) => data,
        other => panic!("no overlay at view {id}: {other:?}"),
    }
}

#[tokio::test]
async fn with_selinux_the_overlay_of_a_view_is_mounted_with_the_pods_context() {
    let mut n = node(Fake::default()).await;
    n.volumes = n.volumes.with_selinux(true);
    let req = labelled(&n, "a", "private", CONTEXT);
    let p = n.volumes.publish(req.clone()).await.unwrap();
    let data = overlay_data_of(&n, &p.view);
    assert!(
        data.ends_with(",index=off,context=\"system_u:object_r:container_file_t:s0:c1,c2\""),
        "{data}"
    );
    let record = n.volumes.load(&p.view).unwrap();
    assert_eq!(record.selinux_context.as_deref(), Some(CONTEXT));
    // The target is a bind of that mount (which keeps its label); nothing else is labelled.
    assert_eq!(
        n.mounts.at(&req.target),
        Some(Mount::Bind {
            source: n.state().join("views").join(&p.view).join("view"),
            read_only: false
        })
    );
    assert!(n.mounts.labels.lock().unwrap().is_empty());
    // kubelet repeats the call with the same flags: fine, nothing mounted again.
    n.volumes.publish(req).await.unwrap();
    assert_eq!(n.mounts.table.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn without_selinux_the_context_is_dropped_and_the_view_mounts_as_before() {
    let mut n = node(Fake::default()).await;
    n.volumes = n.volumes.with_selinux(false);
    let p = n
        .volumes
        .publish(labelled(&n, "a", "private", CONTEXT))
        .await
        .unwrap();
    let data = overlay_data_of(&n, &p.view);
    assert!(!data.contains("context"), "{data}");
    assert!(data.ends_with(",index=off"), "{data}");
    assert_eq!(n.volumes.load(&p.view).unwrap().selinux_context, None);

    let mut c = node(Fake {
        refuse_overlay: true,
        ..Default::default()
    })
    .await;
    c.volumes = c.volumes.with_selinux(false);
    c.volumes
        .publish(labelled(&c, "a", "private", CONTEXT))
        .await
        .unwrap();
    assert!(c.mounts.labels.lock().unwrap().is_empty(), "no label set");
}

#[tokio::test]
async fn with_selinux_a_copied_view_is_labelled_before_its_bind_mount() {
    let mut n = node(Fake {
        refuse_overlay: true,
        ..Default::default()
    })
    .await;
    n.volumes = n.volumes.with_selinux(true);
    let req = labelled(&n, "a", "private", CONTEXT);
    let p = n.volumes.publish(req.clone()).await.unwrap();
    let view = n.state().join("views").join(&p.view).join("view");
    assert_eq!(n.volumes.load(&p.view).unwrap().kind, ViewKind::Copy);
    assert_eq!(
        *n.mounts.labels.lock().unwrap(),
        vec![(view.clone(), CONTEXT.to_string())]
    );
    // A bind mount cannot take context=: the mount itself is a plain bind.
    assert_eq!(
        n.mounts.at(&req.target),
        Some(Mount::Bind {
            source: view,
            read_only: false
        })
    );
}

#[tokio::test]
async fn shared_pods_of_another_selinux_context_get_a_view_of_their_own() {
    let mut n = node(Fake::default()).await;
    n.volumes = n.volumes.with_selinux(true);
    let a = n
        .volumes
        .publish(labelled(&n, "a", "shared", CONTEXT))
        .await
        .unwrap();
    let b = n
        .volumes
        .publish(labelled(&n, "b", "shared", CONTEXT))
        .await
        .unwrap();
    assert_eq!(a.view, b.view, "same context: one shared view");
    let other = "system_u:object_r:container_file_t:s0:c3,c4";
    let c = n
        .volumes
        .publish(labelled(&n, "c", "shared", other))
        .await
        .unwrap();
    assert_ne!(c.view, a.view);
    assert!(overlay_data_of(&n, &c.view).contains(other));
    // Without a context, a shared view keeps the id it always had.
    let d = n
        .volumes
        .publish(publish_req(&n, "d", "shared", &[]))
        .await
        .unwrap();
    assert_eq!(
        d.view,
        format!("s-{}", hash_id(&[&n.store, "ci", "npm", ""]))
    );
    assert!(!overlay_data_of(&n, &d.view).contains("context"));
}

#[tokio::test]
async fn a_view_is_abnormal_once_it_loses_its_mounts_its_base_or_its_store() {
    let n = node(Fake::default()).await;
    let req = publish_req(&n, "a", "private", &[]);
    let p = n.volumes.publish(req.clone()).await.unwrap();
    let record = n.volumes.load(&p.view).unwrap();
    let condition = |n: &Node| n.volumes.condition(&record, &req.target);
    assert_eq!(
        condition(&n),
        Condition {
            abnormal: false,
            message: "ok".into()
        }
    );

    // The store has failed every request for 61s; 59s would not do.
    let ago = |s| std::time::Instant::now() - std::time::Duration::from_secs(s);
    let failing = |s| health::Answers {
        last_answer: Some(ago(300)),
        first_failure: Some(ago(s)),
    };
    n.volumes.answers.set(&n.store, failing(59));
    assert!(!condition(&n).abnormal, "{:?}", condition(&n));
    n.volumes.answers.set(&n.store, failing(61));
    let c = condition(&n);
    assert!(c.abnormal);
    assert!(
        c.message.contains("has failed every request for 61s"),
        "{c:?}"
    );
    n.volumes.answers.set(&n.store, health::Answers::default());

    // The node dropped the view's base (found damaged).
    let engine = n.volumes.engine(&record.spec).unwrap();
    engine.forget(&record.base_dir);
    let c = condition(&n);
    assert!(
        c.abnormal && c.message.contains("was dropped from the node"),
        "{c:?}"
    );

    // The target and the view's overlay, unmounted from under the pod.
    n.mounts.unmount(&req.target).unwrap();
    n.mounts
        .unmount(&n.state().join("views").join(&p.view).join("view"))
        .unwrap();
    let c = condition(&n);
    assert!(c.message.contains("no longer mounted at"), "{c:?}");
    assert!(c.message.contains("overlay mount is gone"), "{c:?}");
}

#[tokio::test]
async fn a_store_request_that_fails_is_recorded_for_the_condition() {
    let n = node(Fake::default()).await;
    let p = n
        .volumes
        .publish(publish_req(&n, "a", "private", &[]))
        .await
        .unwrap();
    let answered = n.volumes.answers.of(&n.store);
    assert!(answered.last_answer.is_some(), "the restore's requests");
    assert!(answered.first_failure.is_none());
    // The store's directory becomes a file: every request fails.
    let dir = n.tmp.path().join("store");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a store").unwrap();
    let spec = n.volumes.load(&p.view).unwrap().spec;
    let engine = n.volumes.engine(&spec).unwrap();
    assert!(engine.newest("npm").await.is_err());
    assert!(n.volumes.answers.of(&n.store).first_failure.is_some());
}

#[tokio::test]
async fn an_unreadable_record_is_reported_and_the_others_are_kept() {
    let n = node(Fake::default()).await;
    let p = publish_private(&n, "a").await;
    let views = n.state().join("views");
    std::fs::write(views.join("p-broken.json"), b"{\"id\": \"p-broken\", trunc").unwrap();
    drop(n.volumes);
    let n = node_with(n.tmp, Fake::default());
    assert_eq!(n.seen.all(), ["unreadable record"]);
    let ids: Vec<String> = n.volumes.views().into_iter().map(|v| v.id).collect();
    assert_eq!(ids, [p.view]);
    assert!(
        views.join("p-broken.json").exists(),
        "left for a person to look at"
    );
}

#[tokio::test]
async fn records_are_read_once_and_kept_in_step_with_saves() {
    let n = node(Fake::default()).await;
    let p = publish_private(&n, "a").await;
    let file = n.state().join("views").join(format!("{}.json", p.view));
    // Listing reads no file: a record file removed behind the node's back is still listed...
    std::fs::remove_file(&file).unwrap();
    assert_eq!(n.volumes.views().len(), 1);
    // ...and the next save writes it again, with what the index holds.
    assert_eq!(
        n.volumes
            .record_ending("uid-a", Ending::Failed)
            .await
            .unwrap()
            .len(),
        1
    );
    let on_disk: ViewRecord = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(on_disk.endings.get("uid-a"), Some(&Ending::Failed));
    assert_eq!(n.volumes.views_of_pod("uid-a").len(), 1);
    assert!(n.volumes.views_of_pod("uid-b").is_empty());
}

/// Two pods publishing one locked cache at once (without a cluster, the node's lock is the only
/// one): one gets it, the other is refused, even while the first is still restoring.
#[tokio::test]
async fn two_pods_publishing_a_locked_cache_at_once_do_not_both_get_it() {
    let n = node(Fake::default()).await;
    let (a, b) = tokio::join!(
        n.volumes.publish(publish_req(&n, "a", "locked", &[])),
        n.volumes.publish(publish_req(&n, "b", "locked", &[])),
    );
    let got: Vec<bool> = [&a, &b].iter().map(|r| r.is_ok()).collect();
    assert_eq!(got, [true, false], "a: {a:?}, b: {b:?}");
    assert!(
        matches!(&b, Err(Error::Unavailable(m)) if m.contains("cache npm is locked")),
        "{b:?}"
    );
    assert_eq!(n.volumes.views().len(), 1);
}

#[tokio::test]
async fn gauges_count_bases_active_and_pending_views() {
    let n = node(Fake::default()).await;
    let empty = n.volumes.gauges().await;
    assert_eq!(empty, crate::node::NodeGauges::default());
    let req = publish_req(&n, "a", "private", &[]);
    n.volumes.publish(req.clone()).await.unwrap();
    let g = n.volumes.gauges().await;
    assert_eq!((g.active_views, g.pending_views), (1, 0));
    assert_eq!(g.base_bytes, 3, "the base holds f = \"one\"");
    assert_eq!(g.oldest_pending_secs, 0.0);
    n.volumes.unpublish("cv-1", &req.target).await.unwrap();
    let g = n.volumes.gauges().await;
    assert_eq!((g.active_views, g.pending_views), (0, 1));
    let since = n.volumes.views()[0]
        .pending_since
        .expect("a pending view says since when");
    assert!(since.abs_diff(crate::node::unix_now()) <= 1);
    // A pending view that has waited a while (its record says since when, across restarts).
    let mut v = n.volumes.views()[0].clone();
    v.pending_since = Some(since - 600);
    n.volumes.views.save(&v).unwrap();
    let g = n.volumes.gauges().await;
    assert!(
        (600.0..610.0).contains(&g.oldest_pending_secs),
        "{}",
        g.oldest_pending_secs
    );
    n.volumes.report_gauges().await;
    assert!(
        n.seen.counted().iter().any(|c| c == "gauges 0 1"),
        "{:?}",
        n.seen.counted()
    );
}

/// A view record as the previous version wrote it (`views/<id>.json`, pretty JSON, the
/// volume's attributes as the `context` map) is read back and written again byte for byte: a
/// node upgraded with views pending finds and commits them.
#[test]
fn a_view_record_of_the_previous_version_round_trips() {
    let written = r#"{
  "id": "p-0123456789abcdef0123",
  "volume_id": "cv-1",
  "context": {
    "budget": "1073741824",
    "commit-on": "marker",
    "key": "npm",
    "merge": "union",
    "mode": "locked",
    "policy": "pull-push",
    "restore-keys": "npm-main,npm-base",
    "scope": "ci",
    "store": "s3://caches/cluster-a"
  },
  "kind": "overlay",
  "state": "pending",
  "base_dir": "/var/lib/cachevol/bases/@0123abcd/ci/npm/3/tree",
  "base": {
    "key": "npm",
    "generation": 3
  },
  "targets": {
    "/var/lib/kubelet/pods/u-1/volumes/kubernetes.io~csi/cv-1/mount": {
      "name": "build-1",
      "namespace": "ci",
      "uid": "u-1",
      "service_account": "runner"
    }
  },
  "pods": [
    {
      "name": "build-1",
      "namespace": "ci",
      "uid": "u-1",
      "service_account": "runner"
    }
  ],
  "degraded": null,
  "endings": {
    "u-1": "succeeded"
  },
  "group": 1000,
  "pending_since": 1764496800,
  "selinux_context": "system_u:object_r:container_file_t:s0:c1,c2"
}"#;
    let record: ViewRecord = serde_json::from_str(written).unwrap();
    assert_eq!(serde_json::to_string_pretty(&record).unwrap(), written);
}
