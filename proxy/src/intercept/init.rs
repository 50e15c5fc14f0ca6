//! `weft-proxy init`: installs (or with `--cleanup` removes) the interception rules in the
//! current network namespace by driving `iptables-save` / `iptables-restore` (and the ip6tables
//! twins when IPv6 is there). Run by the injected init container, as root with NET_ADMIN.

use std::io::Write as _;
use std::process::{Command, Stdio};

use clap::Args;

use super::rules::{
    self, Cidr, Family, Rules, Selection, parse_cidrs, parse_ports, parse_selection,
};

/// Why the rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{tool} not found: install iptables (nft or legacy backend) in the init image; {source}"
    )]
    Missing {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// `weft-proxy init` flags (the injector passes them; see control-plane/src/inject.rs).
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The proxy's uid: its traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The proxy's gid (default: the uid).
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// The proxy's inbound listener port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's outbound listener port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports to capture, comma-separated, or `*` for all.
    #[arg(long, default_value = "*", value_parser = |s: &str| parse_selection(s, parse_ports))]
    pub include_inbound_ports: Selection<u16>,
    /// Inbound ports never captured, comma-separated.
    #[arg(long, default_value = "", value_parser = parse_ports)]
    pub exclude_inbound_ports: ::std::vec::Vec<u16>,
    /// Outbound destination ports never captured, comma-separated.
    #[arg(long, default_value = "", value_parser = parse_ports)]
    pub exclude_outbound_ports: ::std::vec::Vec<u16>,
    /// Outbound destinations to capture, comma-separated CIDRs, or `*` for all.
    #[arg(long, default_value = "*", value_parser = |s: &str| parse_selection(s, parse_cidrs))]
    pub include_outbound_cidrs: Selection<Cidr>,
    /// Outbound destinations never captured, comma-separated CIDRs.
    #[arg(long, default_value = "", value_parser = parse_cidrs)]
    pub exclude_outbound_cidrs: ::std::vec::Vec<Cidr>,
    /// Leave IPv6 alone (by default ip6tables rules are installed when the kernel has IPv6).
    #[arg(long)]
    pub no_ipv6: bool,
    /// Remove every weft chain and jump instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
    /// Print the iptables-restore input instead of applying it.
    #[arg(long)]
    pub dry_run: bool,
}

impl InitArgs {
    pub fn rules(&self) -> Rules {
        Rules {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid.unwrap_or(self.proxy_uid),
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            include_inbound_ports: self.include_inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            include_outbound_cidrs: self.include_outbound_cidrs.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
        }
    }

    fn families(&self) -> Vec<Family> {
        let mut families = vec![Family::V4];
        // No IPv6 in the kernel (or disabled): nothing to capture, and ip6tables would fail.
        if !self.no_ipv6 && std::path::Path::new("/proc/net/if_inet6").exists() {
            families.push(Family::V6);
        }
        families
    }
}

/// Installs or removes the rules; with `--dry-run` prints what it would apply.
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    let rules = args.rules();
    for family in args.families() {
        // A dry run on a machine without iptables still shows the rules.
        let save = match save(family) {
            Ok(save) => save,
            Err(e) if args.dry_run => {
                eprintln!("# {e}");
                String::new()
            }
            Err(e) => return Err(e),
        };
        let jumps = rules::existing_jumps(&save);
        let input = if args.cleanup {
            rules::cleanup(&rules::existing_chains(&save), &jumps)
        } else {
            rules.install(family, &jumps)
        };
        if args.dry_run {
            println!("# {} --noflush\n{input}", family.restore_tool());
        } else {
            restore(family, &input)?;
            tracing::info!(
                tool = family.restore_tool(),
                cleanup = args.cleanup,
                "interception rules applied"
            );
        }
    }
    Ok(())
}

/// `iptables-save -t nat`.
pub fn save(family: Family) -> Result<String, InitError> {
    let tool = family.save_tool();
    let out = Command::new(tool)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| InitError::Missing { tool, source })?;
    if !out.status.success() {
        return Err(InitError::Failed {
            tool,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `iptables-restore --noflush` with `input`: one atomic transaction.
fn restore(family: Family, input: &str) -> Result<(), InitError> {
    let tool = family.restore_tool();
    let mut child = Command::new(tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| InitError::Missing { tool, source })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as the tool's failure below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| InitError::Missing { tool, source })?;
    if !out.status.success() {
        return Err(InitError::Failed {
            tool,
            status: out.status,
            stderr: format!(
                "{}\n--- input ---\n{input}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}
