//! `SocketWriter`: the handler's `wfile`.
//!
//! With a buffer size of 0 (the stdlib's `wbufsize` default) it is the stdlib's
//! `_SocketWriter`: every `write` is sent completely before it returns (inside one GIL
//! release, resumed after signals whose handlers do not raise) and returns the byte
//! count. With a buffer size `n > 0` it is a `BufferedWriter`: bytes are queued and sent
//! when `n` are pending, at `flush()`, at `close()`, and (unlike the stdlib, where a
//! handler that forgets `flush()` before reading waits forever) inside the GIL release of
//! the connection reader's next wait, so a request/response handler pays one release
//! per request instead of two.

use crate::blocking::io::{send_all, CoreOf};
use crate::bridge::buffer::RawBuffer;
use crate::bridge::wait::{detached, lock};
use crate::error::unsupported;
use crate::sys::closer;
use crate::sys::descriptor::SocketCore;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

struct WriterState {
    closed: bool,
}

#[pyclass(module = "fastsocketserver._core", frozen, weakref)]
pub struct SocketWriter {
    core: Arc<SocketCore>,
    bufsize: usize,
    state: Mutex<WriterState>,
}

impl SocketWriter {
    pub fn new(core: Arc<SocketCore>, bufsize: usize) -> SocketWriter {
        core.add_io_ref();
        SocketWriter {
            core,
            bufsize,
            state: Mutex::new(WriterState { closed: false }),
        }
    }

    fn open_state(&self, py: Python<'_>, what: &str) -> PyResult<MutexGuard<'_, WriterState>> {
        let st = lock(py, &self.state);
        if st.closed {
            return Err(PyValueError::new_err(format!("{what} closed file")));
        }
        Ok(st)
    }

    /// Send everything queued on the connection.
    fn flush_pending(&self, py: Python<'_>) -> PyResult<()> {
        let data = self.core.take_out();
        if data.is_empty() {
            return Ok(());
        }
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let mut sent = 0usize;
        let fd = usage.fd;
        let result = crate::bridge::wait::blocking(py, || {
            crate::sys::syscall::send_all(fd, &data, &mut sent, 0, mode, deadline)
        });
        // Keep what was not sent, as BufferedWriter does; the caller sees the error.
        self.core.restore_out(data[sent..].to_vec());
        result
    }

    fn write_bytes(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let _open = self.open_state(py, "write to")?;
        if self.bufsize == 0 {
            return send_all(py, &self.core, data, 0);
        }
        if self.core.queue_out(data) >= self.bufsize {
            self.flush_pending(py)?;
        }
        Ok(())
    }

    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let mut st = lock(py, &self.state);
        if st.closed {
            return Ok(());
        }
        let flushed = self.flush_pending(py);
        st.closed = true;
        drop(st);
        if self.core.drop_io_ref() {
            detached(py, || self.core.close_now());
        }
        flushed
    }
}

#[pymethods]
impl SocketWriter {
    /// The stdlib's `_SocketWriter` over `connection`: every `write` sent in full
    /// before it returns (what `StreamRequestHandler` uses when `wbufsize == 0`).
    #[new]
    fn py_new(connection: CoreOf) -> SocketWriter {
        SocketWriter::new(connection.0, 0)
    }

    /// Send (or queue) all of `data`; returns its length in bytes.
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let buf = RawBuffer::get(data, false)?;
        self.write_bytes(py, buf.as_slice())?;
        Ok(buf.len())
    }

    fn writelines(&self, py: Python<'_>, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            let buf = RawBuffer::get(&line?, false)?;
            self.write_bytes(py, buf.as_slice())?;
        }
        Ok(())
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let _open = self.open_state(py, "flush of")?;
        self.flush_pending(py)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.release(py)
    }

    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        lock(py, &self.state).closed
    }

    /// True; once closed, a buffered writer raises `ValueError` as
    /// `io.BufferedWriter.writable` does, the unbuffered one (the stdlib's
    /// `_SocketWriter`) still says True.
    fn writable(&self, py: Python<'_>) -> PyResult<bool> {
        if self.bufsize > 0 {
            self.open_state(py, "I/O operation on").map(drop)?;
        }
        Ok(true)
    }

    /// False, open or closed, as `io.BufferedWriter.readable`.
    fn readable(&self) -> bool {
        false
    }

    fn seekable(&self, py: Python<'_>) -> PyResult<bool> {
        self.open_state(py, "I/O operation on").map(drop)?;
        Ok(false)
    }

    fn isatty(&self, py: Python<'_>) -> PyResult<bool> {
        self.open_state(py, "I/O operation on").map(drop)?;
        Ok(false)
    }

    fn fileno(&self, py: Python<'_>) -> PyResult<i32> {
        self.open_state(py, "I/O operation on").map(drop)?;
        Ok(self.core.open_fileno()?)
    }

    fn detach(&self) -> PyResult<()> {
        Err(unsupported("detach"))
    }

    #[pyo3(signature = (*_args))]
    fn read(&self, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        Err(unsupported("read"))
    }

    #[getter]
    fn mode(&self) -> &'static str {
        "wb"
    }

    /// The descriptor while open, -1 once closed (as `BufferedWriter.name`).
    #[getter]
    fn name(&self, py: Python<'_>) -> RawFd {
        match lock(py, &self.state).closed {
            true => -1,
            false => self.core.fileno(),
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get()
            .open_state(slf.py(), "I/O operation on")
            .map(drop)?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.release(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "<fastsocketserver.SocketWriter fd={} bufsize={}>",
            self.core.fileno(),
            self.bufsize
        )
    }
}

impl Drop for SocketWriter {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if !st.closed && self.core.drop_io_ref() {
            // No system call here, where the GIL may be held (see `crate::sys::closer`).
            let core = self.core.clone();
            closer::run(move || core.close_now());
        }
    }
}
