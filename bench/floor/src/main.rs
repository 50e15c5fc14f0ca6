//! weft-floor: a forwarder that does no work, to measure the floor of this machine's kernel path.
//!
//! Every proxy in `bench/run.py` pays, per HTTP/1.1 keep-alive request, one receive and one send
//! in each direction, plus the loopback TCP delivery and wake-ups those calls trigger. This binary
//! pays exactly that and nothing else: each accepted connection gets its own upstream connection,
//! and every read is written unchanged to the other side (no parsing, pooling or routing). Its
//! req/s under wrk is what a proxy with zero user-space cost reaches on the same cores, measured
//! in the same run rather than estimated.
//!
//! Two event loops on one thread: `epoll` (what tokio, HAProxy and Envoy use) and `uring`
//! (io_uring, single issuer, deferred task-run), to show whether another kernel interface would
//! lift the floor.
//!
//! It is an instrument for small messages: a send that does not take a whole read (the peer's
//! socket buffer full) closes the pair instead of buffering, so bytes are never dropped or
//! reordered silently, and wrk reports the failure.
//!
//! Usage: `weft-floor epoll|uring LISTEN_ADDR UPSTREAM_ADDR`

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;

mod epoll;
mod uring;

/// Read size per receive: larger than any message in the floor scenario.
const BUF: usize = 16 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, upstream] = args.as_slice() else {
        eprintln!("usage: weft-floor epoll|uring LISTEN_ADDR UPSTREAM_ADDR");
        return ExitCode::from(2);
    };
    let parse = |what: &str, s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|e| format!("{what} {s:?} is not an address: {e}"))
    };
    let result = parse("listen", listen)
        .and_then(|l| Ok((l, parse("upstream", upstream)?)))
        .and_then(|(l, up)| {
            let listener = TcpListener::bind(l).map_err(|e| format!("binding {l}: {e}"))?;
            match mode.as_str() {
                "epoll" => epoll::run(listener, up),
                "uring" => uring::run(listener, up),
                other => Err(format!("mode {other:?} is neither epoll nor uring")),
            }
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-floor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The upstream half of an accepted connection. Connecting blocks: it happens once per client
/// connection (wrk opens its connections before it measures), never per request.
fn connect(client: &TcpStream, upstream: SocketAddr) -> std::io::Result<TcpStream> {
    let up = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    up.set_nodelay(true)?;
    Ok(up)
}
