//! `cachevol controller` as csi-provisioner sees it: the real binary on a unix socket in a temp
//! dir, dialled with a tonic client over that socket. Covers the socket (mode, stale socket,
//! SIGTERM), the Identity service, and the bad-request and idempotency matrix of every
//! Controller RPC, including records that survive a crash of the controller.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;

use cachevol::csi::pb::controller_client::ControllerClient;
use cachevol::csi::pb::identity_client::IdentityClient;
use cachevol::csi::pb::volume_capability::{access_mode::Mode, AccessMode, AccessType};
use cachevol::csi::pb::{self, volume_capability};
use tonic::transport::Channel;
use tonic::Code;

/// One `cachevol controller` process with its own store, state dir and socket.
struct Plugin {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        Dirs { _tmp: tmp, root }
    }
    fn socket(&self) -> PathBuf {
        self.root.join("csi").join("csi.sock")
    }
    fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    fn state(&self) -> PathBuf {
        self.root.join("state")
    }
}

impl Plugin {
    fn spawn(d: &Dirs) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.root.join("controller.log"))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_cachevol"))
            .arg("controller")
            .arg("--endpoint")
            .arg(format!("unix://{}", d.socket().display()))
            .arg("--store")
            .arg(format!("file://{}", d.store().display()))
            .arg("--state-dir")
            .arg(d.state())
            .env("CACHEVOL_LOG", "debug")
            // No cluster here, whatever the environment says.
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cachevol controller")
    }

    /// Starts the controller and waits until its socket accepts connections.
    fn start(d: &Dirs) -> Plugin {
        Plugin {
            child: Plugin::spawn(d),
            socket: d.socket(),
            log: d.root.join("controller.log"),
        }
        .listening()
    }

    /// Once the controller listens on its socket (it fails the test if it exits first).
    fn listening(mut self) -> Plugin {
        common::wait_for_socket(
            "controller",
            &mut self.child,
            &self.socket,
            &self.log,
            Duration::from_secs(20),
        );
        self
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`. Async, so
    /// the test's own gRPC clients keep running meanwhile (a draining server waits for them).
    async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// A gRPC channel over the unix socket, dialled the way the sidecars do.
    async fn channel(&self) -> Channel {
        common::dial_unix(&self.socket).await
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mount(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(volume_capability::MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(volume_capability::BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What csi-provisioner with --extra-create-metadata sends for claim `team-a/npm-cache` of a
/// StorageClass with `extra` parameters, asking for 1 GiB, ReadWriteMany.
fn create_request(name: &str, extra: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    let mut parameters = map(&[
        ("csi.storage.k8s.io/pvc/name", "npm-cache"),
        ("csi.storage.k8s.io/pvc/namespace", "team-a"),
        ("csi.storage.k8s.io/pv/name", name),
    ]);
    parameters.extend(map(extra));
    pb::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount(Mode::MultiNodeMultiWriter)],
        parameters,
        secrets: map(&[("awsSecretAccessKey", "s3cr3t-value-never-logged")]),
        ..Default::default()
    }
}

/// Asserts a gRPC error with `code` whose message mentions every `needle`.
fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needles: &[&str]) {
    let s = r.expect_err("the call should fail");
    assert_eq!(s.code(), code, "{}", s.message());
    for n in needles {
        assert!(s.message().contains(n), "{:?} not in {:?}", n, s.message());
    }
}

#[tokio::test]
async fn identity_on_a_0660_socket() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mode = std::fs::metadata(&p.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    let mut id = p.identity().await;
    let info = id
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "cachevol.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = id
        .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        services,
        vec![pb::plugin_capability::service::Type::ControllerService as i32]
    );

    let mut ctl = p.controller().await;
    let caps = ctl
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(pb::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        rpcs,
        vec![
            pb::controller_service_capability::rpc::Type::CreateDeleteVolume as i32,
            pb::controller_service_capability::rpc::Type::SingleNodeMultiWriter as i32
        ]
    );
}

#[tokio::test]
async fn probe_reports_not_ready_without_a_state_dir_instead_of_failing() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mut id = p.identity().await;
    let probe = |r: pb::ProbeResponse| r.ready;
    let r = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe(r), Some(true));

    std::fs::remove_dir_all(d.state()).unwrap();
    let r = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe(r), Some(false), "{}", p.logs());
    assert!(p.logs().contains("not ready"), "{}", p.logs());

    std::fs::create_dir_all(d.state()).unwrap();
    let r = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe(r), Some(true));
}

#[tokio::test]
async fn rpcs_it_does_not_advertise_are_unimplemented() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mut grpc = tonic::client::Grpc::new(p.channel().await);
    for path in [
        "/csi.v1.Controller/ListVolumes",
        "/csi.v1.Controller/ControllerPublishVolume",
        "/csi.v1.Node/NodeGetInfo",
    ] {
        grpc.ready().await.unwrap();
        let r: Result<tonic::Response<pb::ProbeResponse>, _> = grpc
            .unary(
                tonic::Request::new(pb::ProbeRequest {}),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        assert_status(r, Code::Unimplemented, &[]);
    }
}

#[tokio::test]
async fn create_volume_refuses_bad_requests_naming_what_is_wrong() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mut c = p.controller().await;

    let mut r = create_request("", &[]);
    assert_status(c.create_volume(r).await, Code::InvalidArgument, &["name"]);

    r = create_request("pvc-1", &[]);
    r.volume_capabilities.clear();
    assert_status(
        c.create_volume(r).await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );

    r = create_request("pvc-1", &[]);
    r.volume_capabilities = vec![mount(Mode::SingleNodeWriter), block(Mode::SingleNodeWriter)];
    assert_status(c.create_volume(r).await, Code::InvalidArgument, &["block"]);

    for mode in [Mode::Unknown, Mode::MultiNodeSingleWriter] {
        r = create_request("pvc-1", &[]);
        r.volume_capabilities = vec![mount(mode)];
        assert_status(
            c.create_volume(r).await,
            Code::InvalidArgument,
            &["access mode"],
        );
    }

    for (param, value, needles) in [
        (
            "mode",
            "exclusive",
            &["\"mode\"", "shared, private, locked"][..],
        ),
        (
            "policy",
            "push-pull",
            &["\"policy\"", "pull-push, pull, push"],
        ),
        (
            "commitOn",
            "never",
            &["\"commitOn\"", "success, marker, always"],
        ),
        (
            "commit-on",
            "never",
            &["\"commit-on\"", "success, marker, always"],
        ),
        ("merge", "append", &["\"merge\"", "replace, union"]),
        ("key", "../../etc", &["\"key\"", "invalid cache key"]),
        (
            "restoreKeys",
            "main,a/b",
            &["\"restoreKeys\"", "invalid cache key"],
        ),
        ("scope", "two words", &["\"scope\"", "invalid scope"]),
        (
            "store",
            "s3://AKIA:s3cr3t@bucket/x",
            &["\"store\"", "credentials"],
        ),
        (
            "store",
            "ftp://host/x",
            &["\"store\"", "unsupported scheme"],
        ),
        (
            "storageClass",
            "x",
            &["\"storageClass\"", "unknown parameter"],
        ),
    ] {
        let r = create_request("pvc-1", &[(param, value)]);
        assert_status(c.create_volume(r).await, Code::InvalidArgument, needles);
    }

    // Without --extra-create-metadata the claim's name and namespace are unknown.
    r = create_request("pvc-1", &[]);
    r.parameters.clear();
    assert_status(
        c.create_volume(r).await,
        Code::InvalidArgument,
        &["--extra-create-metadata"],
    );

    r = create_request("pvc-1", &[]);
    r.capacity_range = Some(pb::CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    });
    assert_status(
        c.create_volume(r).await,
        Code::InvalidArgument,
        &["capacity_range"],
    );
    r = create_request("pvc-1", &[]);
    r.capacity_range = Some(pb::CapacityRange {
        required_bytes: 2 << 30,
        limit_bytes: 1 << 30,
    });
    assert_status(
        c.create_volume(r).await,
        Code::OutOfRange,
        &["capacity_range"],
    );

    r = create_request("pvc-1", &[]);
    r.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: "snap".into(),
            },
        )),
    });
    assert_status(
        c.create_volume(r).await,
        Code::InvalidArgument,
        &["volume_content_source"],
    );

    // Nothing was created by any of these.
    let r = create_request("pvc-1", &[]);
    let id = c
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    assert!(
        std::fs::read_dir(d.state().join("volumes"))
            .unwrap()
            .count()
            == 1,
        "only {id} is recorded"
    );
}

#[tokio::test]
async fn create_volume_is_idempotent_by_name() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mut c = p.controller().await;

    let sc = [
        ("scope", "namespace"),
        ("restoreKeys", "npm-main,npm-base"),
        ("mode", "shared"),
        ("commitOn", "always"),
        ("merge", "union"),
    ];
    let first = c
        .create_volume(create_request("pvc-0001", &sc))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(first.volume_id.starts_with("cv-"), "{}", first.volume_id);
    assert_eq!(first.capacity_bytes, 1 << 30);
    let want = map(&[
        ("store", &format!("file://{}", d.store().display())),
        ("scope", "team-a"),
        ("key", "npm-cache"),
        ("restore-keys", "npm-main,npm-base"),
        ("mode", "shared"),
        ("policy", "pull-push"),
        ("commit-on", "always"),
        ("merge", "union"),
        ("budget", "1073741824"),
    ]);
    assert_eq!(first.volume_context, want);

    // The CO retries: same name, same parameters → the same volume.
    let again = c
        .create_volume(create_request("pvc-0001", &sc))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, first);

    // The name reused with other parameters or another size → ALREADY_EXISTS, saying what.
    let other = [("scope", "namespace"), ("mode", "locked")];
    assert_status(
        c.create_volume(create_request("pvc-0001", &other)).await,
        Code::AlreadyExists,
        &["mode \"locked\" (was \"shared\")"],
    );
    let mut bigger = create_request("pvc-0001", &sc);
    bigger.capacity_range = Some(pb::CapacityRange {
        required_bytes: 2 << 30,
        limit_bytes: 0,
    });
    assert_status(
        c.create_volume(bigger).await,
        Code::AlreadyExists,
        &["capacity"],
    );

    // Another claim of the same cache is another volume with the same cache attributes.
    let second = c
        .create_volume(create_request("pvc-0002", &sc))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_ne!(second.volume_id, first.volume_id);
    assert_eq!(second.volume_context, first.volume_context);

    // scope: cluster and a literal scope.
    for (scope, want) in [("cluster", "cluster"), ("ci-shared", "ci-shared")] {
        let v = c
            .create_volume(create_request(&format!("pvc-{scope}"), &[("scope", scope)]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.volume_context["scope"], want);
    }

    // The secrets sent with every request never reach the log.
    let logs = p.logs();
    assert!(logs.contains("CreateVolume"), "{logs}");
    assert!(!logs.contains("s3cr3t-value-never-logged"), "{logs}");
}

#[tokio::test]
async fn delete_volume_is_idempotent_and_keeps_cache_data() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mut c = p.controller().await;

    assert_status(
        c.delete_volume(pb::DeleteVolumeRequest::default()).await,
        Code::InvalidArgument,
        &["volume_id"],
    );

    // Something a commit left in the store for this cache.
    let data = d.store().join("team-a").join("heads").join("npm-cache");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    std::fs::write(&data, b"{}").unwrap();

    let v = c
        .create_volume(create_request("pvc-del", &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let del = || pb::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: map(&[("token", "s3cr3t-value-never-logged")]),
    };
    c.delete_volume(del()).await.unwrap();
    c.delete_volume(del()).await.unwrap();
    // Ids that were never handed out, or not by cachevol, are "already deleted" too.
    for id in [
        "cv-00000000000000000000000000000000",
        "pvc-foreign",
        "../../x",
    ] {
        c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(data.exists(), "DeleteVolume must not delete cache data");

    // Forgotten: no longer validates; the name may be provisioned again (same id).
    let val = pb::ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: vec![mount(Mode::SingleNodeWriter)],
        ..Default::default()
    };
    assert_status(
        c.validate_volume_capabilities(val).await,
        Code::NotFound,
        &[&v.volume_id],
    );
    let again = c
        .create_volume(create_request("pvc-del", &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
}

#[tokio::test]
async fn validate_volume_capabilities_confirms_only_what_it_serves() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mut c = p.controller().await;
    let v = c
        .create_volume(create_request("pvc-val", &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let req = |caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_context: v.volume_context.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };

    let mut no_id = req(vec![mount(Mode::SingleNodeWriter)]);
    no_id.volume_id.clear();
    assert_status(
        c.validate_volume_capabilities(no_id).await,
        Code::InvalidArgument,
        &["volume_id"],
    );
    assert_status(
        c.validate_volume_capabilities(req(vec![])).await,
        Code::InvalidArgument,
        &["volume_capabilities"],
    );
    let mut unknown = req(vec![mount(Mode::SingleNodeWriter)]);
    unknown.volume_id = "cv-ffffffffffffffffffffffffffffffff".into();
    assert_status(
        c.validate_volume_capabilities(unknown).await,
        Code::NotFound,
        &[],
    );

    let caps = vec![
        mount(Mode::SingleNodeWriter),
        mount(Mode::MultiNodeMultiWriter),
        mount(Mode::MultiNodeReaderOnly),
        mount(Mode::SingleNodeSingleWriter),
    ];
    let ok = c
        .validate_volume_capabilities(req(caps.clone()))
        .await
        .unwrap()
        .into_inner();
    let confirmed = ok.confirmed.expect("confirmed");
    assert_eq!(confirmed.volume_capabilities, caps);
    assert_eq!(confirmed.volume_context, v.volume_context);

    for (caps, needle) in [
        (vec![block(Mode::SingleNodeWriter)], "block"),
        (
            vec![
                mount(Mode::SingleNodeWriter),
                mount(Mode::MultiNodeSingleWriter),
            ],
            "MULTI_NODE_SINGLE_WRITER",
        ),
    ] {
        let r = c
            .validate_volume_capabilities(req(caps))
            .await
            .unwrap()
            .into_inner();
        assert!(r.confirmed.is_none());
        assert!(r.message.contains(needle), "{}", r.message);
    }

    let mut wrong_ctx = req(vec![mount(Mode::SingleNodeWriter)]);
    wrong_ctx
        .volume_context
        .insert("key".into(), "other".into());
    let r = c
        .validate_volume_capabilities(wrong_ctx)
        .await
        .unwrap()
        .into_inner();
    assert!(r.confirmed.is_none());
    assert!(r.message.contains("volume_context"), "{}", r.message);
}

#[tokio::test]
async fn sigterm_drains_exits_zero_and_removes_the_socket() {
    let d = Dirs::new();
    let mut p = Plugin::start(&d);
    // A connected, idle client (as csi-provisioner keeps one) must not hold the exit up.
    let mut c = p.controller().await;
    c.controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap();
    let t = Instant::now();
    p.signal(libc::SIGTERM);
    let status = p
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running 10s after SIGTERM:\n{}", p.logs()));
    assert!(status.success(), "{status}:\n{}", p.logs());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(!p.socket.exists(), "socket left behind");
    assert!(p.logs().contains("draining"), "{}", p.logs());
    // New calls are refused once it is gone.
    assert!(std::os::unix::net::UnixStream::connect(&p.socket).is_err());
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let d = Dirs::new();
    std::fs::create_dir_all(d.socket().parent().unwrap()).unwrap();
    // A socket file left by a crashed plugin: bound once, nobody listening any more.
    drop(std::os::unix::net::UnixListener::bind(d.socket()).unwrap());
    assert!(d.socket().exists());
    let p = Plugin::start(&d);
    let mut id = p.identity().await;
    id.probe(pb::ProbeRequest {}).await.unwrap();

    // A second controller on the same endpoint must not take the live socket over.
    let mut second = Plugin {
        child: Plugin::spawn(&d),
        socket: d.socket(),
        log: d.root.join("controller.log"),
    };
    let status = second
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("second controller should exit");
    assert!(!status.success());
    assert!(
        second.logs().contains("another process is serving"),
        "{}",
        second.logs()
    );
    id.probe(pb::ProbeRequest {}).await.unwrap();
}

#[tokio::test]
async fn volume_records_survive_a_crash_and_a_restart() {
    let d = Dirs::new();
    let sc = [("mode", "locked")];
    let first = {
        let p = Plugin::start(&d);
        let mut c = p.controller().await;
        let v = c
            .create_volume(create_request("pvc-keep", &sc))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        p.signal(libc::SIGKILL);
        v
    };
    // The killed process left its socket behind; the new one removes it and serves.
    let p = Plugin::start(&d);
    let mut c = p.controller().await;
    let again = c
        .create_volume(create_request("pvc-keep", &sc))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, first);
    // The record, not only the id, survived: other parameters are still refused.
    assert_status(
        c.create_volume(create_request("pvc-keep", &[("mode", "shared")]))
            .await,
        Code::AlreadyExists,
        &["mode"],
    );
    c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
        volume_id: first.volume_id.clone(),
        volume_capabilities: vec![mount(Mode::SingleNodeWriter)],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .confirmed
    .expect("confirmed after restart");
}

/// The record files are plain JSON a person can inspect; the test keeps their layout honest.
#[tokio::test]
async fn records_are_one_json_file_per_volume_in_the_state_dir() {
    let d = Dirs::new();
    let p = Plugin::start(&d);
    let mut c = p.controller().await;
    let v = c
        .create_volume(create_request("pvc-json", &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let path: PathBuf = d
        .state()
        .join("volumes")
        .join(format!("{}.json", v.volume_id));
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(rec["name"], "pvc-json");
    assert_eq!(rec["volume_context"]["key"], "npm-cache");
    assert!(!std::fs::read_to_string(&path)
        .unwrap()
        .contains("s3cr3t-value-never-logged"));
    assert!(only_json_files(&d.state().join("volumes")));
}

fn only_json_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| e.unwrap().file_name().to_string_lossy().ends_with(".json"))
}

/// `GET path` on `addr`: the status code and body, or None while nothing listens.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// A store outage is not a dead controller: Probe (which the livenessprobe sidecar turns into
/// restarts) stays ready and answers at once, while /readyz says 503 and why, and
/// `cachevol_store_up` is 0.
#[tokio::test]
async fn a_store_outage_keeps_probe_ready_and_shows_in_readyz_and_metrics() {
    // An S3 endpoint that accepts connections and never answers.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hanging.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hanging.incoming() {
            held.push(conn);
        }
    });
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = free.local_addr().unwrap().to_string();
    drop(free);

    let d = Dirs::new();
    let log = d.root.join("controller.log");
    let child = Command::new(env!("CARGO_BIN_EXE_cachevol"))
        .arg("controller")
        .arg("--endpoint")
        .arg(format!("unix://{}", d.socket().display()))
        .args([
            "--store",
            "s3://bucket/prefix",
            "--metrics-address",
            &metrics,
        ])
        .arg("--state-dir")
        .arg(d.state())
        .env("AWS_ENDPOINT_URL", &endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let p = Plugin {
        child,
        socket: d.socket(),
        log,
    }
    .listening();

    let mut id = p.identity().await;
    let asked = Instant::now();
    let r = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(r.ready, Some(true), "{}", p.logs());
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "Probe waited for the store: {:?}",
        asked.elapsed()
    );

    // The first check gives up after its 3 s limit; /readyz says so from then on.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        match http_get(&metrics, "/readyz") {
            Some((503, body)) if body.contains("did not answer") => break body,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "/readyz: {other:?}\n{}",
                    p.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(body.contains("s3://bucket/prefix"), "{body}");
    let (status, text) = http_get(&metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        text.lines().any(|l| l == "cachevol_store_up 0"),
        "{}",
        text.lines()
            .filter(|l| l.contains("store_up"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(http_get(&metrics, "/healthz").unwrap().0, 200);
    let r = id.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(r.ready, Some(true), "{}", p.logs());
}
