//! Background traffic for experiments: workers send GETs through a proxy until stopped (or a
//! hard time limit passes), counting answers per version.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::http::HttpClient;
use crate::mesh::{Split, record};

/// Running traffic; [`Load::stop`] ends it and returns what it saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Split>>,
}

impl Load {
    /// `workers` loops of GET `host` via `outbound`, each bounded by `limit` in time and a
    /// pause of `pause` between requests (zero: back to back).
    pub fn start(
        outbound: SocketAddr,
        host: &str,
        workers: usize,
        pause: Duration,
        limit: Duration,
    ) -> Load {
        Self::start_with_headers(outbound, host, &[], workers, pause, limit)
    }

    /// [`Load::start`] sending `headers` with every request.
    pub fn start_with_headers(
        outbound: SocketAddr,
        host: &str,
        headers: &[(&str, &str)],
        workers: usize,
        pause: Duration,
        limit: Duration,
    ) -> Load {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let client = HttpClient::http1();
        let tasks = (0..workers)
            .map(|_| {
                let (stop, client, host) = (stop.clone(), client.clone(), host.to_owned());
                let headers = headers.clone();
                tokio::spawn(async move {
                    let headers: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let started = Instant::now();
                    let mut split = Split::default();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
                        record(&mut split, client.get(outbound, &host, "/", &headers).await);
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    split
                })
            })
            .collect();
        Load { stop, tasks }
    }

    pub async fn stop(self) -> Split {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Split::default();
        for t in self.tasks {
            total.merge(t.await.expect("load worker"));
        }
        total
    }
}
