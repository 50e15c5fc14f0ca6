//! Mirroring: a fire-and-forget copy of a request to a shadow backend. The copy replays the
//! primary's kept body (no extra copy, and only when the whole body fit the replay buffer),
//! runs in its own task, and its response is drained and dropped. At most
//! [`MAX_IN_FLIGHT`] copies run at once, so a slow shadow can never pile up work or slow the
//! primary: beyond that, copies are skipped.
//!
//! A copy's outcome (5xx or error, time to the response head) counts in the shadow subset's
//! traffic stats, like a request sent there: a blue/green experiment that mirrors to its
//! candidate judges it on the copies before any user is switched.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use http::request::Parts;
use http_body_util::BodyExt;

use super::call::{Mtls, request, send};
use super::replay::{ReplayBody, RequestBody};
use crate::balance::EndpointSet;
use crate::upstream::UpstreamProtocol;

pub const MAX_IN_FLIGHT: u32 = 256;
/// A copy still running after this long is abandoned.
const TIMEOUT: Duration = Duration::from_secs(10);

static IN_FLIGHT: AtomicU32 = AtomicU32::new(0);

struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Relaxed);
    }
}

/// Sends a copy of the request (head `parts`, body replayed from `body`) to `set`, over
/// `mtls` when given.
pub fn spawn(set: Arc<EndpointSet>, parts: &Parts, body: &ReplayBody, mtls: Option<Mtls>) {
    let Some(body) = body.replay() else {
        return;
    };
    if IN_FLIGHT.fetch_add(1, Relaxed) >= MAX_IN_FLIGHT {
        IN_FLIGHT.fetch_sub(1, Relaxed);
        tracing::debug!(service = %set.service, "mirror skipped: too many copies in flight");
        return;
    }
    let slot = Slot;
    let Some(idx) = set.choose(&parts.headers, None) else {
        return;
    };
    let req = request(parts, RequestBody::Replay(body));
    let protocol = UpstreamProtocol::resolve(set.protocol, parts.version);
    tokio::spawn(async move {
        let _slot = slot;
        let endpoint = set.endpoint(idx).authority.clone();
        let _inflight = set.stats[idx].start();
        let started = Instant::now();
        let copy = async {
            let sent = send(
                mtls.as_ref(),
                &set.runtime.upstream,
                req,
                endpoint,
                protocol,
            )
            .await;
            set.subset_stats.record(
                sent.as_ref().map_or(true, |r| r.status().is_server_error()),
                started.elapsed(),
            );
            if let Ok(resp) = sent {
                // Read to the end so the pooled connection can be reused.
                let _ = resp.into_body().collect().await;
            }
        };
        if tokio::time::timeout(TIMEOUT, copy).await.is_err() {
            // No answer at all: a failure of the shadow, as for a request.
            set.subset_stats.record(true, started.elapsed());
        }
    });
}
