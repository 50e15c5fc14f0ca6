//! `weftctl`: the operator CLI for weft-control's admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use weft_control::client::AdminClient;
use weft_control::{api, cli, experiment_cli, top};

/// Inspect and change the weft mesh through weft-control's admin API.
#[derive(Debug, Parser)]
#[command(name = "weftctl", version)]
struct Args {
    /// Base URL of weft-control's admin API.
    #[arg(
        long,
        env = "WEFT_SERVER",
        default_value = "http://127.0.0.1:15014",
        global = true
    )]
    server: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Version, config source and every proxy's state (ACKed version, last NACK).
    Status,
    /// The routes of the live configuration, with weights as percentages.
    Routes,
    /// Set backend weights on a route rule, e.g. `set-weight reviews v1=90 v2=10`.
    SetWeight {
        route: String,
        /// NAME=WEIGHT, NAME being a subset (v1), service/subset, or a service.
        #[arg(value_name = "NAME=W", required = true, value_parser = parse_weight)]
        weights: Vec<(String, u32)>,
        /// Rule index; by default the rule whose backends are exactly the names given.
        #[arg(long, value_name = "N")]
        rule: Option<usize>,
    },
    /// Live request rate, success rate and p99 per service and subset, from every connected
    /// proxy's /metrics (outbound side), refreshed every interval until interrupted.
    Top {
        /// Print one measurement (two scrapes one interval apart) and exit.
        #[arg(long, conflicts_with = "iterations")]
        once: bool,
        /// Print this many measurements, then exit.
        #[arg(long, value_name = "N")]
        iterations: Option<u64>,
        /// Seconds between scrapes.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
    },
    /// Print the bootstrap token a proxy of this service account proves its identity with
    /// (give it to weft-proxy as --identity-token-file).
    Token {
        #[arg(long, value_name = "NS", default_value = "default")]
        namespace: String,
        #[arg(long, value_name = "SA")]
        service_account: String,
    },
    /// Replace the whole configuration with a mesh YAML file (`-` reads stdin).
    Apply {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Traffic-shifting experiments: start, status, watch, pause, resume, abort, promote.
    #[command(subcommand)]
    Experiment(experiment_cli::ExperimentCmd),
}

/// A file's text, or stdin for `-`.
fn read_file(file: &std::path::Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

fn parse_weight(s: &str) -> Result<(String, u32), String> {
    weft_proto::ops::parse_weight(s).map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(out) => {
            println!("{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; returns what to print.
async fn run(args: Args) -> anyhow::Result<String> {
    let client = AdminClient::new(&args.server)?;
    let json = args.output == Output::Json;
    Ok(match args.command {
        Command::Status if json => cli::json(&client.status_json().await?),
        Command::Status => {
            // Older control planes have no /api/v1/leader: the line is then left out.
            let leader = client.get("/api/v1/leader").await.ok();
            cli::status(&client.status().await?, leader.as_ref())
        }
        Command::Routes if json => {
            cli::json(&client.get::<serde_json::Value>("/api/v1/routes").await?)
        }
        Command::Routes => cli::routes(&client.routes().await?),
        Command::SetWeight {
            route,
            weights,
            rule,
        } => {
            let req = api::SetWeightsRequest {
                weights: weights.iter().cloned().collect(),
                rule,
            };
            let resp = client.set_weights(&route, &req).await?;
            if json {
                cli::json(&resp)
            } else {
                cli::set_weight(&resp, &weights)
            }
        }
        Command::Top {
            once,
            iterations,
            interval,
        } => {
            let interval = std::time::Duration::try_from_secs_f64(interval)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--interval must be a positive number of seconds")?;
            let iterations = if once { Some(1) } else { iterations };
            let scraper = top::Scraper::new();
            let mut done = 0u64;
            loop {
                // The proxy list is re-read every round: proxies come and go.
                let targets = top::Scraper::targets(&client.status().await?);
                let (rows, errors) = top::measure(&scraper, &targets, interval).await;
                let out = if json {
                    cli::json(&serde_json::json!({
                        "proxies": targets.len(),
                        "errors": errors,
                        "rows": rows,
                    }))
                } else {
                    top::render(&rows, targets.len(), &errors)
                };
                done += 1;
                if iterations.is_some_and(|n| done >= n) {
                    break out;
                }
                if !json {
                    // Clear the screen and home the cursor, like top(1).
                    print!("\x1b[2J\x1b[H");
                }
                println!("{}", out.trim_end());
            }
        }
        Command::Experiment(experiment_cli::ExperimentCmd::Start { file }) => {
            experiment_cli::start(&client, read_file(&file)?, json).await?
        }
        Command::Experiment(cmd) => experiment_cli::run(&client, cmd, json).await?,
        Command::Token {
            namespace,
            service_account,
        } => {
            let resp = client
                .token(&weft_control::certify::TokenRequest {
                    namespace,
                    service_account,
                })
                .await?;
            if json { cli::json(&resp) } else { resp.token }
        }
        Command::Apply { file } => {
            let yaml = read_file(&file)?;
            let resp = client.apply(yaml).await?;
            if json {
                cli::json(&resp)
            } else {
                cli::apply(&resp)
            }
        }
    })
}
