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
