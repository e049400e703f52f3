//! What the request object and its files share, below all three: the socket they
//! work on, as a constructor argument, and sending a whole buffer.
//!
//! `Connection` makes its `rfile`/`wfile` (it depends on `reader` and `writer`), so
//! nothing the files need may live in `connection`: it is here, and the dependency
//! graph of the blocking path has no cycle.

use crate::bridge::wait::blocking;
use crate::sys::descriptor::SocketCore;
use crate::sys::syscall;
use pyo3::prelude::*;
use std::sync::Arc;

/// The socket of a `Connection` passed to a Python constructor (`SocketWriter(conn)`);
/// extracted in `connection`, which knows the class.
pub struct CoreOf(pub Arc<SocketCore>);

/// Send all of `data` on `core` (one GIL release, resumed after signals whose handlers
/// do not raise), honouring the socket's timeout mode.
pub fn send_all(py: Python<'_>, core: &SocketCore, data: &[u8], flags: i32) -> PyResult<()> {
    let usage = core.begin()?;
    let mode = core.mode();
    let deadline = mode.deadline();
    let mut sent = 0usize;
    blocking(py, || {
        syscall::send_all(usage.fd, data, &mut sent, flags, mode, deadline)
    })
}
