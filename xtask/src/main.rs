//! `cargo xtask <chore>`.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("usage: cargo xtask plugins")
}
