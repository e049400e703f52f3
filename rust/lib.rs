//! fastsocketserver's engine: Python's `socketserver` with Rust owning the sockets,
//! the polling and the dispatch. This file only assembles the Python module; each
//! concern lives in its own module:
//!
//! - [`error`]: the one error type and its conversion to Python exceptions;
//! - [`syscall`]: the GIL-free system calls, with socket-timeout semantics;
//! - [`wait`]: one GIL release per wait, EINTR and signal handlers;
//! - [`descriptor`]: shared ownership of a socket descriptor;
//! - [`closer`]: descriptors that destructors release, closed away from the GIL;
//! - [`address`]: `sockaddr` to and from Python address objects;
//! - [`buffer`]: Python bytes-like arguments;
//! - [`connection`]: the socket-like object handlers receive;
//! - [`reader`], [`writer`]: the handler's `rfile` and `wfile`;
//! - [`reactor`]: the server's wait on its listening socket (mio);
//! - [`serve`]: the `serve_forever()` loop;
//! - [`dispatch`]: the library's own dispatch hooks, run by the engine;
//! - [`pool`]: the worker threads of `ThreadingMixIn`;
//! - [`event_loop`], [`transport`]: the event-driven path for `asyncio.Protocol`-shaped handlers;
//! - [`native`]: an echo protocol in Rust, the benchmark's ceiling.

pub mod address;
pub mod buffer;
pub mod closer;
pub mod connection;
pub mod descriptor;
pub mod dispatch;
pub mod error;
pub mod event_loop;
pub mod native;
pub mod pool;
pub mod reactor;
pub mod reader;
pub mod serve;
pub mod syscall;
pub mod transport;
pub mod wait;
pub mod writer;

use pyo3::prelude::*;

/// Panic inside the engine, for tests: a Rust panic must reach Python as
/// `_core.PanicException`, never abort the process.
#[pyfunction]
fn _panic(message: &str) {
    panic!("{message}");
}

/// Parse a Python address for `family` as `sendto` does and give it back as the kernel
/// would report it: the address round trip, for tests.
#[pyfunction]
fn _normalize_address<'py>(
    address: &Bound<'py, PyAny>,
    family: i32,
) -> PyResult<Bound<'py, PyAny>> {
    let raw = address::from_python(address, family)?;
    address::to_python(address.py(), &raw)
}

/// Wait until every descriptor a destructor handed to the closer is closed, for tests
/// that count descriptors after a garbage collection.
#[pyfunction]
fn _settle_closes(py: Python<'_>) {
    py.detach(closer::settle);
}

/// `gil_used = true`: the engine has not been run or tested on a free-threaded
/// CPython, so it asks such an interpreter to keep (re-enable) the GIL rather than be
/// declared safe without a test.
#[pymodule(gil_used = true)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<connection::Connection>()?;
    m.add_class::<reader::SocketReader>()?;
    m.add_class::<writer::SocketWriter>()?;
    m.add_class::<reactor::Reactor>()?;
    m.add_class::<pool::WorkerPool>()?;
    m.add_class::<event_loop::EventLoop>()?;
    m.add_class::<transport::BaseTransport>()?;
    m.add_class::<transport::Transport>()?;
    m.add_class::<transport::DatagramTransport>()?;
    m.add_class::<native::NativeEcho>()?;
    m.add("DEFAULT_BUFFER_SIZE", connection::DEFAULT_BUFFER_SIZE)?;
    m.add(
        "PanicException",
        m.py().get_type::<pyo3::panic::PanicException>(),
    )?;
    m.add_function(wrap_pyfunction!(_panic, m)?)?;
    m.add_function(wrap_pyfunction!(_normalize_address, m)?)?;
    m.add_function(wrap_pyfunction!(_settle_closes, m)?)?;
    Ok(())
}
