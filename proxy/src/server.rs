//! Accept loops: one per listener, serving HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the
//! same port, with graceful shutdown.
//!
//! Every connection is admitted against its listener's [`crate::limits`] and served by
//! [`crate::connection`]. On shutdown a listener stops taking new connections at once, serves
//! those the kernel had already accepted for it, and closes; connections in progress are
//! asked to finish (HTTP/1 closes after the current response, HTTP/2 sends GOAWAY) and are
//! given a grace period before the runtime drops them.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::body::DownstreamBody;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::service::Service;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::counting::CountingIo;
use crate::limits::{ListenerLimits, ServerLimits, Slot};

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Tells every accept loop to stop. Dropping it has the same effect.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

/// The receiving side of [`Shutdown`], one per task that must stop.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (Self, ShutdownSignal) {
        let (tx, rx) = watch::channel(false);
        (Self(tx), ShutdownSignal(rx))
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ShutdownSignal {
    /// Resolves once shutdown has been triggered (or its sender dropped).
    pub async fn wait(&mut self) {
        // An error means the sender is gone, which also means shut down.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether shutdown has been triggered (or its sender dropped), without waiting.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}

/// Serves `service` under the default limits, uncounted (the admin listener).
pub async fn serve<S, B>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    signal: ShutdownSignal,
    grace: Duration,
) where
    S: Service<Request<DownstreamBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let limits = ListenerLimits::new(
        name,
        ServerLimits::default(),
        Default::default(),
        Default::default(),
    );
    serve_limited(listener, service, signal, grace, limits).await;
}

/// Serves `service` on every connection `listener` accepts until `signal` fires, then drains;
/// under `limits`, counting connections, their bytes and every limit hit.
pub async fn serve_limited<S, B>(
    listener: TcpListener,
    service: S,
    signal: ShutdownSignal,
    grace: Duration,
    limits: Arc<ListenerLimits>,
) where
    S: Service<Request<DownstreamBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let builder = Arc::new(limits.limits.builder());
    let conn_signal = signal.clone();
    accept_loop(listener, limits, signal, grace, move |stream, peer, slot| {
        let io = CountingIo::new(stream, &slot.listener().conn);
        let (builder, service, signal) = (builder.clone(), service.clone(), conn_signal.clone());
        async move {
            let name = slot.listener().name;
            if let Err(error) = crate::connection::serve(&builder, io, service, slot, signal).await
            {
                tracing::debug!(listener = name, %peer, %error, "connection ended with an error");
            }
        }
    })
    .await;
}

/// The accept loop of every traffic listener: admits each connection under `limits` (over the
/// cap it is refused there), sets TCP_NODELAY (proxied requests are small and
/// latency-sensitive), and runs `handle` in the connection's own task, so a slow client (TLS
/// handshake, protocol detection) never holds up accepting. On `signal` it stops accepting and
/// waits up to `grace` for the listener's open connections to finish.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Arc<ListenerLimits>,
    mut signal: ShutdownSignal,
    grace: Duration,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admit = |(stream, peer): (TcpStream, SocketAddr)| {
        if let Some((stream, slot)) = limits.admit(stream) {
            let _ = stream.set_nodelay(true);
            tokio::spawn(handle(stream, peer, slot));
        }
    };
    accept_until(&listener, &limits, &admit, signal.wait()).await;
    // Closing a listener resets every connection still in its accept queue, and their clients
    // have sent requests they cannot tell were never read. So new handshakes are stopped
    // first, and what the kernel already completed is accepted and served (each closes after
    // one response: the signal has fired).
    if refuse_new_connections(&listener) {
        let settled = tokio::time::sleep(HANDSHAKE_SETTLE);
        accept_until(&listener, &limits, &admit, settled).await;
    }
    drop(listener);
    limits.drain(grace).await;
}

/// Accepts and `admit`s connections until `stop` resolves.
async fn accept_until(
    listener: &TcpListener,
    limits: &ListenerLimits,
    admit: &impl Fn((TcpStream, SocketAddr)),
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => admit(accepted),
                Err(error) => {
                    tracing::warn!(listener = limits.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// How long a stopped listener keeps accepting handshakes that were under way when it stopped:
/// a few in-cluster round trips (on loopback they complete within the client's `connect`).
const HANDSHAKE_SETTLE: Duration = Duration::from_millis(50);

/// Makes the kernel drop new connection attempts (SYNs) to `listener` while it still completes
/// handshakes under way and queues them for `accept`. A client whose SYN was dropped sends it
/// again after a second and is then refused by the closed port: it never has a connection
/// that is reset under its request. `false` where the filter cannot be set (then the listener
/// closes at once, as it would anyway).
fn refuse_new_connections(listener: &TcpListener) -> bool {
    #[cfg(target_os = "linux")]
    {
        use socket2::{SockFilter, SockRef};
        // Classic BPF over the TCP header: keep segments with ACK set (handshakes completing,
        // and every segment of an accepted connection, which inherits the filter), drop the
        // rest (a bare SYN).
        const LD_B_ABS: u16 = 0x30;
        const JSET_K: u16 = 0x45;
        const RET_K: u16 = 0x06;
        const TCP_FLAGS: u32 = 13;
        const ACK: u32 = 0x10;
        let program = [
            SockFilter::new(LD_B_ABS, 0, 0, TCP_FLAGS),
            SockFilter::new(JSET_K, 0, 1, ACK),
            SockFilter::new(RET_K, 0, 0, u32::MAX),
            SockFilter::new(RET_K, 0, 0, 0),
        ];
        match SockRef::from(listener).attach_filter(&program) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%error, "cannot stop new connections before closing the listener");
                false
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = listener;
        false
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::io::{Read as _, Write as _};

    use http_body_util::Full;
    use hyper::service::service_fn;
    use tokio::io::AsyncReadExt as _;

    use super::*;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_stopped_listener_drops_new_handshakes_but_keeps_its_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut served = std::net::TcpStream::connect(addr).unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        // Handshake done before the filter, not yet accepted.
        let mut queued = std::net::TcpStream::connect(addr).unwrap();

        assert!(refuse_new_connections(&listener));

        let refused = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr));
        assert!(
            refused.await.is_err(),
            "a new connection attempt is not answered"
        );
        let (mut late, _) = listener.accept().await.unwrap();
        for (client, server) in [(&mut served, &mut accepted), (&mut queued, &mut late)] {
            client.write_all(REQUEST).unwrap();
            let mut got = vec![0; REQUEST.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, REQUEST);
            tokio::io::AsyncWriteExt::write_all(server, b"ok")
                .await
                .unwrap();
            let mut answer = [0; 2];
            client.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"ok");
        }
    }

    /// Connections the kernel completed but the loop had not accepted when shutdown came are
    /// answered (and closed after it), never reset.
    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_serves_the_accept_queue_instead_of_resetting_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = Shutdown::new();
        let service = service_fn(|_req| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        // Not polled before the test awaits: the clients below sit in the accept queue.
        let server = tokio::spawn(serve(
            "test",
            listener,
            service,
            signal,
            Duration::from_secs(5),
        ));
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(REQUEST).unwrap();
                s.set_nonblocking(true).unwrap();
                TcpStream::from_std(s).unwrap()
            })
            .collect();
        shutdown.trigger();
        for (i, mut client) in clients.into_iter().enumerate() {
            let mut answer = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer));
            read.await
                .expect("answered in time")
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            assert!(answer.starts_with("http/1.1 200"), "client {i}: {answer}");
            assert!(answer.contains("connection: close"), "client {i}: {answer}");
        }
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the listener stops")
            .unwrap();
        let refused = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
