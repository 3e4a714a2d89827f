//! `cachevol node` as kubelet sees it: the real binary on a unix socket, a tonic client over
//! that socket, real mounts (the tests run as root). Covers the bad-request and idempotency
//! matrix of the Node RPCs, publish → write → unpublish → commit → publish on a second node, the
//! copy fallback, and a node plugin killed between publish and commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use cachevol::csi::pb::node_client::NodeClient;
use cachevol::csi::pb::volume_capability::{access_mode::Mode, AccessMode, AccessType};
use cachevol::csi::pb::{self, volume_capability};
use cachevol::engine::{Engine, Store};
use tonic::transport::Channel;
use tonic::Code;

struct NodePlugin {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl NodePlugin {
    fn start(root: &Path, name: &str, extra: &[&str]) -> NodePlugin {
        let socket = root.join(name).join("csi.sock");
        let log = root.join(format!("{name}.log"));
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .arg("node")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg(name)
            .arg("--state-dir")
            .arg(root.join(name).join("state"))
            .args(extra)
            .env("CACHEVOL_LOG", "debug")
            // No cluster here, whatever the environment says: commits follow unpublish.
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let mut p = NodePlugin { child, socket, log };
        common::wait_for_socket(
            "node plugin",
            &mut p.child,
            &p.socket,
            &p.log,
            Duration::from_secs(20),
        );
        p
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn client(&self) -> NodeClient<Channel> {
        NodeClient::new(common::dial_unix(&self.socket).await)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits without blocking the runtime, so this process's client connections
    /// can answer the server's GOAWAY (a draining server waits for them).
    async fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodePlugin {
    /// Stops the plugin and unmounts what it left in its state dir (its bases are mounted
    /// images), so the test's temp dir can go.
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.socket.parent() {
            let _ = cachevol::node::mount::unmount_all_under(&dir.join("state"));
        }
    }
}

fn cap(mode: Mode, block: bool) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(volume_capability::BlockVolume {})
        } else {
            AccessType::Mount(volume_capability::MountVolume::default())
        }),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn context(store: &str, key: &str, pod: &str) -> HashMap<String, String> {
    [
        ("store", store.to_string()),
        ("scope", "team-a".into()),
        ("key", key.into()),
        ("mode", "private".into()),
        ("csi.storage.k8s.io/pod.name", pod.into()),
        ("csi.storage.k8s.io/pod.namespace", "ci".into()),
        ("csi.storage.k8s.io/pod.uid", format!("uid-{pod}")),
        ("csi.storage.k8s.io/serviceAccount.name", "default".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn publish_req(
    vol: &str,
    target: &Path,
    ctx: HashMap<String, String>,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap(Mode::MultiNodeMultiWriter, false)),
        volume_context: ctx,
        ..Default::default()
    }
}

fn unpublish_req(vol: &str, target: &Path) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.display().to_string(),
    }
}

/// Waits until the store's newest generation of `key` is `want`.
async fn wait_generation(store: &str, key: &str, want: u64, logs: impl Fn() -> String) {
    let tmp = tempfile::tempdir().unwrap();
    let engine = Engine::new(Store::open(store).unwrap(), "team-a", tmp.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if engine.newest(key).await.unwrap() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "generation {want} of {key} never came:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mounted(p: &Path) -> bool {
    cachevol::node::mount::is_mount_point(p).unwrap()
}

#[tokio::test]
async fn bad_requests_and_idempotency() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}", t.join("store").display());
    let node = NodePlugin::start(t, "n1", &[]);
    let mut c = node.client().await;

    let info = c
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "n1");
    let caps = c
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        format!("{caps:?}").contains("GetVolumeStats"),
        "GET_VOLUME_STATS: {caps:?}"
    );
    assert!(
        format!("{caps:?}").contains("VolumeMountGroup"),
        "VOLUME_MOUNT_GROUP: {caps:?}"
    );
    let err = c
        .node_stage_volume(pb::NodeStageVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    let target = t.join("pods/a/volumes/v/mount");
    let good = publish_req("cv-1", &target, context(&store, "npm", "a"));
    let cases: Vec<(pb::NodePublishVolumeRequest, &str)> = vec![
        (
            pb::NodePublishVolumeRequest {
                volume_id: "".into(),
                ..good.clone()
            },
            "volume_id",
        ),
        (
            pb::NodePublishVolumeRequest {
                target_path: "".into(),
                ..good.clone()
            },
            "target_path",
        ),
        (
            pb::NodePublishVolumeRequest {
                volume_capability: None,
                ..good.clone()
            },
            "volume_capability",
        ),
        (
            pb::NodePublishVolumeRequest {
                volume_capability: Some(cap(Mode::MultiNodeMultiWriter, true)),
                ..good.clone()
            },
            "block",
        ),
        (
            pb::NodePublishVolumeRequest {
                volume_capability: Some(pb::VolumeCapability {
                    access_type: Some(AccessType::Mount(volume_capability::MountVolume {
                        volume_mount_group: "wheel".into(),
                        ..Default::default()
                    })),
                    ..cap(Mode::MultiNodeMultiWriter, false)
                }),
                ..good.clone()
            },
            "volume_mount_group",
        ),
        (
            pb::NodePublishVolumeRequest {
                volume_context: context(&store, "../etc", "a"),
                ..good.clone()
            },
            "key",
        ),
    ];
    for (req, want) in cases {
        let err = c.node_publish_volume(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "{want}: {}", err.message());
        assert!(!mounted(&target));
    }

    // Publish twice: the second succeeds and changes nothing.
    c.node_publish_volume(good.clone()).await.unwrap();
    std::fs::write(target.join("f"), vec![3u8; 10_000]).unwrap();
    c.node_publish_volume(good.clone()).await.unwrap();
    assert_eq!(std::fs::read(target.join("f")).unwrap().len(), 10_000);
    // The same target from another volume: ALREADY_EXISTS.
    let other = publish_req("cv-2", &target, context(&store, "npm", "a"));
    assert_eq!(
        c.node_publish_volume(other).await.unwrap_err().code(),
        Code::AlreadyExists
    );

    let stats = c
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "cv-1".into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = stats.usage.iter().find(|u| u.unit == 1).unwrap();
    assert!(bytes.used >= 10_000 && bytes.total > 0, "{stats:?}");
    let err = c
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: "cv-9".into(),
            volume_path: t.join("nowhere").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    for (req, want) in [
        (unpublish_req("", &target), "volume_id"),
        (
            pb::NodeUnpublishVolumeRequest {
                volume_id: "cv-1".into(),
                target_path: "".into(),
            },
            "target_path",
        ),
    ] {
        let err = c.node_unpublish_volume(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(want));
    }
    c.node_unpublish_volume(unpublish_req("cv-1", &target))
        .await
        .unwrap();
    assert!(!mounted(&target));
    // Again, and for a target that never was: OK.
    c.node_unpublish_volume(unpublish_req("cv-1", &target))
        .await
        .unwrap();
    c.node_unpublish_volume(unpublish_req("cv-1", &t.join("never")))
        .await
        .unwrap();
    wait_generation(&store, "npm", 1, || node.logs()).await;
}

async fn round_trip(copy_views: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}", t.join("store").display());
    let flags: &[&str] = if copy_views { &["--copy-views"] } else { &[] };
    let n1 = NodePlugin::start(t, "n1", flags);
    let n2 = NodePlugin::start(t, "n2", flags);
    let (mut c1, mut c2) = (n1.client().await, n2.client().await);

    let ta = t.join("pods/a/mount");
    c1.node_publish_volume(publish_req("cv-1", &ta, context(&store, "cargo", "a")))
        .await
        .unwrap();
    let sh = |cmd: String| {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .status()
                .unwrap()
                .success(),
            "{cmd}"
        )
    };
    sh(format!(
        "mkdir -p {0}/registry/src && head -c 2000000 /dev/urandom > {0}/registry/big.crate \
         && echo hi > {0}/registry/src/lib.rs && chmod 640 {0}/registry/src/lib.rs && ln -s src {0}/registry/link",
        ta.display()
    ));
    let expected = common::find_listing(&ta);
    c1.node_unpublish_volume(unpublish_req("cv-1", &ta))
        .await
        .unwrap();
    wait_generation(&store, "cargo", 1, || n1.logs()).await;

    // Another node restores it: the view equals what pod A left, byte for byte.
    let tb = t.join("pods/b/mount");
    c2.node_publish_volume(publish_req("cv-1", &tb, context(&store, "cargo", "b")))
        .await
        .unwrap();
    assert_eq!(common::find_listing(&tb), expected);
    c2.node_unpublish_volume(unpublish_req("cv-1", &tb))
        .await
        .unwrap();
}

#[tokio::test]
async fn publish_write_unpublish_commit_then_another_node_sees_it() {
    round_trip(false).await;
}

#[tokio::test]
async fn the_copy_fallback_round_trips_too() {
    round_trip(true).await;
}

#[tokio::test]
async fn a_node_plugin_killed_between_publish_and_commit_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}", t.join("store").display());
    let mut n1 = NodePlugin::start(t, "n1", &[]);
    let ta = t.join("pods/a/mount");
    n1.client()
        .await
        .node_publish_volume(publish_req("cv-1", &ta, context(&store, "go", "a")))
        .await
        .unwrap();
    std::fs::write(ta.join("mod.zip"), vec![9u8; 70_000]).unwrap();
    n1.kill();
    // The mount outlives the plugin (it lives in the node's mount table), and so do the records.
    assert!(mounted(&ta));
    let n1 = NodePlugin::start(t, "n1", &[]);
    n1.client()
        .await
        .node_unpublish_volume(unpublish_req("cv-1", &ta))
        .await
        .unwrap();
    wait_generation(&store, "go", 1, || n1.logs()).await;

    // Killed after unpublish, before the commit ran: the restart commits it.
    let mut n1 = n1;
    let tb = t.join("pods/b/mount");
    let mut c = n1.client().await;
    c.node_publish_volume(publish_req("cv-1", &tb, context(&store, "go", "b")))
        .await
        .unwrap();
    assert_eq!(std::fs::read(tb.join("mod.zip")).unwrap().len(), 70_000);
    std::fs::write(tb.join("second"), "2").unwrap();
    drop(c);
    assert!(n1.stop().await.success(), "{}", n1.logs());
    let n1 = NodePlugin::start(t, "n1", &[]);
    n1.client()
        .await
        .node_unpublish_volume(unpublish_req("cv-1", &tb))
        .await
        .unwrap();
    wait_generation(&store, "go", 2, || n1.logs()).await;
}

#[tokio::test]
async fn two_pods_private_versus_shared_on_one_node() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}", t.join("store").display());
    let node = NodePlugin::start(t, "n1", &[]);
    let mut c = node.client().await;
    let with_mode = |pod: &str, mode: &str| {
        let mut ctx = context(&store, "gomod", pod);
        ctx.insert("mode".into(), mode.into());
        ctx
    };

    // Private: each pod has its own fork.
    let (pa, pb) = (t.join("pa"), t.join("pb"));
    c.node_publish_volume(publish_req("cv-1", &pa, with_mode("a", "private")))
        .await
        .unwrap();
    c.node_publish_volume(publish_req("cv-1", &pb, with_mode("b", "private")))
        .await
        .unwrap();
    std::fs::write(pa.join("only-a"), "a").unwrap();
    assert!(!pb.join("only-a").exists());
    c.node_unpublish_volume(unpublish_req("cv-1", &pa))
        .await
        .unwrap();
    c.node_unpublish_volume(unpublish_req("cv-1", &pb))
        .await
        .unwrap();
    wait_generation(&store, "gomod", 1, || node.logs()).await;

    // Shared: one live view; committed once, after the last pod leaves.
    let (sa, sb) = (t.join("sa"), t.join("sb"));
    c.node_publish_volume(publish_req("cv-1", &sa, with_mode("c", "shared")))
        .await
        .unwrap();
    c.node_publish_volume(publish_req("cv-1", &sb, with_mode("d", "shared")))
        .await
        .unwrap();
    std::fs::write(sa.join("from-c"), "c").unwrap();
    assert_eq!(std::fs::read_to_string(sb.join("from-c")).unwrap(), "c");
    c.node_unpublish_volume(unpublish_req("cv-1", &sa))
        .await
        .unwrap();
    std::fs::write(sb.join("from-d"), "d").unwrap();
    // The node decided, before answering, that the view stays active for d: a view that went
    // pending here would be committed in the background.
    assert_eq!(
        shared_view_targets(&t.join("n1/state"), &sb),
        Some(("active".to_string(), 1)),
        "{}",
        node.logs()
    );
    let tmp2 = tempfile::tempdir().unwrap();
    let engine = Engine::new(Store::open(&store).unwrap(), "team-a", tmp2.path()).unwrap();
    assert_eq!(
        engine.newest("gomod").await.unwrap(),
        Some(1),
        "no commit while a pod is left"
    );
    c.node_unpublish_volume(unpublish_req("cv-1", &sb))
        .await
        .unwrap();
    wait_generation(&store, "gomod", 2, || node.logs()).await;
    let check = t.join("check");
    engine.restore("gomod", &[], &check).await.unwrap();
    assert!(check.join("from-c").exists() && check.join("from-d").exists());
    // The shared view started from generation 1, the private pod a's commit (b changed nothing).
    assert!(check.join("only-a").exists());
}

fn mount_tmpfs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs at {}", dir.display());
}

// Kubelet's paths are taken as given and only if normal: a `..` would mount outside the pod's
// directory. What the driver did not mount (its records say what it did) it never unmounts
// nor removes: NodeUnpublishVolume of such a target answers OK and leaves it alone.
#[tokio::test]
async fn paths_the_driver_did_not_make_are_refused_or_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}", t.join("store").display());
    let node = NodePlugin::start(t, "n1", &[]);
    let mut c = node.client().await;

    // A target that climbs out of kubelet's directory, a relative one, a bad staging path.
    std::fs::create_dir_all(t.join("targets/a")).unwrap();
    let escaping = format!("{}/targets/a/../../x", t.display());
    let good = publish_req(
        "cv-1",
        &t.join("targets/a/mount"),
        context(&store, "npm", "a"),
    );
    for (req, field) in [
        (
            pb::NodePublishVolumeRequest {
                target_path: escaping.clone(),
                ..good.clone()
            },
            "target_path",
        ),
        (
            pb::NodePublishVolumeRequest {
                target_path: format!("{}/targets/./a/mount", t.display()),
                ..good.clone()
            },
            "target_path",
        ),
        (
            pb::NodePublishVolumeRequest {
                target_path: "targets/a/mount".into(),
                ..good.clone()
            },
            "target_path",
        ),
        (
            pb::NodePublishVolumeRequest {
                staging_target_path: format!("{}/staging/../../etc", t.display()),
                ..good.clone()
            },
            "staging_target_path",
        ),
    ] {
        let err = c.node_publish_volume(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert!(!t.join("x").exists(), "nothing was made outside the target");
    assert!(!mounted(&t.join("targets/a/mount")));
    let err = c
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: "cv-1".into(),
            target_path: escaping,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Someone else's mount: unpublishing it is OK and changes nothing.
    let foreign = t.join("foreign");
    mount_tmpfs(&foreign);
    std::fs::write(foreign.join("keep"), "not cachevol's").unwrap();
    c.node_unpublish_volume(unpublish_req("cv-1", &foreign))
        .await
        .unwrap();
    assert!(
        mounted(&foreign),
        "the driver unmounted a mount it never made"
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("keep")).unwrap(),
        "not cachevol's"
    );

    // Published over someone else's mount: the view is bound over it (the pod sees the cache,
    // not the tmpfs), and unpublishing takes away only the view.
    let target = t.join("targets/b/mount");
    mount_tmpfs(&target);
    std::fs::write(target.join("keep"), "not cachevol's").unwrap();
    c.node_publish_volume(publish_req("cv-1", &target, context(&store, "npm", "b")))
        .await
        .unwrap();
    assert!(
        !target.join("keep").exists(),
        "the pod sees the tmpfs, not its cache"
    );
    std::fs::write(target.join("cached"), "x").unwrap();
    c.node_unpublish_volume(unpublish_req("cv-1", &target))
        .await
        .unwrap();
    wait_generation(&store, "npm", 1, || node.logs()).await;
    assert!(mounted(&target), "the tmpfs under the view is still there");
    assert_eq!(
        std::fs::read_to_string(target.join("keep")).unwrap(),
        "not cachevol's"
    );
    for m in [&foreign, &target] {
        cachevol::node::mount::unmount(m).unwrap();
    }
}

/// The state and number of targets of the view record that has `target` among its targets, in
/// the node state dir `state` (its `views/<id>.json` files, as the node writes them before it
/// answers a publish or an unpublish).
fn shared_view_targets(state: &Path, target: &Path) -> Option<(String, usize)> {
    std::fs::read_dir(state.join("views"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .find_map(|e| {
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            let targets = r["targets"].as_object()?;
            targets.contains_key(target.to_str()?).then(|| {
                (
                    r["state"].as_str().unwrap_or_default().to_string(),
                    targets.len(),
                )
            })
        })
}

/// The capability kubelet sends for a pod with an SELinux label when the CSIDriver says
/// `seLinuxMount: true`: the context in the mount flags, quoted because of its comma.
fn labelled_cap(flag: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(volume_capability::MountVolume {
            mount_flags: vec![flag.to_string()],
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

#[tokio::test]
async fn an_selinux_context_in_the_mount_flags_is_honoured_or_dropped_never_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}", t.join("store").display());
    let node = NodePlugin::start(t, "n1", &[]);
    let mut c = node.client().await;
    let selinux = std::fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.ends_with("\tselinuxfs"));

    let target = t.join("pods/a/volumes/v/mount");
    let req = pb::NodePublishVolumeRequest {
        volume_capability: Some(labelled_cap(
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\"",
        )),
        ..publish_req("cv-1", &target, context(&store, "npm", "a"))
    };
    c.node_publish_volume(req.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.logs()));
    assert!(mounted(&target));
    std::fs::write(target.join("x"), "x").unwrap();
    // The same publish again: fine.
    c.node_publish_volume(req.clone()).await.unwrap();
    let options: Vec<String> = cachevol::node::mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == target)
        .map(|m| m.options)
        .collect();
    assert_eq!(options.len(), 1, "{options:?}");
    // The kernel shows the label among the mount's options where it has SELinux.
    assert_eq!(options[0].contains("context="), selinux, "{options:?}");
    if !selinux {
        assert!(
            node.logs().contains("the context= mount flag is dropped"),
            "{}",
            node.logs()
        );
    }

    // A context kubelet could never have sent is the caller's mistake, whatever the kernel.
    let bad = pb::NodePublishVolumeRequest {
        volume_capability: Some(labelled_cap("context=\"system_u:object_r:x:s0:c1,c2")),
        ..publish_req(
            "cv-2",
            &t.join("pods/b/volumes/v/mount"),
            context(&store, "npm", "b"),
        )
    };
    let err = c.node_publish_volume(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("mount_flags"), "{err:?}");

    c.node_unpublish_volume(unpublish_req("cv-1", &target))
        .await
        .unwrap();
    wait_generation(&store, "npm", 1, || node.logs()).await;
}

async fn condition_of(
    c: &mut NodeClient<Channel>,
    vol: &str,
    target: &Path,
) -> pb::VolumeCondition {
    c.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
        volume_id: vol.into(),
        volume_path: target.display().to_string(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .volume_condition
    .expect("VOLUME_CONDITION is advertised: every answer has one")
}

fn umount_lazily(p: &Path) {
    let st = Command::new("umount").arg("-l").arg(p).status().unwrap();
    assert!(st.success(), "umount -l {}", p.display());
}

#[tokio::test]
async fn volume_stats_say_abnormal_once_a_view_loses_its_base_or_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let store = format!("file://{}", t.join("store").display());
    let n1 = NodePlugin::start(t, "n1", &[]);
    let mut c1 = n1.client().await;
    let caps = c1
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        format!("{caps:?}").contains("VolumeCondition"),
        "VOLUME_CONDITION: {caps:?}"
    );
    // Generation 1, for a fresh node to restore as an image base.
    let ta = t.join("pods/a/mount");
    c1.node_publish_volume(publish_req("cv-1", &ta, context(&store, "npm", "a")))
        .await
        .unwrap();
    std::fs::write(ta.join("f"), "one").unwrap();
    let ok = condition_of(&mut c1, "cv-1", &ta).await;
    assert!(!ok.abnormal, "{ok:?}");
    assert_eq!(ok.message, "ok");
    c1.node_unpublish_volume(unpublish_req("cv-1", &ta))
        .await
        .unwrap();
    wait_generation(&store, "npm", 1, || n1.logs()).await;

    let n2 = NodePlugin::start(t, "n2", &[]);
    let mut c2 = n2.client().await;
    let tb = t.join("pods/b/mount");
    c2.node_publish_volume(publish_req("cv-1", &tb, context(&store, "npm", "b")))
        .await
        .unwrap();
    assert!(!condition_of(&mut c2, "cv-1", &tb).await.abnormal);
    let bases = t.join("n2/state/bases");
    let base_tree = cachevol::node::mount::mounts()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .find(|m| m.starts_with(&bases) && m.ends_with("tree"));
    match base_tree {
        Some(tree) => {
            // The base image's mount goes: the pod's overlay keeps it, but the node has lost it.
            umount_lazily(&tree);
            let c = condition_of(&mut c2, "cv-1", &tb).await;
            assert!(c.abnormal, "{c:?}");
            assert!(
                c.message.contains("base image is no longer mounted"),
                "{c:?}"
            );
        }
        // A kernel without file-backed EROFS: the base is a tree of files, nothing to unmount.
        None => assert!(
            n2.logs().contains("does not mount EROFS images"),
            "{}",
            n2.logs()
        ),
    }
    // The pod's target, unmounted from under it.
    umount_lazily(&tb);
    let c = condition_of(&mut c2, "cv-1", &tb).await;
    assert!(c.abnormal, "{c:?}");
    assert!(
        c.message
            .contains(&format!("no longer mounted at {}", tb.display())),
        "{c:?}"
    );
}
