//! `SocketReader`: the handler's `rfile`, an `io.BufferedReader` over the connection.
//!
//! Reads are served from the buffer with no system call and no GIL release whenever the
//! data is there; otherwise one release covers the `recv` that waits, after sending what
//! a buffered `wfile` queued on the connection (ARCHITECTURE.md, The GIL rule).
//! Semantics follow `socket.makefile('rb', n)`: `read(n)` waits for `n` bytes or EOF,
//! `read1` returns what one receive gives, `readline(limit)`, `readlines(hint)`,
//! `readinto`, `peek`, iteration. The buffer size is at least 1 (`makefile('rb', 0)`
//! gives the stdlib's own raw `socket.SocketIO` instead). After a timeout the reader
//! refuses further reads, as `socket.SocketIO` does.

use crate::bridge::buffer::RawBuffer;
use crate::bridge::wait::{blocking, detached, lock};
use crate::error::unsupported;
use crate::sys::closer;
use crate::sys::descriptor::SocketCore;
use crate::sys::syscall;
use pyo3::exceptions::{PyOSError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

/// How much `read()` asks the kernel for at a time when reading to end of stream.
const READALL_CHUNK: usize = 64 * 1024;

pub struct ReaderState {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes from `pos` already searched for a newline without success.
    scanned: usize,
    closed: bool,
    timed_out: bool,
}

impl ReaderState {
    fn available(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let start = self.pos;
        self.pos += n;
        self.scanned = self.scanned.saturating_sub(n);
        &self.buf[start..start + n]
    }

    fn reset_if_empty(&mut self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            self.scanned = 0;
        }
    }
}

#[pyclass(module = "fastsocketserver._core", frozen, weakref)]
pub struct SocketReader {
    core: Arc<SocketCore>,
    bufsize: usize,
    state: Mutex<ReaderState>,
}

impl SocketReader {
    /// A reader buffering up to `bufsize` bytes (at least 1).
    pub fn new(core: Arc<SocketCore>, bufsize: usize) -> SocketReader {
        debug_assert!(bufsize > 0);
        core.add_io_ref();
        SocketReader {
            core,
            bufsize,
            state: Mutex::new(ReaderState {
                buf: Vec::new(),
                pos: 0,
                scanned: 0,
                closed: false,
                timed_out: false,
            }),
        }
    }

    fn open_state(&self, py: Python<'_>, what: &str) -> PyResult<MutexGuard<'_, ReaderState>> {
        let st = lock(py, &self.state);
        if st.closed {
            return Err(PyValueError::new_err(format!("{what} of closed file")));
        }
        Ok(st)
    }

    /// Receive up to `max` more bytes into the buffer, inside one GIL release.
    /// Returns 0 at end of stream.
    fn fill(&self, py: Python<'_>, st: &mut ReaderState, max: usize) -> PyResult<usize> {
        if st.timed_out {
            return Err(PyOSError::new_err("cannot read from timed out object"));
        }
        if st.pos > 0 && st.pos == st.buf.len() {
            st.buf.clear();
            st.pos = 0;
        } else if st.pos > 0 && st.buf.capacity() - st.buf.len() < max {
            st.buf.drain(..st.pos);
            st.pos = 0;
        }
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let fd = usage.fd;
        let buf = &mut st.buf;
        // What a buffered wfile queued goes out inside this same release, before the wait.
        let out = self.core.take_out();
        let mut sent = 0usize;
        let result = blocking(py, || {
            syscall::send_all(fd, &out, &mut sent, 0, mode, deadline)?;
            syscall::recv_append(fd, buf, max, 0, mode, deadline)
        });
        self.core.restore_out(out[sent..].to_vec());
        if let Err(err) = &result {
            if err.is_instance_of::<pyo3::exceptions::PyTimeoutError>(py) {
                st.timed_out = true;
            }
        }
        result
    }

    /// Buffer at least `n` bytes (or all there is before EOF); returns what is buffered.
    fn fill_to(&self, py: Python<'_>, st: &mut ReaderState, n: usize) -> PyResult<usize> {
        while st.available() < n {
            let want = (n - st.available()).max(self.bufsize);
            if self.fill(py, st, want)? == 0 {
                break;
            }
        }
        Ok(st.available())
    }

    fn read_all<'py>(
        &self,
        py: Python<'py>,
        st: &mut ReaderState,
    ) -> PyResult<Bound<'py, PyBytes>> {
        while self.fill(py, st, READALL_CHUNK.max(self.bufsize))? > 0 {}
        let n = st.available();
        let out = PyBytes::new(py, st.take(n));
        st.reset_if_empty();
        Ok(out)
    }

    fn read_n<'py>(
        &self,
        py: Python<'py>,
        st: &mut ReaderState,
        n: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let have = self.fill_to(py, st, n)?;
        let out = PyBytes::new(py, st.take(have.min(n)));
        st.reset_if_empty();
        Ok(out)
    }

    fn read1_n<'py>(
        &self,
        py: Python<'py>,
        st: &mut ReaderState,
        n: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let n = n.unwrap_or(self.bufsize);
        if n > 0 && st.available() == 0 {
            self.fill(py, st, n.max(self.bufsize))?;
        }
        let k = st.available().min(n);
        let out = PyBytes::new(py, st.take(k));
        st.reset_if_empty();
        Ok(out)
    }

    fn readline_limit<'py>(
        &self,
        py: Python<'py>,
        st: &mut ReaderState,
        limit: Option<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        loop {
            let avail = &st.buf[st.pos..];
            let end = avail.len().min(limit.unwrap_or(usize::MAX));
            if let Some(i) = avail[st.scanned.min(end)..end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let n = st.scanned.min(end) + i + 1;
                st.scanned = 0;
                let out = PyBytes::new(py, st.take(n));
                st.reset_if_empty();
                return Ok(out);
            }
            if limit.is_some_and(|l| avail.len() >= l) {
                st.scanned = 0;
                let out = PyBytes::new(py, st.take(end));
                st.reset_if_empty();
                return Ok(out);
            }
            st.scanned = avail.len();
            if self.fill(py, st, self.bufsize)? == 0 {
                st.scanned = 0;
                let n = st.available();
                let out = PyBytes::new(py, st.take(n));
                st.reset_if_empty();
                return Ok(out);
            }
        }
    }

    fn copy_into(&self, py: Python<'_>, buffer: &Bound<'_, PyAny>, one: bool) -> PyResult<usize> {
        let what = if one { "readinto1()" } else { "readinto()" };
        let target = RawBuffer::writable(buffer, &format!("{what} argument"))?;
        let mut st = self.open_state(py, "readinto")?;
        let want = target.len();
        let have = if one {
            if want > 0 && st.available() == 0 {
                self.fill(py, &mut st, want.max(self.bufsize))?;
            }
            st.available()
        } else {
            self.fill_to(py, &mut st, want)?
        };
        let n = have.min(want);
        let src = st.take(n);
        // SAFETY: the target buffer is writable for `want >= n` bytes and pinned by `target`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), target.ptr().get(), n) };
        st.reset_if_empty();
        Ok(n)
    }

    fn release(&self, py: Python<'_>) {
        let mut st = lock(py, &self.state);
        if st.closed {
            return;
        }
        st.closed = true;
        st.buf = Vec::new();
        st.pos = 0;
        drop(st);
        if self.core.drop_io_ref() {
            detached(py, || self.core.close_now());
        }
    }
}

/// A size argument that may be None, as `io` parses it for `read`, `readline` and
/// `readlines`: None, or anything with `__index__` (`TypeError` otherwise,
/// `OverflowError` past the index range).
fn optional_size(arg: Option<&Bound<'_, PyAny>>) -> PyResult<Option<isize>> {
    let Some(arg) = arg else {
        return Ok(None);
    };
    // SAFETY: `arg` is a live object; the check only reads its type's slots.
    if unsafe { pyo3::ffi::PyIndex_Check(arg.as_ptr()) } == 0 {
        return Err(PyTypeError::new_err(format!(
            "argument should be integer or None, not '{}'",
            arg.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )));
    }
    arg.extract::<isize>().map(Some).map_err(|err| {
        match err.is_instance_of::<PyOverflowError>(arg.py()) {
            true => PyOverflowError::new_err("cannot fit 'int' into an index-sized integer"),
            false => err,
        }
    })
}

/// A limit that is none when negative (`readline`, `read1`).
fn limit(size: Option<isize>) -> Option<usize> {
    size.filter(|&n| n >= 0).map(|n| n as usize)
}

#[pymethods]
impl SocketReader {
    /// `read()`, `read(None)`, `read(-1)`: to end of stream; `read(n)`: `n` bytes or
    /// what there is before the end. Other negative sizes are a `ValueError`.
    #[pyo3(signature = (size = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        size: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let size = optional_size(size)?;
        if size.is_some_and(|n| n < -1) {
            return Err(PyValueError::new_err(
                "read length must be non-negative or -1",
            ));
        }
        let mut st = self.open_state(py, "read")?;
        match limit(size) {
            None => self.read_all(py, &mut st),
            Some(n) => self.read_n(py, &mut st, n),
        }
    }

    /// At most `size` bytes from one receive at most; a negative size means the
    /// buffer size. `size` must be an integer (`None` is a `TypeError`, as in `io`).
    #[pyo3(signature = (size = -1))]
    fn read1<'py>(&self, py: Python<'py>, size: isize) -> PyResult<Bound<'py, PyBytes>> {
        let mut st = self.open_state(py, "read")?;
        self.read1_n(py, &mut st, limit(Some(size)))
    }

    #[pyo3(signature = (size = None))]
    fn readline<'py>(
        &self,
        py: Python<'py>,
        size: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let size = limit(optional_size(size)?);
        let mut st = self.open_state(py, "readline")?;
        self.readline_limit(py, &mut st, size)
    }

    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(
        &self,
        py: Python<'py>,
        hint: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let hint = limit(optional_size(hint)?).filter(|&h| h > 0);
        let mut st = self.open_state(py, "readline")?;
        let lines = PyList::empty(py);
        let mut total = 0usize;
        loop {
            let line = self.readline_limit(py, &mut st, None)?;
            let n = line.as_bytes().len();
            if n == 0 {
                break;
            }
            lines.append(line)?;
            total += n;
            if hint.is_some_and(|h| total > h) {
                break;
            }
        }
        Ok(lines)
    }

    fn readinto(&self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.copy_into(py, buffer, false)
    }

    fn readinto1(&self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> PyResult<usize> {
        self.copy_into(py, buffer, true)
    }

    /// Buffered bytes without consuming them; receives once if the buffer is empty.
    #[pyo3(signature = (size = 0))]
    fn peek<'py>(&self, py: Python<'py>, size: isize) -> PyResult<Bound<'py, PyBytes>> {
        let _ = size;
        let mut st = self.open_state(py, "peek")?;
        if st.available() == 0 {
            self.fill(py, &mut st, self.bufsize)?;
        }
        Ok(PyBytes::new(py, &st.buf[st.pos..]))
    }

    fn __iter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().open_state(slf.py(), "I/O operation").map(drop)?;
        Ok(slf)
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let mut st = self.open_state(py, "readline")?;
        let line = self.readline_limit(py, &mut st, None)?;
        Ok(if line.as_bytes().is_empty() {
            None
        } else {
            Some(line)
        })
    }

    fn close(&self, py: Python<'_>) {
        self.release(py)
    }

    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        lock(py, &self.state).closed
    }

    fn readable(&self, py: Python<'_>) -> PyResult<bool> {
        self.open_state(py, "I/O operation").map(drop)?;
        Ok(true)
    }

    /// False, open or closed, as `io.BufferedReader.writable`.
    fn writable(&self) -> bool {
        false
    }

    fn seekable(&self, py: Python<'_>) -> PyResult<bool> {
        self.open_state(py, "I/O operation").map(drop)?;
        Ok(false)
    }

    fn isatty(&self, py: Python<'_>) -> PyResult<bool> {
        self.open_state(py, "I/O operation").map(drop)?;
        Ok(false)
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.open_state(py, "flush").map(drop)?;
        Ok(())
    }

    fn fileno(&self, py: Python<'_>) -> PyResult<i32> {
        self.open_state(py, "I/O operation").map(drop)?;
        Ok(self.core.open_fileno()?)
    }

    fn detach(&self) -> PyResult<()> {
        Err(unsupported("detach"))
    }

    #[pyo3(signature = (*_args))]
    fn seek(&self, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        Err(unsupported("seek"))
    }

    fn tell(&self) -> PyResult<()> {
        Err(unsupported("tell"))
    }

    #[getter]
    fn mode(&self) -> &'static str {
        "rb"
    }

    /// The descriptor while open, -1 once closed (as `BufferedReader.name` over a
    /// `SocketIO`).
    #[getter]
    fn name(&self, py: Python<'_>) -> RawFd {
        match lock(py, &self.state).closed {
            true => -1,
            false => self.core.fileno(),
        }
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().open_state(slf.py(), "I/O operation").map(drop)?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) {
        self.release(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "<fastsocketserver.SocketReader fd={} bufsize={}>",
            self.core.fileno(),
            self.bufsize
        )
    }
}

impl Drop for SocketReader {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if !st.closed && self.core.drop_io_ref() {
            // No system call here, where the GIL may be held (see `crate::sys::closer`).
            let core = self.core.clone();
            closer::run(move || core.close_now());
        }
    }
}
