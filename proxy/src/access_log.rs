//! Access logs: one JSON line per request, off by default (`--access-log stdout|PATH`),
//! sampled by `--access-log-sample`.
//!
//! The request path formats the line and hands it to a writer thread over a bounded channel;
//! if the writer falls behind (slow disk, blocked stdout) lines are dropped and counted
//! (`weft_proxy_access_log_dropped`) rather than slowing requests down.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::metrics::ProxyMetrics;

/// Lines buffered between the request path and the writer thread.
const QUEUE: usize = 8192;

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("expected stdout or a file path".into()),
            "stdout" | "-" => Ok(Target::Stdout),
            path => Ok(Target::File(path.into())),
        }
    }
}

/// One request, as logged.
#[derive(Debug, Clone, Default)]
pub struct Entry<'a> {
    pub start: Option<SystemTime>,
    pub trace_id: Option<String>,
    pub direction: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub service: &'a str,
    pub subset: &'a str,
    pub upstream: Option<String>,
    pub status: u16,
    pub grpc_status: Option<u16>,
    pub reason: &'a str,
    pub duration: Duration,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub retries: u32,
}

impl Entry<'_> {
    pub fn to_json(&self) -> String {
        let time = self.start.map(rfc3339).unwrap_or_default();
        let or_null = |s: &str| {
            if s.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::Value::from(s)
            }
        };
        serde_json::json!({
            "time": time,
            "trace_id": self.trace_id,
            "direction": self.direction,
            "method": self.method,
            "authority": or_null(self.authority),
            "path": self.path,
            "route": or_null(self.route),
            "service": or_null(self.service),
            "subset": or_null(self.subset),
            "upstream": self.upstream,
            "status": self.status,
            "grpc_status": self.grpc_status,
            "reason": or_null(self.reason),
            "duration_ms": (self.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "retries": self.retries,
        })
        .to_string()
    }
}

/// The request path's handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    sample: f64,
    metrics: Arc<ProxyMetrics>,
}

impl AccessLog {
    /// Opens `target` and starts the writer thread.
    pub fn start(target: &Target, sample: f64, metrics: Arc<ProxyMetrics>) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(io::stdout()),
            Target::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&rx, out))?;
        Ok(Self {
            tx,
            sample: sample.clamp(0.0, 1.0),
            metrics,
        })
    }

    /// Decides, per request, whether it is logged (cheap: one random number).
    pub fn sampled(&self) -> bool {
        self.sample >= 1.0 || (self.sample > 0.0 && fastrand::f64() < self.sample)
    }

    pub fn log(&self, entry: &Entry<'_>) {
        match self.tx.try_send(entry.to_json()) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.access_log_dropped.inc();
            }
        }
    }
}

fn write_lines(rx: &Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::new(out);
    while let Ok(line) = rx.recv() {
        let mut ok = writeln!(out, "{line}").is_ok();
        // Write what is queued, then flush once: lines appear promptly, writes stay batched.
        while let Ok(line) = rx.try_recv() {
            ok &= writeln!(out, "{line}").is_ok();
        }
        if !(ok && out.flush().is_ok()) {
            // A broken log target must not take the proxy down; say it once per burst.
            eprintln!("weft-proxy: cannot write the access log");
        }
    }
}

/// `2026-01-02T03:04:05.678Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_is_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn entry_is_one_json_line() {
        let e = Entry {
            direction: "outbound",
            method: "GET",
            path: "/x",
            route: "reviews",
            status: 503,
            reason: "no_endpoints",
            duration: Duration::from_micros(1500),
            ..Entry::default()
        };
        let line = e.to_json();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["reason"], "no_endpoints");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["service"], serde_json::Value::Null);
    }

    #[test]
    fn lines_reach_the_file() {
        let dir = std::env::temp_dir().join(format!("weft-al-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("access.log");
        let log = AccessLog::start(
            &Target::File(path.clone()),
            1.0,
            Arc::new(ProxyMetrics::new()),
        )
        .unwrap();
        assert!(log.sampled());
        log.log(&Entry {
            status: 200,
            ..Entry::default()
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("\"status\":200") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "line not written");
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
