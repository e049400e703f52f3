//! The stdlib's path: a handler's `handle()` runs on the serving thread, a pool
//! thread, or a forked child, with a socket-like `request` and `rfile`/`wfile`.
//!
//! - [`reactor`]: the server's wait on its listening socket (mio), accepting inside
//!   the same GIL release;
//! - [`dispatch`]: the library's own dispatch hooks, run in Rust when not overridden;
//! - [`pool`]: `ThreadingMixIn`'s worker threads;
//! - [`connection`]: the `request` object;
//! - [`reader`], [`writer`]: `rfile` and `wfile`;
//! - [`io`]: what the request and its files share (no cycle between them).

pub mod connection;
pub mod dispatch;
pub mod io;
pub mod pool;
pub mod reactor;
pub mod reader;
pub mod writer;

use pyo3::prelude::*;

/// Add this path's classes to the engine's module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<connection::Connection>()?;
    m.add_class::<reader::SocketReader>()?;
    m.add_class::<writer::SocketWriter>()?;
    m.add_class::<reactor::Reactor>()?;
    m.add_class::<pool::WorkerPool>()?;
    m.add("DEFAULT_BUFFER_SIZE", connection::DEFAULT_BUFFER_SIZE)?;
    Ok(())
}
