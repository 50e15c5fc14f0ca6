//! Where a captured connection was going: `SO_ORIGINAL_DST` (IPv4, `SOL_IP`/80) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6, `SOL_IPV6`/80), read through socket2's safe wrappers.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// The destination the client asked for before iptables redirected it. On a connection that
/// was not redirected this is the local address itself (the kernel answers with it, or fails;
/// both are handled by [`was_redirected`]).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST is not an IP socket address",
        )
    })
}

/// The original destination when the connection was redirected to this listener, `None`
/// when the client connected to the listener itself (explicit proxy use) or there is no NAT
/// entry.
pub fn was_redirected(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let orig = original_dst(stream).ok()?;
    // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
    let same = orig == local
        || match (orig, local) {
            (SocketAddr::V4(o), SocketAddr::V6(l)) => {
                l.ip().to_ipv4_mapped() == Some(*o.ip()) && l.port() == o.port()
            }
            _ => false,
        };
    (!same).then_some(orig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(was_redirected(&server), None);
    }
}
