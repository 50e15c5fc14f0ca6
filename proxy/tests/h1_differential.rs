//! Differential fuzzing of the proxy's own HTTP/1.1 client (`weft_proxy::h1`, which replaced
//! hyper's on the hot path) against hyper's client: both read the same mutated upstream
//! responses from a real loopback socket. Framing is where a proxy's HTTP/1.1 reader turns
//! into response splitting, so the two must agree:
//!
//! - when both accept a response: the same status, the same end-to-end fields, the same body
//!   bytes and the same trailers;
//! - weft never accepts what hyper refuses. It may refuse more (it is the stricter of the
//!   two where leniency could move the end of a body: a chunk extension with control
//!   characters, say), which costs a 502 from a broken upstream, never a desync.
//!
//! Seeds are real responses in every framing (length, chunked with extensions and trailers,
//! until close, 1xx before the final answer, bodiless statuses); mutations are byte edits and
//! splices of framing tokens. CI runs a bounded number of cases with a fixed seed; run longer
//! with `WEFT_FUZZ_ITERS=20000 WEFT_FUZZ_SEED=<n> cargo test -p weft-proxy --test
//! h1_differential --release`. A disagreement prints the seed, the case and the bytes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::body::DownstreamBody;
use weft_proxy::h1::{Connection, GiveBack, H1Body};
use weft_proxy::resilience::replay::RequestBody;

const SEEDS: &[&[u8]] = &[
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-b: c\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the close",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nold style",
];

/// Tokens that change framing, spliced in at random places.
const DICT: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"0\r\n\r\n",
    b"transfer-encoding: chunked\r\n",
    b"transfer-encoding: gzip, chunked\r\n",
    b"content-length: 4\r\n",
    b"content-length: +4\r\n",
    b"content-length: 4, 5\r\n",
    b"connection: close\r\n",
    b";ext=\"q\"",
    b"ff",
    b" ",
    b"\t",
    b":",
    b"HTTP/1.1 ",
    b"100 Continue\r\n\r\n",
    b"\x00",
];

/// Fields that frame the message or belong to one hop; each client keeps or drops them as it
/// likes (weft never puts them in the map), so only the rest is compared.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Seen by a client: status, end-to-end fields, body, trailers.
#[derive(Debug, PartialEq)]
struct Seen {
    status: StatusCode,
    fields: Vec<(String, Vec<u8>)>,
    body: Bytes,
    trailers: Vec<(String, Vec<u8>)>,
}

type Outcome = Result<Seen, String>;

fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut input = seed.to_vec();
    // The status line is left alone: both read it with httparse, and mutations spent there
    // would never reach the fields and the body, where the framing is.
    let from = input
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(0, |i| i + 2);
    for _ in 0..rng.usize(1..4) {
        let at = rng.usize(from..=input.len().max(from));
        match rng.u8(..5) {
            0 if at < input.len() => input[at] = rng.u8(..),
            1 if at < input.len() => {
                input.remove(at);
            }
            2 => {
                let token = DICT[rng.usize(..DICT.len())];
                input.splice(at..at, token.iter().copied());
            }
            3 if at < input.len() => {
                // A digit or hex digit changed: lengths and chunk sizes move.
                input[at] = b"0123456789abcdef"[rng.usize(..16)];
            }
            _ => input.truncate(at),
        }
    }
    input
}

fn fields(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = map
        .iter()
        .filter(|(name, _)| !HOP_BY_HOP.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    out.sort();
    out
}

async fn collect<B>(status: StatusCode, map: &HeaderMap, body: B) -> Outcome
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let collected = body.collect().await.map_err(|e| format!("body: {e}"))?;
    let trailers = collected.trailers().map(fields).unwrap_or_default();
    Ok(Seen {
        status,
        fields: fields(map),
        body: collected.to_bytes(),
        trailers,
    })
}

/// The finished body's connection is not wanted back: each case has its own.
struct Discard;

impl GiveBack for Discard {
    fn give_back(self, _conn: Box<Connection>) {}
}

async fn weft(addr: SocketAddr) -> Outcome {
    let io = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = Request::builder()
        .method(Method::GET)
        .uri("/")
        .header("host", "upstream")
        .body(RequestBody::Stream(DownstreamBody::Empty))
        .unwrap();
    let exchange = match Connection::new(io, None).send(req, false).await {
        Ok(exchange) => exchange,
        Err(e) => return Err(format!("{e:?}")),
    };
    let (parts, ()) = exchange.head.into_parts();
    let body = H1Body::new(exchange.body, Discard);
    collect(parts.status, &parts.headers, body).await
}

async fn hyper(addr: SocketAddr) -> Outcome {
    let io = TokioIo::new(TcpStream::connect(addr).await.map_err(|e| e.to_string())?);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::GET)
        .uri("/")
        .header("host", "upstream")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let (mut parts, body) = resp.into_parts();
    // hyper hands its caller lengths that frame nothing: the one transfer-encoding overrides
    // and a broken one on a bodiless status. A proxy must not pass them on (RFC 9112 §6.3);
    // weft drops them.
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if parts.headers.contains_key(header::TRANSFER_ENCODING)
        || (bodiless && !one_number(parts.headers.get_all(header::CONTENT_LENGTH)))
    {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    collect(parts.status, &parts.headers, body).await
}

/// Whether the `content-length` values are one decimal number, repeated or not.
fn one_number(values: http::header::GetAll<'_, http::HeaderValue>) -> bool {
    let mut numbers = values
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii);
    let Some(first) = numbers.next() else {
        return true;
    };
    !first.is_empty() && first.iter().all(u8::is_ascii_digit) && numbers.all(|n| n == first)
}

/// Answers the next connection on `listener` with `response` once its request head is in,
/// then closes it (a body framed by the close ends there).
async fn answer(listener: &TcpListener, response: &[u8]) {
    let Ok((mut io, _)) = listener.accept().await else {
        return;
    };
    let mut head = BytesMut::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read_buf(&mut head).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let _ = io.write_all(response).await;
    let _ = io.shutdown().await;
    // Until the client is done: closing with its bytes unread would reset the connection.
    let _ = io.read_to_end(&mut Vec::new()).await;
}

/// What each client made of `response`. Bounded: a client that neither answers nor fails
/// within the time is a failure of its own.
async fn both(listener: &TcpListener, response: &[u8]) -> (Outcome, Outcome) {
    let addr = listener.local_addr().unwrap();
    let limit = Duration::from_secs(5);
    let run = |client: std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>| async move {
        tokio::time::timeout(limit, client)
            .await
            .unwrap_or_else(|_| Err("no outcome within 5 s".into()))
    };
    let (_, w) = tokio::join!(answer(listener, response), run(Box::pin(weft(addr))));
    let (_, h) = tokio::join!(answer(listener, response), run(Box::pin(hyper(addr))));
    (w, h)
}

#[tokio::test]
async fn weft_and_hyper_read_mutated_responses_alike() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The seeds themselves: both must read every one, and identically.
    for (i, seed) in SEEDS.iter().enumerate() {
        let (w, h) = both(&listener, seed).await;
        assert!(w.is_ok(), "seed {i}: weft refused it: {w:?}");
        assert_eq!(w, h, "seed {i}: the clients disagree");
    }
    let fuzz_seed = common::fuzz_setting("WEFT_FUZZ_SEED", 11);
    let n = common::fuzz_setting("WEFT_FUZZ_ITERS", 1500) as usize;
    let mut rng = fastrand::Rng::with_seed(fuzz_seed);
    // Both accepted, both refused, only hyper, only weft: the first two must come up often,
    // or the mutations are too tame (or too wild) to prove anything.
    let mut seen = [0usize; 3];
    for case in 0..n {
        let input = mutate(&mut rng, SEEDS[case % SEEDS.len()]);
        let (w, h) = both(&listener, &input).await;
        let shown = String::from_utf8_lossy(&input);
        match (&w, &h) {
            (Ok(a), Ok(b)) => {
                seen[0] += 1;
                assert_eq!(
                    a, b,
                    "seed {fuzz_seed} case {case}: read differently: {shown:?}"
                );
            }
            (Err(_), Err(_)) => seen[1] += 1,
            (Err(_), Ok(_)) => seen[2] += 1,
            (Ok(seen_by_weft), Err(e)) => panic!(
                "seed {fuzz_seed} case {case}: weft accepted what hyper refused ({e}): \
                 {shown:?} read as {seen_by_weft:?}"
            ),
        }
    }
    eprintln!("both accepted, both refused, only hyper: {seen:?}");
    assert!(seen[0] > n / 10 && seen[1] > n / 20, "{seen:?}");
}
