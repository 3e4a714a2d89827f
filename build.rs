//! Generates the CSI messages and the tonic services from `proto/csi.proto`.
//!
//! The .proto is parsed by protox, a protobuf compiler written in Rust, so building cachevol
//! needs no `protoc` on the machine (or in the Dockerfile); its descriptor set goes to
//! tonic-prost-build, which writes the Rust code into OUT_DIR.

/// Messages that carry secrets or mount flags: their `Debug` is written by hand in
/// `src/csi/redact.rs` so that printing a request can never print a credential.
const REDACTED_DEBUG: &[&str] = &[
    ".csi.v1.CreateVolumeRequest",
    ".csi.v1.DeleteVolumeRequest",
    ".csi.v1.ValidateVolumeCapabilitiesRequest",
    ".csi.v1.NodeStageVolumeRequest",
    ".csi.v1.NodePublishVolumeRequest",
    ".csi.v1.VolumeCapability.MountVolume",
];

fn main() {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    commit();
    let fds = protox::compile(["csi.proto"], ["proto"]).unwrap_or_else(|e| {
        panic!("proto/csi.proto does not compile: {e}");
    });
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .skip_debug(REDACTED_DEBUG.iter().copied())
        .compile_fds(fds)
        .expect("generate the CSI code");
}

/// Sets `CACHEVOL_COMMIT` for `cachevol --version`: `$CACHEVOL_COMMIT` when the build sets it
/// (an image built without `.git`), else `git rev-parse --short HEAD`, else "unknown" (a
/// source tarball, no git): the build never needs git.
fn commit() {
    println!("cargo:rerun-if-env-changed=CACHEVOL_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = std::env::var("CACHEVOL_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Built again when HEAD moves (a commit, a checkout).
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--symbolic-full-name", "HEAD"])
            .and_then(|r| git(&["rev-parse", "--git-path", &r])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=CACHEVOL_COMMIT={commit}");
}
