//! fastsocketserver's engine: Python's `socketserver` with Rust owning the sockets,
//! the polling and the dispatch. This file only assembles the Python module; the map of
//! the engine, and the rules each part keeps, are in docs/ARCHITECTURE.md.
//!
//! - [`error`]: the one error type and its one conversion to a Python exception;
//! - [`sys`]: the operating system side, no `Python` in any signature;
//! - [`bridge`]: every wait and GIL crossing, Python buffers and addresses, the serve loop;
//! - [`blocking`]: the stdlib's `handle()` path (reactor, dispatch, pool, request, files);
//! - [`evented`]: the `asyncio.Protocol` path (event loop, transports).
//! - [`tls`]: TLS with rustls (in progress, not exposed to Python yet).

pub mod blocking;
pub mod bridge;
pub mod error;
pub mod evented;
pub mod sys;
pub mod tls;

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
    let raw = bridge::address::from_python(address, family)?;
    bridge::address::to_python(address.py(), &raw)
}

/// Wait until every descriptor a destructor handed to the closer is closed, for tests
/// that count descriptors after a garbage collection.
#[pyfunction]
fn _settle_closes(py: Python<'_>) {
    bridge::wait::detached(py, sys::closer::settle);
}

/// `gil_used = true`: the engine has not been run or tested on a free-threaded
/// CPython, so it asks such an interpreter to keep (re-enable) the GIL rather than be
/// declared safe without a test.
#[pymodule(gil_used = true)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    blocking::register(m)?;
    evented::register(m)?;
    m.add_class::<bridge::proxy::ProxyPolicy>()?;
    m.add(
        "PanicException",
        m.py().get_type::<pyo3::panic::PanicException>(),
    )?;
    m.add_function(wrap_pyfunction!(_panic, m)?)?;
    m.add_function(wrap_pyfunction!(_normalize_address, m)?)?;
    m.add_function(wrap_pyfunction!(_settle_closes, m)?)?;
    Ok(())
}
