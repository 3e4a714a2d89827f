//! Serving CSI services on a unix socket the way kubelet and the sidecars expect: the endpoint
//! given as `unix:///path/csi.sock`, a stale socket from a previous run removed, the socket
//! created with mode 0660 (never world-connectable, not even for an instant), and on SIGTERM or
//! SIGINT a graceful drain: stop accepting, let in-flight RPCs finish, remove the socket, return.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;

use super::Error;
use crate::engine;

/// Mode of the socket file: the plugin's user and group may connect, nobody else.
pub const SOCKET_MODE: u32 = 0o660;
/// How long in-flight RPCs may take to finish after a termination signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses a CSI endpoint: `unix:///abs/path`, `unix:/abs/path` or a bare absolute path (both
/// forms are used by the kubernetes-csi sidecars).
pub fn parse_endpoint(endpoint: &str) -> Result<PathBuf, Error> {
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if endpoint.contains("://") {
        return Err(Error::invalid(
            "endpoint",
            format!("{endpoint:?}: only unix sockets are served (unix:///path/csi.sock)"),
        ));
    } else {
        endpoint
    };
    if !path.starts_with('/') {
        return Err(Error::invalid(
            "endpoint",
            format!("{endpoint:?}: the socket path must be absolute (unix:///path/csi.sock)"),
        ));
    }
    Ok(PathBuf::from(path))
}

/// A bound socket; the file is removed when this is dropped, if it is still ours.
pub struct Socket {
    path: PathBuf,
    listener: Option<UnixListener>,
    identity: (u64, u64),
}

impl Socket {
    /// Binds `path` with mode 0660. A socket file nobody answers on (left by a crashed run) is
    /// removed first; a live one, or a file that is not a socket, is an error.
    pub fn bind(path: &Path) -> Result<Socket, Error> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(engine::io("create socket directory", dir))?;
        remove_stale(path)?;
        // Bind under a temporary name, set the mode, then rename into place: the socket is
        // never visible at `path` with the umask's mode.
        let tmp = dir.join(format!(".csi-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(engine::io("bind", &tmp))?;
        let setup = || -> io::Result<()> {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = setup() {
            let _ = std::fs::remove_file(&tmp);
            return Err(engine::IoError::new("set up socket", path, e).into());
        }
        let meta = std::fs::metadata(path).map_err(engine::io("stat", path))?;
        Ok(Socket {
            path: path.to_path_buf(),
            listener: Some(listener),
            identity: (meta.dev(), meta.ino()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take_listener(&mut self) -> UnixListener {
        self.listener.take().expect("listener taken once")
    }

    /// Removes the socket file unless another process has replaced it since.
    fn remove(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.remove();
    }
}

fn remove_stale(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(engine::IoError::new("stat", path, e).into()),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::invalid(
            "endpoint",
            format!(
                "{} exists and is not a socket; not removing it",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::invalid(
            "endpoint",
            format!("another process is serving on {}", path.display()),
        ));
    }
    tracing::info!(socket = %path.display(), "removing stale socket");
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(engine::IoError::new("remove stale socket", path, e).into()),
    }
}

/// Serves `router` on `socket` until SIGTERM or SIGINT, then drains: the listener closes at once,
/// in-flight RPCs get up to [`DRAIN_TIMEOUT`] to finish, and the socket file is removed.
pub async fn serve(socket: Socket, router: Router) -> Result<(), Error> {
    // Registered before serving, so a signal that comes early is not lost.
    let mut term = signal(SignalKind::terminate()).map_err(engine::io("watch", "SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(engine::io("watch", "SIGINT"))?;
    let signalled = async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    };
    serve_until(socket, router, signalled, DRAIN_TIMEOUT).await
}

/// Serves until `stop` completes (with a reason for the log), then drains as [`serve`] does,
/// waiting at most `drain` for in-flight RPCs.
pub async fn serve_until(
    mut socket: Socket,
    router: Router,
    stop: impl std::future::Future<Output = &'static str>,
    drain: Duration,
) -> Result<(), Error> {
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let why = stop.await;
        tracing::info!(
            signal = why,
            "draining: no new connections, waiting for in-flight calls"
        );
        let _ = draining_tx.send(());
    };
    let incoming = UnixListenerStream::new(socket.take_listener());
    tracing::info!(socket = %socket.path().display(), "serving");
    let server = router.serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(server);
    let deadline = async {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = &mut server => r.map_err(|e| engine::IoError::other("serve", socket.path(), e).into()),
        _ = deadline => {
            tracing::warn!(
                timeout_s = drain.as_secs(),
                "in-flight calls did not finish in time; exiting anyway"
            );
            Ok(())
        }
    };
    socket.remove();
    tracing::info!("stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_the_sidecars_write_them() {
        for (e, p) in [
            ("unix:///csi/csi.sock", "/csi/csi.sock"),
            ("unix:/csi/csi.sock", "/csi/csi.sock"),
            (
                "/var/lib/kubelet/plugins/cachevol.dev/csi.sock",
                "/var/lib/kubelet/plugins/cachevol.dev/csi.sock",
            ),
        ] {
            assert_eq!(parse_endpoint(e).unwrap(), PathBuf::from(p), "{e}");
        }
        for bad in ["tcp://127.0.0.1:10000", "unix://csi.sock", "csi.sock", ""] {
            let err = parse_endpoint(bad).unwrap_err().to_string();
            assert!(err.starts_with("endpoint:"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn bind_sets_the_mode_and_refuses_what_it_must_not_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("csi.sock");
        let s = Socket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        // Live: a second plugin must not steal the socket.
        let e = Socket::bind(&path).err().expect("live socket");
        assert!(e.to_string().contains("another process"), "{e}");
        drop(s);
        assert!(!path.exists());
        // Not a socket: never removed.
        std::fs::write(&path, b"data").unwrap();
        let e = Socket::bind(&path).err().expect("regular file");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    /// An Identity whose Probe takes a while, to have a call in flight during shutdown.
    struct SlowProbe;

    #[tonic::async_trait]
    impl crate::csi::pb::identity_server::Identity for SlowProbe {
        async fn get_plugin_info(
            &self,
            _: tonic::Request<crate::csi::pb::GetPluginInfoRequest>,
        ) -> Result<tonic::Response<crate::csi::pb::GetPluginInfoResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn get_plugin_capabilities(
            &self,
            _: tonic::Request<crate::csi::pb::GetPluginCapabilitiesRequest>,
        ) -> Result<tonic::Response<crate::csi::pb::GetPluginCapabilitiesResponse>, tonic::Status>
        {
            Err(tonic::Status::unimplemented("test"))
        }
        async fn probe(
            &self,
            _: tonic::Request<crate::csi::pb::ProbeRequest>,
        ) -> Result<tonic::Response<crate::csi::pb::ProbeResponse>, tonic::Status> {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok(tonic::Response::new(crate::csi::pb::ProbeResponse {
                ready: Some(true),
            }))
        }
    }

    async fn dial(
        path: PathBuf,
    ) -> crate::csi::pb::identity_client::IdentityClient<tonic::transport::Channel> {
        let ch = tonic::transport::Endpoint::try_from("http://[::1]:1")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        crate::csi::pb::identity_client::IdentityClient::new(ch)
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_calls_finish_and_refuses_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let socket = Socket::bind(&path).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let router = tonic::transport::Server::builder().add_service(
            crate::csi::pb::identity_server::IdentityServer::new(SlowProbe),
        );
        let server = tokio::spawn(serve_until(
            socket,
            router,
            async move {
                let _ = stop_rx.await;
                "test"
            },
            Duration::from_secs(10),
        ));
        let mut client = dial(path.clone()).await;
        let call = tokio::spawn(async move { client.probe(crate::csi::pb::ProbeRequest {}).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Not accepting any more, while the first call is still running.
        assert!(!call.is_finished());
        assert!(tokio::net::UnixStream::connect(&path).await.is_err());
        let answer = call.await.unwrap().expect("the in-flight call completes");
        assert_eq!(answer.into_inner().ready, Some(true));
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server returns once drained")
            .unwrap()
            .unwrap();
        assert!(!path.exists());
    }
}
