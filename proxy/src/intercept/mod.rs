//! Transparent interception: the `weft-proxy init` rules ([`rules`], [`init`]), the original
//! destination of a captured connection ([`original_dst`]), protocol detection ([`detect`]),
//! the captured-connection accept loop of the outbound listener ([`outbound`]) and opaque TCP
//! passthrough ([`tcp`]).
//!
//! Data flow in a pod after `init`: the app connects to `10.0.0.2:8080` → `OUTPUT` redirects
//! to the outbound listener (15001) → SO_ORIGINAL_DST says `10.0.0.2:8080` → a mesh service's
//! endpoint: detect the protocol; HTTP goes through the route table (mTLS to the peer's
//! sidecar when the service has an identity), anything else is copied as opaque TCP; an
//! unknown destination passes through untouched. On the peer, `PREROUTING` redirects to its
//! inbound listener (15006), which forwards to `127.0.0.1:8080`.

pub mod detect;
pub mod init;
pub mod original_dst;
pub mod outbound;
pub mod rules;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A captured request's original destination, as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct OriginalDst(pub SocketAddr);

/// Ports whose protocols have the server speak first (or that must never wait for
/// detection): SMTP (25, 587), FTP (21), POP3 (110), IMAP (143), MySQL (3306), NATS (4222).
pub const DEFAULT_OPAQUE_PORTS: &str = "21,25,110,143,587,3306,4222";

/// Transparent-mode settings shared by both listeners.
#[derive(Debug, Clone)]
pub struct Transparent {
    /// Ports passed through as opaque TCP without detection.
    pub opaque_ports: Arc<[u16]>,
    /// How long detection waits for the client's first bytes.
    pub detect_timeout: Duration,
    /// Close captured connections to destinations outside the mesh instead of passing them
    /// through (`--outbound-traffic-policy registry-only`).
    pub registry_only: bool,
}

impl Transparent {
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
    }
}

/// An IPv6-only listener on `[ip]:port`, beside an IPv4 one on the same port: iptables
/// REDIRECT sends captured IPv6 connections to the IPv6 address of the same port.
pub fn bind_v6_only(ip: std::net::Ipv6Addr, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((ip, port)).into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}
