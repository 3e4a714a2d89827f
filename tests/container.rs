//! The image as it ships: the OCI archive that `make image` wrote (`CACHEVOL_TEST_IMAGE`, set by
//! .ci/run), unpacked layer by layer and run with runc, never the binary under target/. Each
//! component runs with the privileges the chart gives it:
//!
//! - the node plugin as root with every capability and the host's /dev (the DaemonSet's
//!   `privileged: true`), and a host dir on a shared mount bound with shared propagation (the
//!   chart's Bidirectional kubelet and state dirs): the pods' targets it mounts are seen from
//!   the host;
//! - the controller as uid 65532 with a read-only root file system, no capabilities and
//!   no_new_privs, writing only to its socket and state dirs (the chart's emptyDirs);
//! - the CLI: `--version` names the commit the image was built from, commit and restore
//!   round-trip through a file:// store.
//!
//! The OCI configs set no rlimits: a container here may not raise them, and runc would fail
//! with "error setting rlimits". No network namespace: the tests reach /metrics on 127.0.0.1.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use cachevol::csi::pb;
use cachevol::csi::pb::controller_client::ControllerClient;
use cachevol::csi::pb::identity_client::IdentityClient;
use cachevol::csi::pb::node_client::NodeClient;
use cachevol::csi::pb::volume_capability::{access_mode::Mode, AccessMode, AccessType};
use cachevol::engine::{Engine, Store};

/// The user the chart runs the controller as (distroless' nonroot, in the image's /etc/passwd).
const NONROOT: u32 = 65532;

/// What the issue allows the image to weigh, uncompressed.
const MAX_IMAGE_BYTES: u64 = 40 << 20;

/// The archive to test, or `None` (the test skips) when `CACHEVOL_TEST_IMAGE` is unset outside
/// CI. Under CI it must be set and runc must be there: a smoke test that skips proves nothing.
fn archive(test: &str) -> Option<PathBuf> {
    let runc = Command::new("runc")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let path = common::required(
        test,
        common::env_nonempty("CACHEVOL_TEST_IMAGE").filter(|_| runc),
        "CACHEVOL_TEST_IMAGE is not set, or runc is missing",
        common::Provider::CiRun(
            "set CACHEVOL_TEST_IMAGE=target/image/cachevol.tar (make image) and install runc; \
             .ci/run does both",
        ),
    )?;
    Some(PathBuf::from(path))
}

/// The archive unpacked into a temp dir of the test's own (`image/` in it), or `None` when the
/// test skips.
fn unpacked(test: &str) -> Option<(tempfile::TempDir, Image)> {
    let archive = archive(test)?;
    let tmp = tempfile::tempdir().unwrap();
    let image = Image::unpack(&archive, &tmp.path().join("image"));
    Some((tmp, image))
}

/// Every file under `dir`, its subdirectories' included.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

/// An image unpacked into a runc bundle's root file system, with its config.
struct Image {
    rootfs: PathBuf,
    config: Value,
    uncompressed: u64,
}

impl Image {
    /// Unpacks `archive` (an OCI archive: index.json, blobs/) into `dir/rootfs`.
    fn unpack(archive: &Path, dir: &Path) -> Image {
        let layout = dir.join("layout");
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&layout).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(archive)
                .arg("-C")
                .arg(&layout),
        );
        let blob = |digest: &str| layout.join("blobs").join(digest.replacen(':', "/", 1));
        let read = |digest: &str| -> Value {
            serde_json::from_slice(&std::fs::read(blob(digest)).unwrap()).unwrap()
        };
        let index: Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
        let manifest = read(manifests[0]["digest"].as_str().unwrap());
        let config = read(manifest["config"]["digest"].as_str().unwrap());
        let mut uncompressed = 0;
        for layer in manifest["layers"].as_array().unwrap() {
            let path = blob(layer["digest"].as_str().unwrap());
            let gzip = layer["mediaType"].as_str().unwrap().ends_with("+gzip");
            // The image's layers hold no whiteouts (nothing is deleted on top of the base), so
            // unpacking is extracting each layer in order.
            let listing = run_ok(
                Command::new("tar")
                    .arg(if gzip { "-tzf" } else { "-tf" })
                    .arg(&path),
            );
            assert!(!listing.contains(".wh."), "a whiteout in {path:?}");
            run_ok(
                Command::new("tar")
                    .arg(if gzip { "-xzf" } else { "-xf" })
                    .arg(&path)
                    .arg("-C")
                    .arg(&rootfs),
            );
            uncompressed += if gzip {
                let mut child = Command::new("gzip")
                    .arg("-dc")
                    .arg(&path)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let n =
                    std::io::copy(&mut child.stdout.take().unwrap(), &mut std::io::sink()).unwrap();
                assert!(child.wait().unwrap().success());
                n
            } else {
                std::fs::metadata(&path).unwrap().len()
            };
        }
        Image {
            rootfs,
            config,
            uncompressed,
        }
    }

    fn label(&self, name: &str) -> &str {
        self.config["config"]["Labels"][name]
            .as_str()
            .unwrap_or_else(|| panic!("no label {name}: {}", self.config))
    }

    /// The entrypoint and `args`, as a container runtime would start them.
    fn argv(&self, args: &[String]) -> Vec<String> {
        let mut argv: Vec<String> = self.config["config"]["Entrypoint"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        argv.extend(args.iter().cloned());
        argv
    }

    fn env(&self) -> Vec<String> {
        let mut env: Vec<String> = self.config["config"]["Env"]
            .as_array()
            .map(|e| e.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        env.push("CACHEVOL_LOG=debug".into());
        env
    }
}

/// How a container runs: the pod spec's security settings and volumes, as OCI runtime config.
struct Run {
    args: Vec<String>,
    uid: u32,
    privileged: bool,
    read_only_root: bool,
    /// (host path, container path, shared propagation)
    binds: Vec<(PathBuf, PathBuf, bool)>,
}

impl Run {
    fn new(args: &[&str]) -> Run {
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            uid: 0,
            privileged: false,
            read_only_root: false,
            binds: Vec::new(),
        }
    }

    fn bind(mut self, host: &Path, container: &Path, shared: bool) -> Run {
        self.binds.push((host.into(), container.into(), shared));
        self
    }

    /// The OCI runtime config: what containerd would write for such a pod, minus rlimits.
    fn config(&self, image: &Image) -> Value {
        let caps: Vec<&str> = if self.privileged {
            privileged_caps()
        } else {
            vec![]
        };
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        ];
        if self.privileged {
            // Privileged: the host's devices (loop, fuse) and a writable /sys.
            mounts.insert(
                1,
                json!({"destination": "/dev", "type": "bind", "source": "/dev",
                                    "options": ["rbind", "rw"]}),
            );
            mounts.push(
                json!({"destination": "/sys", "type": "bind", "source": "/sys",
                               "options": ["rbind", "rw"]}),
            );
        } else {
            mounts.insert(1, json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                                    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}));
            mounts.push(
                json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                               "options": ["nosuid", "noexec", "nodev", "ro"]}),
            );
        }
        for (host, container, shared) in &self.binds {
            let propagation = if *shared { "rshared" } else { "rprivate" };
            mounts.push(
                json!({"destination": container, "type": "bind", "source": host,
                               "options": ["rbind", "rw", propagation]}),
            );
        }
        let mut linux = json!({
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "resources": {"devices": [{"allow": self.privileged, "access": "rwm"}]},
        });
        if self.binds.iter().any(|b| b.2) {
            // containerd's rule for a Bidirectional mount: the container's root is rshared too,
            // so that mounts under the bind reach the host.
            linux["rootfsPropagation"] = json!("rshared");
        }
        if !self.privileged {
            linux["maskedPaths"] = json!([
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware"
            ]);
            linux["readonlyPaths"] = json!([
                "/proc/asound",
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger"
            ]);
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": self.uid, "gid": self.uid},
                "args": image.argv(&self.args),
                "env": image.env(),
                "cwd": "/",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": !self.privileged,
            },
            "root": {"path": image.rootfs, "readonly": self.read_only_root},
            "hostname": "cachevol",
            "mounts": mounts,
            "linux": linux,
        })
    }
}

/// The capabilities a privileged container gets: every one the runtime has itself (its
/// bounding set; a sandbox may lack some), as containerd gives.
fn privileged_caps() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    CAPS.iter()
        .enumerate()
        .filter(|(bit, _)| bounding & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Linux's capabilities, in the order of their numbers.
const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
];

/// A container started with `runc run` in a bundle of its own; killed and deleted on drop.
struct Container {
    id: String,
    child: Child,
    log: PathBuf,
}

impl Container {
    fn start(image: &Image, bundle: &Path, run: &Run) -> Container {
        std::fs::create_dir_all(bundle).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&run.config(image)).unwrap(),
        )
        .unwrap();
        let id = format!("cachevol-smoke-{}", common::unique());
        let log = bundle.join("container.log");
        let child = Command::new("runc")
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("runc run");
        Container { id, child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs to its end: (success, stdout, stderr).
    fn output(mut self) -> (bool, String, String) {
        let mut stdout = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        let ok = self.child.wait().unwrap().success();
        (ok, stdout, self.logs())
    }

    /// Waits until `socket` accepts connections, failing with the logs if the container exits.
    fn wait_socket(&mut self, socket: &Path) {
        common::wait_for_socket(
            "the container",
            &mut self.child,
            socket,
            &self.log,
            Duration::from_secs(30),
        );
    }

    /// SIGTERM (what kubelet sends), then waits for the exit.
    fn stop(&mut self) -> bool {
        let _ = Command::new("runc")
            .args(["kill", &self.id, "TERM"])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host dir that is a shared mount of its own, as a systemd host's / is: what a
/// Bidirectional hostPath needs. Unmounted (with what is under it) on drop.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(path: &Path) -> SharedDir {
        std::fs::create_dir_all(path).unwrap();
        run_ok(Command::new("mount").arg("--bind").arg(path).arg(path));
        let dir = SharedDir(path.into());
        run_ok(Command::new("mount").arg("--make-rshared").arg(path));
        dir
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = cachevol::node::mount::unmount_all_under(&self.0.join("state"));
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET `path` on 127.0.0.1:`port`: (status code, body). Retries while the server starts.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "127.0.0.1:{port}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}

fn mount_capability() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(
            pb::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_image_is_small_stripped_and_labelled() {
    let Some((_tmp, image)) = unpacked("the_image_is_small_stripped_and_labelled") else {
        return;
    };
    assert!(
        image.uncompressed <= MAX_IMAGE_BYTES,
        "the image weighs {} bytes uncompressed, over {MAX_IMAGE_BYTES}",
        image.uncompressed
    );
    let binary = image.rootfs.join("usr/local/bin/cachevol");
    let sections = run_ok(Command::new("readelf").arg("-S").arg("-W").arg(&binary));
    // (.debug_gdb_scripts is not debug info: it is loaded, and names Rust's gdb helpers.)
    for debug in [".debug_info", ".debug_line"] {
        assert!(
            !sections.contains(debug),
            "the shipped binary has {debug}:\n{sections}"
        );
    }
    assert!(
        sections.contains(".gnu_debuglink"),
        "no debuglink to the split debug info"
    );
    // No test machinery ships (Cargo.toml's features, off in hack/image.sh's build): neither
    // the CACHEVOL_FAULT crash points nor the benchmark (its hidden wrapper command, the help
    // line of `cachevol bench`). A build with the features has each string.
    let bytes = std::fs::read(&binary).unwrap();
    for machinery in [
        "CACHEVOL_FAULT",
        "__bench-child",
        "against tar+zstd on real trees",
    ] {
        let needle = machinery.as_bytes();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the shipped binary carries test machinery: {machinery:?}"
        );
    }
    // Nothing but the binary, glibc, libgcc and the CA bundle: no shell, no package manager.
    for absent in ["bin/sh", "usr/bin/sh", "usr/bin/apt-get", "usr/bin/dpkg"] {
        assert!(
            !image.rootfs.join(absent).exists(),
            "{absent} is in the image"
        );
    }
    assert!(image
        .rootfs
        .join("etc/ssl/certs/ca-certificates.crt")
        .is_file());
    assert_eq!(
        image.label("org.opencontainers.image.version"),
        env!("CARGO_PKG_VERSION")
    );
    assert!(image
        .label("org.opencontainers.image.source")
        .starts_with("https://"));
    // created is the commit's time (reproducible builds), in RFC 3339.
    let created = image.label("org.opencontainers.image.created");
    assert_eq!(created, image.config["created"].as_str().unwrap());
    humantime::parse_rfc3339(created).unwrap();
}

#[test]
fn the_cli_names_its_commit_and_round_trips_a_tree() {
    let Some((tmp, image)) = unpacked("the_cli_names_its_commit_and_round_trips_a_tree") else {
        return;
    };
    let t = tmp.path();

    // --version names the commit of the image's revision label: the binary in the image is
    // the one built from the commit the image says.
    let (ok, stdout, stderr) =
        Container::start(&image, &t.join("b-version"), &Run::new(&["--version"])).output();
    assert!(ok, "{stderr}");
    let revision = image.label("org.opencontainers.image.revision");
    let named = stdout
        .trim()
        .strip_prefix(&format!("cachevol {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("--version printed {stdout:?}"));
    let (named_commit, revision_commit) = (
        named.trim_end_matches("-dirty"),
        revision.trim_end_matches("-dirty"),
    );
    assert!(
        named_commit.len() >= 7 && revision_commit.starts_with(named_commit),
        "--version names {named}, the image's revision is {revision}"
    );
    assert_eq!(named.ends_with("-dirty"), revision.ends_with("-dirty"));
    // The image was built from this checkout (CI builds it from the commit under test).
    if let Ok(out) = Command::new("git").args(["rev-parse", "HEAD"]).output() {
        let head = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !head.is_empty() {
            assert_eq!(revision_commit, head, "the image is not of this checkout");
        }
    }

    // commit then restore through a file:// store on a host dir, on a read-only root.
    let host = t.join("host");
    let (src, dst) = (host.join("src"), host.join("dst"));
    common::make_rich_tree(&src, 7);
    let store = format!("file://{}", host.join("store").display());
    let state = host.join("state").display().to_string();
    for (name, args) in [
        ("b-commit", vec!["commit", "npm", src.to_str().unwrap()]),
        ("b-restore", vec!["restore", "npm", dst.to_str().unwrap()]),
    ] {
        let mut run = Run::new(&[&["--store", &store, "--state-dir", &state], &args[..]].concat())
            .bind(&host, &host, false);
        run.read_only_root = true;
        let (ok, stdout, stderr) = Container::start(&image, &t.join(name), &run).output();
        assert!(ok, "{args:?}: {stdout}\n{stderr}");
    }
    common::assert_trees_equal(&src, &dst);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_runs_as_nonroot_on_a_read_only_root() {
    let Some((tmp, image)) = unpacked("the_controller_runs_as_nonroot_on_a_read_only_root") else {
        return;
    };
    let t = tmp.path();
    // The chart's emptyDirs: the socket dir and the state dir, writable by 65532 (fsGroup).
    let (socket_dir, state) = (t.join("csi"), t.join("state"));
    for dir in [&socket_dir, &state] {
        std::fs::create_dir_all(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(NONROOT), Some(NONROOT)).unwrap();
    }
    let port = common::free_port();
    let metrics = format!("--metrics-address=127.0.0.1:{port}");
    let mut run = Run::new(&[
        "controller",
        "--endpoint=unix:///csi/csi.sock",
        "--state-dir=/var/lib/cachevol-controller",
        "--store=file:///var/lib/cachevol-controller/store",
        "--cluster=off",
        &metrics,
    ])
    .bind(&socket_dir, Path::new("/csi"), false)
    .bind(&state, Path::new("/var/lib/cachevol-controller"), false);
    run.uid = NONROOT;
    run.read_only_root = true;
    let mut controller = Container::start(&image, &t.join("bundle"), &run);
    let socket = socket_dir.join("csi.sock");
    controller.wait_socket(&socket);

    let channel = common::dial_unix(&socket).await;
    let probe = IdentityClient::new(channel.clone())
        .probe(pb::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true), "{}", controller.logs());
    let created = ControllerClient::new(channel)
        .create_volume(pb::CreateVolumeRequest {
            name: "pvc-0b7e".into(),
            volume_capabilities: vec![mount_capability()],
            parameters: map(&[
                ("csi.storage.k8s.io/pvc/name", "npm-cache"),
                ("csi.storage.k8s.io/pvc/namespace", "team-a"),
                ("csi.storage.k8s.io/pv/name", "pvc-0b7e"),
            ]),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateVolume: {e}\n{}", controller.logs()))
        .into_inner();
    let volume = created.volume.unwrap();
    assert!(!volume.volume_id.is_empty());
    assert_eq!(
        volume.volume_context.get("key").map(String::as_str),
        Some("npm-cache")
    );

    let (code, body) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("cachevol_"), "no cachevol metrics:\n{body}");
    let (code, body) = tokio::task::spawn_blocking(move || http_get(port, "/readyz"))
        .await
        .unwrap();
    assert_eq!(code, 200, "/readyz: {body}\n{}", controller.logs());
    // It wrote its socket and its volume record as 65532, into the dirs it was given.
    let uid = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
    assert_eq!(uid(&socket), NONROOT);
    let written: Vec<PathBuf> = walk(&state);
    assert!(!written.is_empty(), "nothing in the state dir");
    for p in &written {
        assert_eq!(uid(p), NONROOT, "{p:?}");
    }
    assert!(controller.stop(), "{}", controller.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_plugin_mounts_for_the_host_from_the_image() {
    let Some((tmp, image)) = unpacked("the_node_plugin_mounts_for_the_host_from_the_image") else {
        return;
    };
    let t = tmp.path();
    // One host dir holds kubelet's pod dirs, the plugin's state dir, its socket and the store,
    // bound at the same path (as the chart binds kubeletDir and stateDir).
    let host = SharedDir::new(&t.join("host"));
    let h = host.0.clone();
    let socket = h.join("plugins/cachevol.dev/csi.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let store = format!("file://{}", h.join("store").display());
    let endpoint = format!("--endpoint=unix://{}", socket.display());
    let state = format!("--state-dir={}", h.join("state").display());
    let store_flag = format!("--store={store}");
    let mut run = Run::new(&[
        "node",
        &endpoint,
        "--node-id=n1",
        &state,
        &store_flag,
        "--cluster=off",
    ])
    .bind(&h, &h, true);
    run.privileged = true;
    let mut node = Container::start(&image, &t.join("bundle"), &run);
    node.wait_socket(&socket);

    let channel = common::dial_unix(&socket).await;
    let mut identity = IdentityClient::new(channel.clone());
    assert_eq!(
        identity
            .probe(pb::ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    let info = identity
        .get_plugin_info(pb::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "cachevol.dev");
    let mut client = NodeClient::new(channel);
    let node_info = client
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "n1");

    let context = |pod: &str| {
        map(&[
            ("scope", "team-a"),
            ("key", "cargo"),
            ("mode", "private"),
            ("csi.storage.k8s.io/pod.name", pod),
            ("csi.storage.k8s.io/pod.namespace", "ci"),
            ("csi.storage.k8s.io/pod.uid", &format!("uid-{pod}")),
        ])
    };
    let target = |pod: &str| {
        h.join(format!(
            "pods/uid-{pod}/volumes/kubernetes.io~csi/pv-1/mount"
        ))
    };
    let publish = |pod: &str| pb::NodePublishVolumeRequest {
        volume_id: "cv-1".into(),
        target_path: target(pod).display().to_string(),
        volume_capability: Some(mount_capability()),
        volume_context: context(pod),
        ..Default::default()
    };
    let unpublish = |pod: &str| pb::NodeUnpublishVolumeRequest {
        volume_id: "cv-1".into(),
        target_path: target(pod).display().to_string(),
    };

    // The mount the plugin made in its container is the host's: the pod (here, the test)
    // writes into it from outside.
    client
        .node_publish_volume(publish("a"))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}\n{}", node.logs()));
    assert!(
        cachevol::node::mount::is_mount_point(&target("a")).unwrap(),
        "the target is not mounted on the host: is propagation shared?\n{}",
        node.logs()
    );
    common::write(&target("a").join("registry/index.json"), b"{\"crates\":1}");
    client.node_unpublish_volume(unpublish("a")).await.unwrap();
    assert!(!cachevol::node::mount::is_mount_point(&target("a")).unwrap());

    // Unpublished without a cluster: committed as generation 1 of the store.
    let engine_state = tempfile::tempdir().unwrap();
    let engine = Engine::new(Store::open(&store).unwrap(), "team-a", engine_state.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.newest("cargo").await.unwrap() != Some(1) {
        assert!(Instant::now() < deadline, "no commit:\n{}", node.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The next pod starts from it.
    client.node_publish_volume(publish("b")).await.unwrap();
    assert_eq!(
        std::fs::read(target("b").join("registry/index.json")).unwrap(),
        b"{\"crates\":1}"
    );
    client.node_unpublish_volume(unpublish("b")).await.unwrap();
    drop(client);
    assert!(node.stop(), "{}", node.logs());
}
