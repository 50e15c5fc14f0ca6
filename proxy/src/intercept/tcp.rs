//! Opaque TCP: connect to a destination and copy bytes both ways until either side closes
//! (`copy_bidirectional`: each byte is copied once, through one buffer per direction).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::metrics::ConnCounters;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Copies `client` ⇄ a new connection to `dest`, counting into `counters`.
pub async fn proxy(mut client: TcpStream, dest: SocketAddr, counters: &ConnCounters) {
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest)).await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            tracing::debug!(%dest, %error, "opaque TCP: cannot connect");
            return;
        }
        Err(_) => {
            tracing::debug!(%dest, "opaque TCP: connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            counters.bytes_received.inc_by(sent);
            counters.bytes_sent.inc_by(received);
        }
        Err(error) => tracing::debug!(%dest, %error, "opaque TCP connection ended"),
    }
}
