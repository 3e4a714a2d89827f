//! A cloud store without credentials is one clear error for every provider: "no credentials
//! found for s3:// | gs:// | az://", what to set, exit 6 — never a raw 403 from a metadata
//! server or "Account must be specified". No request goes to a real metadata address: the
//! metadata endpoints point at a stand-in on 127.0.0.1 that refuses (as off-cloud behind a
//! proxy), or instance metadata is turned off and nothing is asked at all.

use std::io::{Read, Write};
use std::process::Command;

/// Every variable through which a credential or an endpoint could reach the binary.
const CLEARED: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_SKIP_SIGNATURE",
    "AWS_PROFILE",
    "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "NO_GCE_CHECK",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_TOKEN",
    "AZURE_STORAGE_USE_EMULATOR",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURITE_BLOB_STORAGE_URL",
    "CACHEVOL_STORE",
    "CACHEVOL_INSTANCE_METADATA",
];

/// A metadata server stand-in that answers every request with 403 and counts them.
fn refusing_metadata() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    (port, seen)
}

/// `cachevol --store URL ls` with a clean environment plus `env`: exit code and stderr.
fn ls(url: &str, env: &[(&str, String)]) -> (Option<i32>, String) {
    let state = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_cachevol"));
    for v in CLEARED {
        c.env_remove(v);
    }
    // The HOME of this test: no gcloud application default credentials in it.
    c.env("HOME", state.path());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .args(["--store", url, "--state-dir"])
        .arg(state.path().join("st"))
        .arg("ls")
        .env("CACHEVOL_STORE_TIMEOUT", "30")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_credentials(what: &str, got: (Option<i32>, String), scheme: &str, hint: &str) {
    let (code, stderr) = got;
    assert_eq!(code, Some(6), "{what}: {stderr}");
    assert!(
        stderr.contains(&format!("no credentials found for {scheme}://")),
        "{what}: {stderr}"
    );
    assert!(stderr.contains(hint), "{what}: {stderr}");
    assert!(
        !stderr.contains("403"),
        "{what}: a raw HTTP status: {stderr}"
    );
}

#[test]
fn every_cloud_store_without_credentials_says_so_and_what_to_set() {
    let (port, seen) = refusing_metadata();
    let local = format!("127.0.0.1:{port}");
    let s3_env = vec![
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_METADATA_ENDPOINT", format!("http://{local}")),
    ];
    let gs_env = vec![
        ("GCE_METADATA_HOST", local.clone()),
        ("GCE_METADATA_IP", local.clone()),
    ];
    let az_env = vec![
        ("AZURE_STORAGE_ACCOUNT_NAME", "devstore".to_string()),
        (
            "IDENTITY_ENDPOINT",
            format!("http://{local}/metadata/identity/oauth2/token"),
        ),
    ];
    let cases = [
        ("s3", "s3://bucket/p", &s3_env, "AWS_ACCESS_KEY_ID"),
        (
            "gs",
            "gs://bucket/p",
            &gs_env,
            "GOOGLE_APPLICATION_CREDENTIALS",
        ),
        (
            "az",
            "az://container/p",
            &az_env,
            "AZURE_STORAGE_ACCOUNT_KEY",
        ),
    ];
    for (scheme, url, env, hint) in cases {
        let before = seen.load(std::sync::atomic::Ordering::SeqCst);
        assert_no_credentials(scheme, ls(url, env), scheme, hint);
        assert!(
            seen.load(std::sync::atomic::Ordering::SeqCst) > before,
            "{scheme}: the metadata stand-in was never asked"
        );
        // With instance metadata turned off, the same error comes without any request.
        let mut off = env.clone();
        off.push(("CACHEVOL_INSTANCE_METADATA", "off".to_string()));
        let before = seen.load(std::sync::atomic::Ordering::SeqCst);
        assert_no_credentials(
            &format!("{scheme}, metadata off"),
            ls(url, &off),
            scheme,
            hint,
        );
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            before,
            "{scheme}: asked the metadata service although it is off"
        );
    }
    // Azure without an account at all: the same error, not "Account must be specified".
    assert_no_credentials(
        "az without an account",
        ls("az://container/p", &[]),
        "az",
        "AZURE_STORAGE_ACCOUNT_NAME",
    );
    // The providers' own switches: AWS_EC2_METADATA_DISABLED, NO_GCE_CHECK.
    let mut aws_off = s3_env.clone();
    aws_off.push(("AWS_EC2_METADATA_DISABLED", "true".into()));
    assert_no_credentials(
        "s3, EC2 metadata disabled",
        ls("s3://b/p", &aws_off),
        "s3",
        "AWS_",
    );
    let mut gce_off = gs_env.clone();
    gce_off.push(("NO_GCE_CHECK", "True".into()));
    assert_no_credentials(
        "gs, NO_GCE_CHECK",
        ls("gs://b/p", &gce_off),
        "gs",
        "GOOGLE_",
    );
}
