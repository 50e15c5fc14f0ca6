//! `weft-cp-scale [N...]`: the control-plane scale benchmark (see `weft_tests::scale`). Prints
//! convergence p50/p99 after weight changes and the control plane's RSS per connected proxy,
//! then weft's two control-plane performance targets judged on those numbers.

use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    println!("| proxies | pushes | convergence p50 | p99 | control-plane RSS per proxy |");
    println!("|---|---|---|---|---|");
    let mut targets = Vec::new();
    for n in sizes {
        let dir = tempfile::tempdir()?;
        let r = weft_tests::scale::run(dir.path(), n, 20, Duration::from_secs(60)).await?;
        let (p99, kb) = (r.percentile(0.99), r.kb_per_proxy());
        println!(
            "| {n} | {} | {:.1} ms | {p99:.1} ms | {kb:.1} KB |",
            r.pushes,
            r.percentile(0.5),
        );
        match n {
            1_000 => targets.push(format!(
                "| convergence to 1,000 proxies, p99 ≤ 100 ms | {p99:.1} ms | {} |",
                met(p99 <= 100.0)
            )),
            10_000 => targets.push(format!(
                "| control plane per connected proxy at 10,000 ≤ 50 KB | {kb:.1} KB | {} |",
                met(kb <= 50.0)
            )),
            _ => {}
        }
    }
    if !targets.is_empty() {
        println!("\n| target | this run | met |\n|---|---|---|");
        targets.iter().for_each(|t| println!("{t}"));
    }
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}
