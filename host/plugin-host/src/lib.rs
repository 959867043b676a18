//! The sandboxed WebAssembly plugin runtime: wasmtime components, the host side of the WIT interfaces, the plugin store and hot swap.
