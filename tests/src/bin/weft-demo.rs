//! `weft-demo`: runs the local mesh demo on loopback and exits (see `weft_tests::demo`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    weft_tests::demo::run().await
}
