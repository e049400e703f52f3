//! `NativeEcho`: an echo protocol implemented in Rust, the benchmark's ceiling.
//!
//! It is an ordinary `asyncio.Protocol`/`DatagramProtocol`-shaped class (it echoes
//! through whatever transport it is given, so asyncio can run it too), and the engine's
//! event loop recognises it: for a `NativeEcho` connection the loop queues the received
//! bytes straight onto the transport, without making a `bytes` object or calling into
//! the interpreter. The same server with a Python protocol class then shows what the
//! Python callbacks cost (benches/).

use crate::bridge::wait::lock;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyString;
use std::sync::Mutex;

#[pyclass(module = "fastsocketserver._core", frozen)]
pub struct NativeEcho {
    transport: Mutex<Option<Py<PyAny>>>,
}

impl NativeEcho {
    fn transport(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        lock(py, &self.transport).as_ref().map(|t| t.clone_ref(py))
    }

    /// `transport.<name>()`, if the transport has that method.
    fn call_transport(&self, py: Python<'_>, name: &Bound<'_, PyString>) -> PyResult<()> {
        if let Some(t) = self.transport(py) {
            if let Ok(method) = t.getattr(py, name) {
                method.call0(py)?;
            }
        }
        Ok(())
    }
}

#[pymethods]
impl NativeEcho {
    #[new]
    fn new() -> NativeEcho {
        NativeEcho {
            transport: Mutex::new(None),
        }
    }

    fn connection_made(&self, py: Python<'_>, transport: Py<PyAny>) {
        *lock(py, &self.transport) = Some(transport);
    }

    fn data_received(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Some(t) = self.transport(py) {
            t.call_method1(py, intern!(py, "write"), (data,))?;
        }
        Ok(())
    }

    /// The echo is not being read: stop reading until it drains (back-pressure; a
    /// datagram transport without `pause_reading` drops what it cannot queue).
    fn pause_writing(&self, py: Python<'_>) -> PyResult<()> {
        self.call_transport(py, intern!(py, "pause_reading"))
    }

    fn resume_writing(&self, py: Python<'_>) -> PyResult<()> {
        self.call_transport(py, intern!(py, "resume_reading"))
    }

    /// Close the connection at the peer's end of stream.
    fn eof_received(&self) -> bool {
        false
    }

    fn datagram_received(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        addr: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        if let Some(t) = self.transport(py) {
            t.call_method1(py, intern!(py, "sendto"), (data, addr))?;
        }
        Ok(())
    }

    fn error_received(&self, _exc: &Bound<'_, PyAny>) {}

    fn connection_lost(&self, py: Python<'_>, _exc: &Bound<'_, PyAny>) {
        lock(py, &self.transport).take();
    }
}
