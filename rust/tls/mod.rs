//! TLS for the engine (issue #15), being built brick by brick. Nothing here is exposed
//! to Python yet and no server uses it.
//!
//! - [`config`]: the server configuration: certificate chain, private key (plain or
//!   password-protected PKCS#8), optional client-certificate verification, ALPN and
//!   minimum version, checked and turned into an `Arc<rustls::ServerConfig>`, with a
//!   typed error for every bad input (see [`config::ConfigError`]). No `Python` in any
//!   signature; `rust/error.rs` maps the error to the exception
//!   `ssl.SSLContext.load_cert_chain` raises for the same mistake.
//!
//! Crypto provider: ring, not aws-lc-rs. ring builds with nothing more than a C
//! compiler (it ships its assembly pre-generated), which every machine that builds this
//! crate already has for CPython's headers; aws-lc-rs needs CMake, and for some targets
//! Go or bindgen/libclang, on top of a much longer C build, for a speed advantage that
//! rustls's own benchmarks show only on some rows. The provider is chosen in one place
//! ([`config::provider`]), so switching later is one line and a Cargo feature.

pub mod config;
