//! The Kubernetes API server stand-in (tests/common/apiserver.rs) driven by the unmodified kube
//! client: what the end-to-end tests rely on must hold here first.

mod common;

use std::time::Duration;

use common::apiserver::ApiServer;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, PersistentVolumeClaim, Pod};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

const STEP: Duration = Duration::from_secs(3);

fn pod(name: &str, node: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap()
}

fn names<K: kube::Resource>(items: &[K]) -> Vec<String> {
    let mut n: Vec<String> = items
        .iter()
        .map(|o| o.meta().name.clone().unwrap())
        .collect();
    n.sort();
    n
}

fn api_code(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.reason.clone())),
        _ => None,
    }
}

async fn list_names(api: &Api<Pod>, lp: &ListParams) -> Vec<String> {
    names(&api.list(lp).await.unwrap().items)
}

#[tokio::test]
async fn create_get_list_with_selectors_and_delete() {
    let server = ApiServer::start().await;
    let client = server.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();

    let p1 = pods
        .create(&pp, &pod("p1", "n1", json!({"app": "a", "tier": "x"})))
        .await
        .unwrap();
    pods.create(&pp, &pod("p2", "n1", json!({"app": "b"})))
        .await
        .unwrap();
    pods.create(&pp, &pod("p3", "n2", json!({}))).await.unwrap();
    let other: Api<Pod> = Api::namespaced(client.clone(), "other");
    other
        .create(&pp, &pod("p4", "n1", json!({"app": "a"})))
        .await
        .unwrap();

    // What the server sets on create.
    assert_eq!(p1.namespace().as_deref(), Some("default"));
    assert!(p1.uid().is_some_and(|u| u.len() == 36), "{:?}", p1.uid());
    let rv1: u64 = p1.resource_version().unwrap().parse().unwrap();
    let t = p1
        .metadata
        .creation_timestamp
        .clone()
        .expect("creationTimestamp");
    let age = k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second();
    assert!((0..60).contains(&age), "creationTimestamp {t:?}");
    assert_eq!(p1.status.unwrap().phase.as_deref(), Some("Pending"));
    let got = pods.get("p1").await.unwrap();
    assert_eq!(got.uid(), p1.metadata.uid);
    assert_eq!(got.resource_version(), p1.metadata.resource_version);

    // Every create moved the global resourceVersion on; a list carries the latest.
    let list = pods.list(&ListParams::default()).await.unwrap();
    let list_rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert_eq!(list_rv, server.resource_version());
    assert!(list_rv >= rv1 + 3, "{list_rv} after {rv1}");
    assert_eq!(names(&list.items), ["p1", "p2", "p3"]);

    let lp = |l: &str, f: &str| {
        let mut p = ListParams::default();
        if !l.is_empty() {
            p = p.labels(l);
        }
        if !f.is_empty() {
            p = p.fields(f);
        }
        p
    };
    assert_eq!(list_names(&pods, &lp("app=a", "")).await, ["p1"]);
    assert_eq!(list_names(&pods, &lp("app!=a", "")).await, ["p2", "p3"]);
    assert_eq!(list_names(&pods, &lp("app", "")).await, ["p1", "p2"]);
    assert_eq!(list_names(&pods, &lp("!app", "")).await, ["p3"]);
    assert_eq!(
        list_names(&pods, &lp("app in (a, b),tier", "")).await,
        ["p1"]
    );
    assert_eq!(
        list_names(&pods, &lp("", "spec.nodeName=n1")).await,
        ["p1", "p2"]
    );
    assert_eq!(
        list_names(&pods, &lp("", "spec.nodeName==n2")).await,
        ["p3"]
    );
    assert_eq!(
        list_names(&pods, &lp("", "spec.nodeName!=n1")).await,
        ["p3"]
    );
    assert_eq!(
        list_names(&pods, &lp("app=b", "spec.nodeName=n1")).await,
        ["p2"]
    );
    assert_eq!(
        list_names(&pods, &lp("", "metadata.name=p3,status.phase=Pending")).await,
        ["p3"]
    );
    assert!(list_names(&pods, &lp("", "status.phase=Running"))
        .await
        .is_empty());
    // The watcher's paging parameters are accepted: one page, no continue token.
    let page = pods.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert!(page.metadata.continue_.is_none_or(|c| c.is_empty()));

    // Across namespaces.
    let all: Api<Pod> = Api::all(client.clone());
    assert_eq!(
        list_names(&all, &lp("", "spec.nodeName=n1")).await,
        ["p1", "p2", "p4"]
    );
    assert_eq!(
        list_names(&all, &lp("", "metadata.namespace=other")).await,
        ["p4"]
    );

    // Duplicates, missing objects, malformed selectors.
    let dup = pods
        .create(&pp, &pod("p1", "n9", json!({})))
        .await
        .unwrap_err();
    assert_eq!(api_code(&dup), Some((409, "AlreadyExists".into())), "{dup}");
    assert!(pods.get_opt("nope").await.unwrap().is_none());
    let missing = pods.get("nope").await.unwrap_err();
    assert_eq!(api_code(&missing), Some((404, "NotFound".into())));
    let bad = pods.list(&lp("", "spec.nodeName")).await.unwrap_err();
    assert_eq!(api_code(&bad).map(|c| c.0), Some(400));

    // generateName.
    let mut g = pod("", "n1", json!({}));
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let g = pods.create(&pp, &g).await.unwrap();
    assert!(
        g.name_any().starts_with("gen-") && g.name_any().len() == 9,
        "{}",
        g.name_any()
    );
    let mut nameless = pod("", "n1", json!({}));
    nameless.metadata.name = None;
    let e = pods.create(&pp, &nameless).await.unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(422));

    // A body whose namespace differs from the path's.
    let mut wrong = pod("p5", "n1", json!({}));
    wrong.metadata.namespace = Some("other".into());
    let e = pods.create(&pp, &wrong).await.unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(400));

    // Delete returns the object and it is gone; deleting again is 404.
    let gone = pods.delete("p2", &DeleteParams::default()).await.unwrap();
    assert_eq!(gone.left().map(|p| p.name_any()).as_deref(), Some("p2"));
    assert!(pods.get_opt("p2").await.unwrap().is_none());
    let e = pods
        .delete("p2", &DeleteParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(404));
    assert_eq!(server.objects("pods").len(), 4);
    assert!(server.object("pods", "other", "p4").is_some());

    // Metadata-only calls get PartialObjectMetadata.
    let metas = pods.list_metadata(&lp("app", "")).await.unwrap();
    assert_eq!(names(&metas.items), ["p1"]);
    let m = pods.get_metadata("p3").await.unwrap();
    assert_eq!(
        m.metadata.uid,
        server.object("pods", "default", "p3").unwrap()["metadata"]["uid"]
            .as_str()
            .map(String::from)
    );

    // A dry run answers as a create would and stores nothing.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let rv = server.resource_version();
    let d = pods
        .create(&dry, &pod("dry", "n1", json!({})))
        .await
        .unwrap();
    assert_eq!(d.name_any(), "dry");
    assert!(pods.get_opt("dry").await.unwrap().is_none());
    assert_eq!(server.resource_version(), rv);

    // Other resources, cluster-scoped ones included, use the same store.
    let pvcs: Api<PersistentVolumeClaim> = Api::default_namespaced(client.clone());
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "c1"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap();
    let pvc = pvcs.create(&pp, &pvc).await.unwrap();
    assert_eq!(pvc.status.unwrap().phase.as_deref(), Some("Pending"));
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    assert!(
        names(&nss.list(&ListParams::default()).await.unwrap().items)
            .contains(&"default".to_string())
    );
}

#[tokio::test]
async fn stale_writes_conflict() {
    let server = ApiServer::start().await;
    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "l"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    let first = leases.create(&PostParams::default(), &lease).await.unwrap();

    let mut update = first.clone();
    update.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let second = leases
        .replace("l", &PostParams::default(), &update)
        .await
        .unwrap();
    assert_ne!(second.resource_version(), first.resource_version());
    assert_eq!(
        second.metadata.generation,
        Some(2),
        "a spec change bumps generation"
    );

    // The same write again carries the old resourceVersion.
    update.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let e = leases
        .replace("l", &PostParams::default(), &update)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), Some((409, "Conflict".into())), "{e}");
    let kube::Error::Api(status) = &e else {
        unreachable!()
    };
    assert!(
        status.message.contains("the object has been modified"),
        "{}",
        status.message
    );
    assert_eq!(
        leases
            .get("l")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );

    // Without a resourceVersion a replace is unconditional.
    update.metadata.resource_version = None;
    let third = leases
        .replace("l", &PostParams::default(), &update)
        .await
        .unwrap();
    assert_eq!(third.spec.unwrap().holder_identity.as_deref(), Some("c"));

    // A patch that names a resourceVersion is checked too.
    let stale = json!({"metadata": {"resourceVersion": first.resource_version()}, "spec": {"holderIdentity": "d"}});
    let e = leases
        .patch("l", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(409));
    let current = leases.get("l").await.unwrap();
    let fresh = json!({"metadata": {"resourceVersion": current.resource_version()}, "spec": {"holderIdentity": "d"}});
    let patched = leases
        .patch("l", &PatchParams::default(), &Patch::Merge(&fresh))
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().holder_identity.as_deref(), Some("d"));

    // JSON patch: a failing test op is refused, a passing one applies.
    let ops = |holder: &str| -> Patch<()> {
        Patch::Json(
            serde_json::from_value(json!([
                {"op": "test", "path": "/spec/holderIdentity", "value": holder},
                {"op": "replace", "path": "/spec/holderIdentity", "value": "e"},
                {"op": "add", "path": "/metadata/labels", "value": {"k": "v"}},
            ]))
            .unwrap(),
        )
    };
    let e = leases
        .patch("l", &PatchParams::default(), &ops("zzz"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(422));
    let l = leases
        .patch("l", &PatchParams::default(), &ops("d"))
        .await
        .unwrap();
    assert_eq!(
        l.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some("e")
    );
    assert_eq!(l.labels().get("k").map(String::as_str), Some("v"));

    // A no-op write keeps the resourceVersion, as the real server does.
    let before = leases.get("l").await.unwrap();
    let same = leases
        .replace("l", &PostParams::default(), &before)
        .await
        .unwrap();
    assert_eq!(same.resource_version(), before.resource_version());

    // Replacing a missing object is 404.
    let mut missing = before.clone();
    missing.metadata.name = Some("missing".into());
    missing.metadata.resource_version = None;
    let e = leases
        .replace("missing", &PostParams::default(), &missing)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_modify_write_loses_no_update() {
    let server = ApiServer::start().await;
    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "counter", "annotations": {"n": "0"}},
        "spec": {},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    const EACH: u32 = 30;
    let worker = |leases: Api<Lease>| async move {
        let mut conflicts = 0;
        for _ in 0..EACH {
            loop {
                let mut l = leases.get("counter").await.unwrap();
                let n: u32 = l.annotations()["n"].parse().unwrap();
                tokio::task::yield_now().await;
                l.annotations_mut().insert("n".into(), (n + 1).to_string());
                match leases.replace("counter", &PostParams::default(), &l).await {
                    Ok(_) => break,
                    Err(e) if api_code(&e).is_some_and(|c| c.0 == 409) => conflicts += 1,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        conflicts
    };
    let (a, b) = tokio::join!(
        tokio::spawn(worker(leases.clone())),
        tokio::spawn(worker(leases.clone()))
    );
    let conflicts = a.unwrap() + b.unwrap();
    let n: u32 = leases.get("counter").await.unwrap().annotations()["n"]
        .parse()
        .unwrap();
    assert_eq!(
        n,
        2 * EACH,
        "lost updates ({conflicts} conflicts were retried)"
    );
}

#[tokio::test]
async fn status_subresource_is_separate() {
    let server = ApiServer::start().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let pp = PostParams::default();
    let mut seeded = pod("s", "n1", json!({}));
    seeded.status = Some(serde_json::from_value(json!({"phase": "Running"})).unwrap());
    let created = pods.create(&pp, &seeded).await.unwrap();
    assert_eq!(
        created.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending"),
        "create ignores a client's status"
    );

    // replace_status changes status only, even if the body changes spec and labels.
    let mut body = created.clone();
    body.status.as_mut().unwrap().phase = Some("Running".into());
    body.spec.as_mut().unwrap().node_name = Some("elsewhere".into());
    body.labels_mut().insert("x".into(), "y".into());
    let after = pods.replace_status("s", &pp, &body).await.unwrap();
    assert_eq!(
        after.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(
        after.spec.as_ref().unwrap().node_name.as_deref(),
        Some("n1")
    );
    assert!(after.labels().get("x").is_none());
    assert_eq!(after.metadata.generation, created.metadata.generation);
    assert_ne!(after.resource_version(), created.resource_version());

    // A stale status write conflicts.
    let e = pods.replace_status("s", &pp, &body).await.unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(409));

    // A plain replace keeps the status, whatever the body says.
    let mut plain = after.clone();
    plain.status.as_mut().unwrap().phase = Some("Failed".into());
    plain.labels_mut().insert("x".into(), "y".into());
    let replaced = pods.replace("s", &pp, &plain).await.unwrap();
    assert_eq!(
        replaced.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(replaced.labels().get("x").map(String::as_str), Some("y"));

    // patch_status changes status only; a main-resource patch cannot touch status.
    let patch = json!({"metadata": {"labels": {"x": "z"}}, "status": {"phase": "Succeeded"}});
    let p = pods
        .patch_status("s", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(
        p.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    assert_eq!(p.labels().get("x").map(String::as_str), Some("y"));
    let p = pods
        .patch("s", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    assert_eq!(
        p.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    assert_eq!(p.labels().get("x").map(String::as_str), Some("z"));
    assert_eq!(
        server.object("pods", "default", "s").unwrap()["status"]["phase"],
        "Succeeded"
    );

    // Resources without a status subresource have no /status path.
    let leases: Api<Lease> = Api::default_namespaced(server.client());
    let e = leases
        .patch_status("x", &PatchParams::default(), &Patch::Merge(&json!({})))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(404));
}

async fn next<S, T>(s: &mut S, what: &str) -> T
where
    S: futures::Stream<Item = T> + Unpin,
{
    tokio::time::timeout(STEP, s.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("stream ended waiting for {what}"))
}

fn describe(e: &watcher::Result<watcher::Event<Pod>>) -> String {
    match e {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(p)) => format!("InitApply {}", p.name_any()),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(p)) => {
            format!("Apply {} {:?}", p.name_any(), p.labels().get("step"))
        }
        Ok(watcher::Event::Delete(p)) => format!("Delete {}", p.name_any()),
        Err(watcher::Error::WatchError(s)) => format!("WatchError {}", s.code),
        Err(e) => format!("error {e}"),
    }
}

#[tokio::test]
async fn watcher_sees_changes_in_order_and_relists_after_410() {
    let server = ApiServer::start().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let pp = PostParams::default();
    pods.create(&pp, &pod("p1", "n1", json!({}))).await.unwrap();
    pods.create(&pp, &pod("elsewhere", "n2", json!({})))
        .await
        .unwrap();

    let mut events = watcher(
        pods.clone(),
        watcher::Config::default().fields("spec.nodeName=n1"),
    )
    .map(|e| describe(&e))
    .boxed();
    assert_eq!(next(&mut events, "Init").await, "Init");
    assert_eq!(next(&mut events, "InitApply").await, "InitApply p1");
    assert_eq!(next(&mut events, "InitDone").await, "InitDone");

    let label = |step: &str| json!({"metadata": {"labels": {"step": step}}});
    pods.create(&pp, &pod("p2", "n1", json!({}))).await.unwrap();
    pods.create(&pp, &pod("p3", "n2", json!({}))).await.unwrap(); // not on n1: never seen
    pods.patch("p2", &PatchParams::default(), &Patch::Merge(label("one")))
        .await
        .unwrap();
    pods.patch("p3", &PatchParams::default(), &Patch::Merge(label("one")))
        .await
        .unwrap();
    pods.delete("p2", &DeleteParams::default()).await.unwrap();
    assert_eq!(next(&mut events, "ADDED p2").await, "Apply p2 None");
    assert_eq!(
        next(&mut events, "MODIFIED p2").await,
        "Apply p2 Some(\"one\")"
    );
    assert_eq!(next(&mut events, "DELETED p2").await, "Delete p2");

    // History compacted and streams cut: the watcher resumes, gets 410 and lists again.
    server.compact();
    assert_eq!(next(&mut events, "410").await, "WatchError 410");
    assert_eq!(next(&mut events, "Init").await, "Init");
    assert_eq!(next(&mut events, "InitApply").await, "InitApply p1");
    assert_eq!(next(&mut events, "InitDone").await, "InitDone");
    pods.patch("p1", &PatchParams::default(), &Patch::Merge(label("two")))
        .await
        .unwrap();
    assert_eq!(
        next(&mut events, "MODIFIED p1").await,
        "Apply p1 Some(\"two\")"
    );
    let relists = server
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /api/v1/namespaces/default/pods?") && !r.contains("watch=true")
        })
        .count();
    assert_eq!(relists, 2, "{:#?}", server.requests());
}

#[tokio::test]
async fn raw_watch_replays_filters_and_times_out() {
    let server = ApiServer::start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let cm = |name: &str, v: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"sel": v}}})).unwrap()
    };
    let pp = PostParams::default();
    cms.create(&pp, &cm("a", "1")).await.unwrap();
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // Changes before the watch starts are replayed from the history.
    cms.create(&pp, &cm("b", "1")).await.unwrap();
    cms.create(&pp, &cm("c", "2")).await.unwrap();

    let wp = WatchParams::default().labels("sel=1").timeout(2);
    let mut w = cms.watch(&wp, &rv).await.unwrap().boxed();
    let ev = |e: kube::Result<WatchEvent<ConfigMap>>| match e.unwrap() {
        WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
        WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
        WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
        WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
        WatchEvent::Error(s) => format!("ERROR {}", s.code),
    };
    assert_eq!(ev(next(&mut w, "b").await), "ADDED b");
    // Leaving the selector reads as a deletion, coming back as an addition.
    let relabel = |v: &str| json!({"metadata": {"labels": {"sel": v}}});
    cms.patch("a", &PatchParams::default(), &Patch::Merge(relabel("2")))
        .await
        .unwrap();
    assert_eq!(ev(next(&mut w, "a leaves").await), "DELETED a");
    cms.patch("c", &PatchParams::default(), &Patch::Merge(relabel("1")))
        .await
        .unwrap();
    assert_eq!(ev(next(&mut w, "c joins").await), "ADDED c");
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    assert_eq!(ev(next(&mut w, "c changes").await), "MODIFIED c");
    // timeoutSeconds=2 ends the stream, with a bookmark at the latest resourceVersion first.
    let started = std::time::Instant::now();
    assert_eq!(
        ev(next(&mut w, "bookmark").await),
        format!("BOOKMARK {}", server.resource_version())
    );
    assert!(tokio::time::timeout(STEP, w.next())
        .await
        .unwrap()
        .is_none());
    assert!(started.elapsed() < Duration::from_secs(3));

    // Watching from "0" starts with the current objects.
    let mut w = cms
        .watch(&WatchParams::default().labels("sel=1"), "0")
        .await
        .unwrap()
        .boxed();
    let mut first = vec![ev(next(&mut w, "b").await), ev(next(&mut w, "c").await)];
    first.sort();
    assert_eq!(first, ["ADDED b", "ADDED c"]);

    // A resourceVersion from before the history is an ERROR 410 event, as kube-apiserver does.
    server.compact();
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    assert_eq!(ev(next(&mut w, "410").await), "ERROR 410");

    // The streaming-list mode (sendInitialEvents) ends its initial events with a marked bookmark.
    let mut s = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    loop {
        match next(&mut s, "streaming list").await.unwrap() {
            watcher::Event::Init => seen.push("Init".to_string()),
            watcher::Event::InitApply(o) => seen.push(o.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, ["Init", "a", "b", "c"]);
}

#[tokio::test]
async fn finalizers_and_delete_preconditions() {
    let server = ApiServer::start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "f", "finalizers": ["example.com/keep"]},
    }))
    .unwrap();
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();

    let e = cms
        .delete(
            "f",
            &DeleteParams::default().preconditions(kube::api::Preconditions {
                uid: Some("not-the-uid".into()),
                resource_version: None,
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(409));

    let marked = cms
        .delete("f", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    let still = cms.get("f").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());
    assert_eq!(still.uid(), created.uid());

    let mut emptied = still.clone();
    emptied.metadata.finalizers = Some(vec![]);
    cms.replace("f", &PostParams::default(), &emptied)
        .await
        .unwrap();
    assert!(
        cms.get_opt("f").await.unwrap().is_none(),
        "removed once finalizers are gone"
    );

    // The same through JSON patches, as kube::runtime::finalizer does: add with "-", then a
    // guarded remove.
    let json_patch =
        |ops: serde_json::Value| -> Patch<()> { Patch::Json(serde_json::from_value(ops).unwrap()) };
    let plain: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "j", "finalizers": []}})).unwrap();
    cms.create(&PostParams::default(), &plain).await.unwrap();
    let add = json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "example.com/j"}]);
    let j = cms
        .patch("j", &PatchParams::default(), &json_patch(add))
        .await
        .unwrap();
    assert_eq!(j.finalizers(), ["example.com/j"]);
    cms.delete("j", &DeleteParams::default()).await.unwrap();
    assert!(cms
        .get("j")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());
    let remove = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "example.com/j"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]);
    cms.patch("j", &PatchParams::default(), &json_patch(remove))
        .await
        .unwrap();
    assert!(cms.get_opt("j").await.unwrap().is_none());

    // Preconditions that hold let the delete through.
    let plain = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "g"}})).unwrap(),
        )
        .await
        .unwrap();
    let dp = DeleteParams::default().preconditions(kube::api::Preconditions {
        uid: plain.uid(),
        resource_version: plain.resource_version(),
    });
    cms.delete("g", &dp).await.unwrap();
    assert!(server.object("configmaps", "default", "g").is_none());

    // Delete collection, by label.
    for (name, v) in [("h1", "1"), ("h2", "1"), ("h3", "2")] {
        let cm = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"h": v}}}));
        cms.create(&PostParams::default(), &cm.unwrap())
            .await
            .unwrap();
    }
    let deleted = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("h=1"),
        )
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(names(&deleted.items), ["h1", "h2"]);
    assert_eq!(
        names(&cms.list(&ListParams::default()).await.unwrap().items),
        ["h3"]
    );
}

#[tokio::test]
async fn server_side_apply_creates_then_merges() {
    let server = ApiServer::start().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(server.client());
    let pp = PatchParams::apply("test").force();
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}});
    let first = cms.patch("ssa", &pp, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(first.data.as_ref().unwrap()["a"], "1");
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"b": "2"}});
    let second = cms.patch("ssa", &pp, &Patch::Apply(&body)).await.unwrap();
    assert_eq!(second.uid(), first.uid());
    assert_eq!(second.data.unwrap()["b"], "2");
    // Other patch kinds do not create.
    let e = cms
        .patch(
            "absent",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&e).map(|c| c.0), Some(404));
}

#[tokio::test]
async fn kube_runtime_event_recorder_works() {
    let server = ApiServer::start().await;
    let client = server.client();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let p = pods
        .create(&PostParams::default(), &pod("e", "n1", json!({})))
        .await
        .unwrap();
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "cachevol-test".into(),
            instance: None,
        },
    );
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "Tested".into(),
        note: Some("hello".into()),
        action: "Test".into(),
        secondary: None,
    };
    recorder.publish(&ev, &p.object_ref(&())).await.unwrap();
    recorder.publish(&ev, &p.object_ref(&())).await.unwrap(); // a series: a patch of the first
    let events = server.objects("events.events.k8s.io");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["reason"], "Tested");
    assert_eq!(events[0]["series"]["count"], 2);

    // Core v1 events are another resource.
    let core: Api<Event> = Api::default_namespaced(client);
    let e: Event = serde_json::from_value(json!({
        "metadata": {"name": "core-event"},
        "involvedObject": {"kind": "Pod", "name": "e", "namespace": "default"},
        "reason": "Core",
    }))
    .unwrap();
    core.create(&PostParams::default(), &e).await.unwrap();
    let found = core
        .list(&ListParams::default().fields("involvedObject.name=e"))
        .await
        .unwrap();
    assert_eq!(names(&found.items), ["core-event"]);
    assert_eq!(server.objects("events").len(), 1);
}

#[tokio::test]
async fn discovery_and_unknown_paths() {
    let server = ApiServer::start().await;
    let client = server.client();
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(
        (v.major.as_str(), v.minor.as_str(), v.git_version.as_str()),
        ("1", "33", "v1.33.0")
    );
    let core = client.list_core_api_resources("v1").await.unwrap();
    let pods = core.resources.iter().find(|r| r.name == "pods").unwrap();
    assert!(pods.namespaced && pods.kind == "Pod" && pods.verbs.contains(&"watch".to_string()));
    assert!(core.resources.iter().any(|r| r.name == "pods/status"));
    let groups = client.list_api_groups().await.unwrap();
    assert!(groups
        .groups
        .iter()
        .any(|g| g.name == "coordination.k8s.io"));
    let storage = client
        .list_api_group_resources("storage.k8s.io/v1")
        .await
        .unwrap();
    assert!(storage
        .resources
        .iter()
        .any(|r| r.name == "csidrivers" && !r.namespaced));

    // kube's own discovery maps kinds through these documents.
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let (lease, _) = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "coordination.k8s.io",
            "v1",
            "Lease",
        ))
        .expect("Lease discovered");
    assert_eq!(lease.plural, "leases");
    assert!(discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk(
            "monitoring.coreos.com",
            "v1",
            "ServiceMonitor"
        ))
        .is_some());

    // Lists are `<Kind>List` documents carrying the current resourceVersion.
    let text = client
        .request_text(http_get(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
        ))
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list["kind"], "LeaseList");
    assert_eq!(list["apiVersion"], "coordination.k8s.io/v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );

    for path in [
        "/apis/example.com/v1/widgets",
        "/api/v1/namespaces/default/widgets",
        "/openapi/v2",
        "/api/v1/namespaces/default/pods/x/log",
    ] {
        let req = http_get(path);
        let e = client.request_text(req).await.unwrap_err();
        assert_eq!(api_code(&e).map(|c| c.0), Some(404), "{path}: {e}");
    }
}

fn http_get(path: &str) -> hyper::Request<Vec<u8>> {
    hyper::Request::get(path).body(Vec::new()).unwrap()
}

/// Not a test: the child process of `kubeconfig_reaches_the_server_from_another_process`.
#[tokio::test]
#[ignore = "run by kubeconfig_reaches_the_server_from_another_process as a child process"]
async fn child_process_helper() {
    let Ok(name) = std::env::var("STANDIN_CHILD_CONFIGMAP") else {
        return;
    };
    // As cachevol's processes do: the client from KUBECONFIG, namespace from its context.
    common::apiserver::install_crypto_provider();
    let client = kube::Client::try_default().await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
}

#[tokio::test]
async fn kubeconfig_reaches_the_server_from_another_process() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();

    // In process, through the kubeconfig file.
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    assert_eq!(config.default_namespace, "default");
    common::apiserver::install_crypto_provider();
    let client = kube::Client::try_from(config).unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "in-process"}})).unwrap(),
    )
    .await
    .unwrap();
    assert!(server
        .object("configmaps", "default", "in-process")
        .is_some());

    // A separate process with KUBECONFIG set (this test binary, running the helper above). The
    // server has its own thread, so blocking here on the child is fine.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KUBECONFIG", &path)
        .env("STANDIN_CHILD_CONFIGMAP", "from-child")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    assert!(server
        .object("configmaps", "default", "from-child")
        .is_some());
}

async fn within<F: std::future::Future>(f: F, what: &str) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test]
async fn down_fails_calls_and_recovers() {
    let server = ApiServer::start().await;
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let lp = ListParams::default();
    pods.list(&lp).await.unwrap();

    let mut w = pods
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    server.set_down(true);
    // A live watch stream ends; calls fail with transport errors (not retried by kube).
    assert!(within(w.next(), "the watch to end").await.is_none());
    let e = within(pods.list(&lp), "list while down").await.unwrap_err();
    assert!(
        api_code(&e).is_none(),
        "a transport error, not a status: {e}"
    );
    let e = within(pods.get("x"), "get while down").await.unwrap_err();
    assert!(api_code(&e).is_none(), "{e}");
    let e = within(
        pods.create(&PostParams::default(), &pod("x", "n1", json!({}))),
        "create",
    )
    .await
    .unwrap_err();
    assert!(api_code(&e).is_none(), "{e}");
    assert!(server.objects("pods").is_empty());
    server.set_down(false);
    // The same client recovers on a new connection.
    within(
        pods.create(&PostParams::default(), &pod("up", "n1", json!({}))),
        "create after",
    )
    .await
    .unwrap();
    assert_eq!(names(&pods.list(&lp).await.unwrap().items), ["up"]);

    // A watcher reports errors while the server is down and carries on after.
    let mut events = watcher(pods.clone(), watcher::Config::default())
        .map(|e| describe(&e))
        .boxed();
    assert_eq!(next(&mut events, "Init").await, "Init");
    assert_eq!(next(&mut events, "InitApply").await, "InitApply up");
    assert_eq!(next(&mut events, "InitDone").await, "InitDone");
    server.set_down(true);
    let e = next(&mut events, "an error while down").await;
    assert!(e.starts_with("error"), "{e}");
    server.set_down(false);
    pods.create(&PostParams::default(), &pod("later", "n1", json!({})))
        .await
        .unwrap();
    loop {
        let e = next(&mut events, "later").await;
        if e == "Apply later None" {
            break;
        }
        assert!(e.starts_with("error"), "{e}");
    }
}

#[tokio::test]
async fn unavailable_answers_503() {
    let server = ApiServer::start().await;
    common::apiserver::install_crypto_provider();
    let mut config = kube::Config::new(server.url().parse().unwrap());
    config.default_retry = false;
    let no_retry: Api<Pod> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let lp = ListParams::default();

    server.set_unavailable(true);
    let e = within(no_retry.list(&lp), "list while unavailable")
        .await
        .unwrap_err();
    assert_eq!(
        api_code(&e),
        Some((503, "ServiceUnavailable".into())),
        "{e}"
    );

    // kube's default client retries a 503 with backoff: the call completes once available.
    let asked = server.requests().len();
    let pending = tokio::spawn(async move { pods.list(&ListParams::default()).await });
    // It has been answered 503 and asked again (twice), and is still waiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.requests().len() < asked + 3 {
        assert!(
            std::time::Instant::now() < deadline && !pending.is_finished(),
            "the default client did not retry a 503: {:#?}",
            server.requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !pending.is_finished(),
        "the default client gave up on a 503"
    );
    let before = server.requests().len();
    server.set_unavailable(false);
    let list = within(pending, "the retried list").await.unwrap().unwrap();
    assert!(list.items.is_empty());
    assert!(before >= 3, "retried: {:#?}", server.requests());
    no_retry.list(&lp).await.unwrap();
}
