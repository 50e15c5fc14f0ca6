//! Opaque TCP: connect to a destination and copy bytes both ways until either side closes
//! (`copy_bidirectional`: each byte is copied once, through one buffer per direction). The
//! other end is a plain TCP connection (passthrough, the local app) or an mTLS stream to the
//! destination's sidecar ([`crate::identity::mesh::MeshClient::tunnel`]).

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::metrics::ConnCounters;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Copies `client` ⇄ a new connection to `dest`, counting into `counters`.
pub async fn proxy<C>(client: C, dest: SocketAddr, counters: &ConnCounters)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(upstream) = connect(dest).await {
        copy(client, upstream, &dest, counters).await;
    }
}

/// A TCP connection to `dest` within the connect timeout; failures are logged (the caller
/// has nothing to tell the client but a close).
pub async fn connect(dest: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(error)) => {
            tracing::debug!(%dest, %error, "opaque TCP: cannot connect");
            None
        }
        Err(_) => {
            tracing::debug!(%dest, "opaque TCP: connect timed out");
            None
        }
    }
}

/// Copies `client` ⇄ `upstream` until either side closes; bytes from the client count as
/// received, bytes to it as sent.
pub async fn copy<C, U>(
    mut client: C,
    mut upstream: U,
    dest: &(dyn Display + Sync),
    counters: &ConnCounters,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            counters.bytes_received.inc_by(sent);
            counters.bytes_sent.inc_by(received);
        }
        Err(error) => tracing::debug!(%dest, %error, "opaque TCP connection ended"),
    }
}
