//! `weftctl experiment …`: start, inspect, watch and steer experiments. Formatting is pure
//! (unit-tested); `watch` redraws in place on a terminal and prints plain lines otherwise.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use crate::client::{AdminClient, ClientError};
use crate::experiment::{Event, Phase, Status, Window};
use crate::experiment_api::List;

#[derive(Debug, Subcommand)]
pub enum ExperimentCmd {
    /// Start an experiment from a YAML file holding one experiment spec (`-` reads stdin).
    Start {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// All experiments, or one in detail with its events.
    Status {
        name: Option<String>,
    },
    /// Live progress of one experiment until it finishes, then a summary.
    Watch {
        name: String,
        /// Refresh period in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        every: u64,
    },
    /// Stop advancing (traffic stays where it is).
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Roll back to 100 % stable now.
    Abort {
        name: String,
    },
    /// Promote to 100 % candidate now.
    Promote {
        name: String,
    },
}

/// Runs a subcommand that is not `start`; returns what to print.
pub async fn run(
    client: &AdminClient,
    cmd: ExperimentCmd,
    json: bool,
) -> Result<String, ClientError> {
    let path = |name: &str| format!("/api/v1/experiments/{name}");
    match cmd {
        ExperimentCmd::Start { .. } => Ok(String::new()),
        ExperimentCmd::Status { name: None } => {
            let v: serde_json::Value = client.get("/api/v1/experiments").await?;
            if json {
                return Ok(crate::cli::json(&v));
            }
            let list: List = serde_json::from_value(v).map_err(decode)?;
            Ok(table(&list.experiments))
        }
        ExperimentCmd::Status { name: Some(name) } => {
            let v: serde_json::Value = client.get(&path(&name)).await?;
            if json {
                return Ok(crate::cli::json(&v));
            }
            let s: Status = serde_json::from_value(v).map_err(decode)?;
            Ok(detail(&s, 15))
        }
        ExperimentCmd::Watch { name, every } => watch(client, &path(&name), every, json).await,
        ExperimentCmd::Pause { name } => command(client, &name, "pause", json).await,
        ExperimentCmd::Resume { name } => command(client, &name, "resume", json).await,
        ExperimentCmd::Abort { name } => command(client, &name, "abort", json).await,
        ExperimentCmd::Promote { name } => command(client, &name, "promote", json).await,
    }
}

/// `pause` / `resume` / `abort` / `promote`.
pub async fn command(
    client: &AdminClient,
    name: &str,
    action: &str,
    json: bool,
) -> Result<String, ClientError> {
    let s: serde_json::Value = client
        .post(
            &format!("/api/v1/experiments/{name}/{action}"),
            "application/json",
            bytes::Bytes::new(),
        )
        .await?;
    if json {
        return Ok(crate::cli::json(&s));
    }
    let s: Status = serde_json::from_value(s).map_err(decode)?;
    Ok(format!("{name}: {}\n{}", action, summary_line(&s)))
}

/// `start -f`: the spec text, YAML or JSON.
pub async fn start(client: &AdminClient, spec: String, json: bool) -> Result<String, ClientError> {
    let s: serde_json::Value = client
        .post("/api/v1/experiments", "application/yaml", spec.into())
        .await?;
    if json {
        return Ok(crate::cli::json(&s));
    }
    let s: Status = serde_json::from_value(s).map_err(decode)?;
    Ok(format!(
        "experiment {} started\n{}\nfollow it with: weftctl experiment watch {}",
        s.record.spec.name,
        summary_line(&s),
        s.record.spec.name
    ))
}

fn decode(e: serde_json::Error) -> ClientError {
    ClientError::Decode {
        server: String::new(),
        reason: e.to_string(),
    }
}

async fn watch(
    client: &AdminClient,
    path: &str,
    every: u64,
    json: bool,
) -> Result<String, ClientError> {
    let tty = std::io::stdout().is_terminal() && !json;
    let mut drawn = 0usize;
    loop {
        let v: serde_json::Value = client.get(path).await?;
        let s: Status = serde_json::from_value(v.clone()).map_err(decode)?;
        let done = s.record.phase.is_terminal();
        let mut out = std::io::stdout().lock();
        if json {
            let _ = writeln!(out, "{v}");
        } else if tty {
            // Move up over the previous frame and clear it, then draw the new one.
            if drawn > 0 {
                let _ = write!(out, "\x1b[{drawn}F\x1b[J");
            }
            let frame = detail(&s, 6);
            drawn = frame.lines().count();
            let _ = write!(out, "{frame}");
        } else {
            let _ = writeln!(out, "{}", progress_line(&s));
        }
        let _ = out.flush();
        drop(out);
        if done {
            return Ok(if json {
                String::new()
            } else {
                final_summary(&s)
            });
        }
        tokio::time::sleep(Duration::from_millis(every.max(50))).await;
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}%"))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}ms"))
}

fn window(label: &str, w: &Window) -> String {
    format!(
        "{label} {:>7.1} rps  ok {:>8}  p99 {:>8}  ({} req)",
        w.rate,
        pct(w.success_rate),
        ms(w.p99_ms),
        w.requests
    )
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Progressing => "progressing",
        Phase::Paused => "paused",
        Phase::Succeeded => "succeeded",
        Phase::RolledBack => "rolled back",
    }
}

/// `step 2/4 weight 20% progressing`.
pub fn summary_line(s: &Status) -> String {
    format!(
        "{} {}  step {}/{}  candidate {}%  failed checks {}/{}{}",
        s.strategy,
        phase(s.record.phase),
        (s.record.step + 1).min(s.plan.len()),
        s.plan.len(),
        s.weight,
        s.record.failed_checks,
        s.record.spec.analysis.failure_threshold,
        s.record
            .reason
            .as_ref()
            .map_or_else(String::new, |r| format!("  — {r}"))
    )
}

/// One line per refresh when stdout is not a terminal: the last check's measured windows and
/// verdicts (the live window is often only milliseconds old right after a check).
pub fn progress_line(s: &Status) -> String {
    let mut line = summary_line(s);
    let spec = &s.record.spec;
    if let Some(c) = &s.record.last_check {
        let _ = write!(
            line,
            " | {} | {} | last check {}",
            window(&spec.candidate, &c.candidate),
            window(&spec.stable, &c.stable),
            verdicts(c)
        );
    } else if let Some(live) = &s.live {
        let _ = write!(
            line,
            " | {} | {}",
            window(&spec.candidate, &live.candidate),
            window(&spec.stable, &live.stable)
        );
    }
    line
}

fn verdicts(c: &crate::experiment::Check) -> String {
    let gates: Vec<String> = c
        .gates
        .iter()
        .map(|g| {
            format!(
                "{} {} {}",
                g.gate,
                g.value.map_or_else(|| "-".into(), |v| format!("{v:.2}")),
                if g.pass { "✓" } else { "✗" }
            )
        })
        .collect();
    format!(
        "{}: {}",
        if c.pass { "pass" } else { "FAIL" },
        gates.join(", ")
    )
}

fn event_line(e: &Event) -> String {
    let secs = e.at_unix_ms / 1000;
    let (h, m, sec) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let version = e.version.map_or_else(String::new, |v| format!(" v{v}"));
    format!(
        "  {h:02}:{m:02}:{sec:02}.{:03} {:<11} step {} weight {:>3}%{version}  {}",
        e.at_unix_ms % 1000,
        e.kind,
        e.step + 1,
        e.weight,
        e.message
    )
}

/// The detailed view (`status NAME`, and each frame of `watch` on a terminal).
pub fn detail(s: &Status, events: usize) -> String {
    let spec = &s.record.spec;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "experiment {}  route {}  {}/{} → {}/{}",
        spec.name, spec.route, spec.service, spec.stable, spec.service, spec.candidate
    );
    let _ = writeln!(out, "  {}", summary_line(s));
    let bar: String = s
        .plan
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let mark = if s.record.phase == Phase::Succeeded || i < s.record.step {
                "✓"
            } else if i == s.record.step && !s.record.phase.is_terminal() {
                "▶"
            } else {
                "·"
            };
            format!("{mark}{}%", st.weight)
        })
        .collect::<Vec<_>>()
        .join(" → ");
    let _ = writeln!(out, "  plan: {bar} → promote");
    let a = &spec.analysis;
    let mut gates = vec![format!("min {} requests", a.min_requests)];
    if let Some(r) = a.success_rate {
        gates.push(format!("success ≥ {}%", r.0));
    }
    if let Some(p) = a.max_p99 {
        gates.push(format!("p99 ≤ {p}"));
    }
    let _ = writeln!(
        out,
        "  gates: {}  every {}",
        gates.join(", "),
        spec.interval
    );
    if let Some(live) = &s.live {
        let _ = writeln!(out, "  now ({:.1}s):", live.seconds);
        let _ = writeln!(out, "    {}", window(&spec.candidate, &live.candidate));
        let _ = writeln!(out, "    {}", window(&spec.stable, &live.stable));
    }
    if let Some(c) = &s.record.last_check {
        let _ = writeln!(out, "  last check: {}", verdicts(c));
        let _ = writeln!(out, "    {}", window(&spec.candidate, &c.candidate));
        let _ = writeln!(out, "    {}", window(&spec.stable, &c.stable));
    }
    let skip = s.record.events.len().saturating_sub(events);
    let _ = writeln!(out, "  events:");
    for e in &s.record.events[skip..] {
        let _ = writeln!(out, "{}", event_line(e));
    }
    out
}

/// Printed when `watch` ends.
pub fn final_summary(s: &Status) -> String {
    let took = s
        .record
        .finished_at_unix_ms
        .unwrap_or(s.record.updated_at_unix_ms)
        .saturating_sub(s.record.started_at_unix_ms);
    let checks = s.record.events.iter().filter(|e| e.kind == "check").count();
    format!(
        "experiment {} {} after {:.1}s: {} checks, {} failed; candidate {}/{} at {}%{}",
        s.record.spec.name,
        phase(s.record.phase),
        took as f64 / 1000.0,
        checks,
        s.record.failed_checks,
        s.record.spec.service,
        s.record.spec.candidate,
        s.weight,
        s.record
            .reason
            .as_ref()
            .map_or_else(String::new, |r| format!(" — {r}"))
    )
}

/// `status` without a name: one row per experiment.
pub fn table(list: &[Status]) -> String {
    if list.is_empty() {
        return "no experiments\n".into();
    }
    let mut out = String::new();
    for s in list {
        let _ = writeln!(out, "{:<24} {}", s.record.spec.name, summary_line(s));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::{Origin, Record};

    #[test]
    fn lines_show_step_weight_and_reason() {
        let spec: weft_proto::experiment::ExperimentSpec = serde_yaml_ng::from_str(
            "{name: c, route: r, service: s, stable: v1, candidate: v2, \
             canary: {steps: [10, 50]}, interval: 1s}",
        )
        .unwrap();
        let mut record = Record::new(spec, Origin::Api, 1_000);
        record.reason = Some("waiting".into());
        let s = Status {
            strategy: "canary".into(),
            weight: record.weight(),
            plan: record.plan(),
            live: None,
            record,
        };
        let line = progress_line(&s);
        assert!(
            line.starts_with("canary progressing  step 1/2  candidate 10%"),
            "{line}"
        );
        assert!(line.ends_with("— waiting"), "{line}");
        let d = detail(&s, 5);
        assert!(d.contains("plan: ▶10% → ·50% → promote"), "{d}");
        assert!(d.contains("started"), "{d}");
    }
}
