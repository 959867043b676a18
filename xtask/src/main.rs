//! `cargo xtask <chore>`.
//!
//! - `cargo xtask plugins` builds every plugin of `plugins/` and `examples/` for
//!   `wasm32-unknown-unknown`, componentizes each core module with `wit-component`, and writes
//!   `plugins/dist/` (the components and `manifest.toml` with each component's BLAKE3 and the
//!   BLAKE3 of the sources it was built from).
//! - `cargo xtask plugins --check` rebuilds nothing: it fails if the committed manifest does not
//!   match the current sources (stale plugins) or the committed components.

mod plugins;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["plugins"] => plugins::build_all(),
        ["plugins", "--check"] => plugins::check(),
        _ => anyhow::bail!(
            "usage: cargo xtask plugins [--check]\n  plugins          build every plugin into plugins/dist/\n  plugins --check  fail if plugins/dist/ is stale"
        ),
    }
}
