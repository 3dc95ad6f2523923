//! `hubbub healthcheck`: asks a running server for `/healthz`.
//!
//! Container images built `FROM scratch` or distroless have no shell or curl,
//! so the binary checks itself. It resolves its settings the same way the
//! server does, so `HUBBUB_HTTP_PORT` and `--config` point it at the right port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("HTTP error talking to {0}: {1}")]
    Http(SocketAddr, hyper::Error),
    #[error("{0}/healthz answered {1}")]
    Status(SocketAddr, StatusCode),
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("TLS handshake with {0} failed: {1}")]
    Handshake(SocketAddr, std::io::Error),
}

/// Where a local client reaches the HTTP listener: an unspecified bind
/// address (0.0.0.0 in a container) is reached through loopback.
pub fn target(config: &Config) -> SocketAddr {
    let ip = match config.host {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, config.http_port)
}

/// GETs `/healthz` and succeeds only on 200. With `tls_cert` set it speaks
/// TLS and trusts exactly that certificate (it names the public host, not
/// the loopback address the check connects to).
pub async fn check(config: &Config, limit: Duration) -> Result<(), HealthError> {
    let addr = target(config);
    let pinned = match &config.tls_cert {
        Some(cert) => Some(crate::tls::pinned_client(cert)?),
        None => None,
    };
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| HealthError::Connect(addr, e))?;
        match pinned {
            None => get_healthz(addr, stream).await,
            Some(client) => {
                let name = rustls_pki_types::ServerName::try_from("localhost")
                    .map_err(|e| HealthError::Handshake(addr, std::io::Error::other(e)))?;
                let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
                    .connect(name, stream)
                    .await
                    .map_err(|e| HealthError::Handshake(addr, e))?;
                get_healthz(addr, tls).await
            }
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| HealthError::Timeout(addr, limit))?
}

async fn get_healthz<IO>(addr: SocketAddr, io: IO) -> Result<(), HealthError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| HealthError::Http(addr, e))?;
    tokio::spawn(conn);
    let req = Request::get("/healthz")
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|_| HealthError::Status(addr, StatusCode::BAD_REQUEST))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| HealthError::Http(addr, e))?;
    if res.status() == StatusCode::OK {
        Ok(())
    } else {
        Err(HealthError::Status(addr, res.status()))
    }
}
