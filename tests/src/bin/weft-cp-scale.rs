//! `weft-cp-scale [N...]`: the control-plane scale benchmark (see `weft_tests::scale`). Prints
//! convergence p50/p99 after weight changes and the control plane's RSS per connected proxy.

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
    for n in sizes {
        let dir = tempfile::tempdir()?;
        let r = weft_tests::scale::run(dir.path(), n, 20, Duration::from_secs(60)).await?;
        println!(
            "| {n} | {} | {:.1} ms | {:.1} ms | {:.1} KB |",
            r.pushes,
            r.percentile(0.5),
            r.percentile(0.99),
            r.kb_per_proxy()
        );
    }
    Ok(())
}
