//! `Connection`: the socket-like object a request handler receives.
//!
//! Rust owns the accepted descriptor (through a [`SocketCore`]); the handler sees an
//! object with the `socket.socket` methods handlers use. Every call that can wait runs
//! its system calls inside one GIL release ([`wait::blocking`]), the message calls
//! (`recvmsg`, `recvmsg_into`, `recvfrom_into`, `sendmsg`, with ancillary data as
//! `(level, type, data)` tuples) included. A handler that needs a
//! genuine `socket.socket` (an `ssl` wrap, say) calls `dup()` for one sharing the
//! connection, or `detach()` and builds one from the descriptor.

use crate::blocking::io::{send_all, CoreOf};
use crate::blocking::reader::SocketReader;
use crate::blocking::writer::SocketWriter;
use crate::bridge::address;
use crate::bridge::buffer::RawBuffer;
use crate::bridge::proxy::ProxyPolicy;
use crate::bridge::wait::blocking;
use crate::error::Error;
use crate::sys::descriptor::SocketCore;
use crate::sys::syscall::{self, Mode};
use pyo3::exceptions::{PyOverflowError, PyRuntimeWarning, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyTuple};
use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

/// `io.DEFAULT_BUFFER_SIZE`, the buffer size of `makefile()` when none is given.
pub const DEFAULT_BUFFER_SIZE: usize = 8192;

#[pyclass(module = "fastsocketserver._core", frozen, weakref)]
pub struct Connection {
    pub core: Arc<SocketCore>,
}

impl Connection {
    pub fn new(fd: RawFd, family: i32, kind: i32, proto: i32) -> Connection {
        Connection {
            core: Arc::new(SocketCore::new(fd, family, kind, proto)),
        }
    }

    /// One `recvmsg(2)` into `iov` (whose memory the caller pins) with room for
    /// `control_size` bytes of ancillary data, waiting as the timeout mode says inside
    /// one release; returns the call's result and the ancillary data received.
    fn receive_msg(
        &self,
        py: Python<'_>,
        iov: &syscall::IoVecs,
        control_size: usize,
        flags: i32,
    ) -> PyResult<(syscall::Received, Vec<u8>)> {
        let mut control = zeroed(control_size)?;
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let got = blocking(py, || {
            syscall::recvmsg(usage.fd, iov, &mut control, flags, mode, deadline)
        })?;
        drop(usage);
        control.truncate(got.control_len);
        Ok((got, control))
    }

    /// The address a receive reported, as the stdlib shows it (None when there is none).
    fn sender<'py>(&self, py: Python<'py>, addr: &syscall::RawAddr) -> PyResult<Bound<'py, PyAny>> {
        address::to_python(py, addr)
    }

    fn name(&self, py: Python<'_>, peer: bool) -> PyResult<Py<PyAny>> {
        let usage = self.core.begin()?;
        let addr = syscall::sock_name(usage.fd, peer)?;
        Ok(address::to_python(py, &addr)?.unbind())
    }
}

impl Connection {
    /// `TCPServer.shutdown_request` inline: `shutdown(SHUT_WR)` (errors ignored, as
    /// the stdlib ignores them) and `close()`, in one GIL release.
    pub fn shutdown_and_close(&self, py: Python<'_>) {
        let core = &*self.core;
        py.detach(|| {
            if let Ok(usage) = core.begin() {
                // SAFETY: the descriptor is open while `usage` lives.
                unsafe { libc::shutdown(usage.fd, libc::SHUT_WR) };
            }
            if core.owner_close() {
                core.close_now();
            }
        });
    }
}

/// Convert a Python timeout (`None` or seconds) to a mode, as `settimeout` validates it:
/// a float (NaN is a `ValueError`) or an object with `__index__` (anything else is a
/// `TypeError`), rounded up to whole nanoseconds; negative is a `ValueError`, more
/// nanoseconds than an `i64` holds an `OverflowError`.
pub fn parse_timeout(value: Option<&Bound<'_, PyAny>>) -> PyResult<Mode> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(Mode::Blocking);
    };
    let nanos = if let Ok(f) = value.cast::<PyFloat>() {
        syscall::secs_to_nanos(f.value())
    } else {
        // Through `__index__` only, as CPython converts a non-float timeout: a
        // `TypeError` for other types, an `OverflowError` past an i64.
        syscall::int_secs_to_nanos(value.extract::<i64>()?)
    }
    .map_err(PyErr::from)?;
    match nanos {
        n if n < 0 => Err(PyValueError::new_err("Timeout value out of range")),
        0 => Ok(Mode::NonBlocking),
        n => Ok(Mode::Timeout(Duration::from_nanos(n as u64))),
    }
}

fn mode_to_python(mode: Mode) -> Option<f64> {
    match mode {
        Mode::Blocking => None,
        Mode::NonBlocking => Some(0.0),
        Mode::Timeout(_) => Some(syscall::nanos_to_secs(mode.to_nanos())),
    }
}

fn check_size(n: isize, what: &str) -> PyResult<usize> {
    if n < 0 {
        return Err(PyValueError::new_err(format!(
            "negative buffersize in {what}"
        )));
    }
    Ok(n as usize)
}

/// The largest ancillary buffer `recvmsg` accepts (CPython's limit for a `socklen_t`).
const MAX_CONTROL: isize = i32::MAX as isize;

fn control_size(ancbufsize: isize) -> PyResult<usize> {
    if !(0..=MAX_CONTROL).contains(&ancbufsize) {
        return Err(PyValueError::new_err(
            "invalid ancillary data buffer length",
        ));
    }
    Ok(ancbufsize as usize)
}

/// A zeroed buffer of `len` bytes, or `MemoryError`.
fn zeroed(len: usize) -> PyResult<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::NoMemory)?;
    v.resize(len, 0);
    Ok(v)
}

/// The items of an iterable argument, as CPython's `PySequence_Fast` collects them: a
/// `TypeError` saying `message` when the object cannot be iterated at all.
fn items_of<'py>(obj: &Bound<'py, PyAny>, message: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let iter = obj
        .try_iter()
        .map_err(|err| match err.is_instance_of::<PyTypeError>(obj.py()) {
            true => PyTypeError::new_err(message.to_owned()),
            false => err,
        })?;
    iter.collect()
}

/// One `(level, type, data)` item of `sendmsg`'s ancillary data.
fn control_item<'py>(item: &Bound<'py, PyAny>) -> PyResult<(i32, i32, RawBuffer<'py>)> {
    const WHAT: &str = "[sendmsg() ancillary data items]() argument";
    // SAFETY: item is a live object; PySequence_Check only inspects its type.
    if unsafe { pyo3::ffi::PySequence_Check(item.as_ptr()) } == 0 {
        return Err(PyTypeError::new_err(format!(
            "{WHAT} must be 3-item sequence, not {}",
            item.get_type().name()?
        )));
    }
    let n = item.len()?;
    if n != 3 {
        return Err(PyTypeError::new_err(format!(
            "{WHAT} must be sequence of length 3, not {n}"
        )));
    }
    let level: i32 = item.get_item(0)?.extract()?;
    let kind: i32 = item.get_item(1)?.extract()?;
    let data = RawBuffer::get(&item.get_item(2)?, false)?;
    Ok((level, kind, data))
}

/// The descriptors of the `SCM_RIGHTS` items in a received control buffer, as owners.
/// The kernel has just installed them in this process and nothing else knows them.
fn received_fds(control: &[u8], items: &[syscall::ControlItem]) -> Vec<OwnedFd> {
    let width = std::mem::size_of::<RawFd>();
    items
        .iter()
        .filter(|i| i.level == libc::SOL_SOCKET && i.kind == libc::SCM_RIGHTS)
        .flat_map(|i| control[i.data.clone()].chunks_exact(width))
        .map(|c| RawFd::from_ne_bytes(c.try_into().expect("chunks of an fd's width")))
        // SAFETY: see above; each number is a fresh descriptor that is ours alone.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// The ancillary data of a `recvmsg` as the list of `(level, type, data)` the stdlib
/// returns, warning (`RuntimeWarning`) about a malformed or cut item as it does. When
/// the list cannot be built (the warning is an error, memory ran out) the descriptors
/// that arrived are closed, detached, before the exception propagates: nobody else
/// could ever close them.
fn ancillary_to_python<'py>(py: Python<'py>, control: &[u8]) -> PyResult<Bound<'py, PyList>> {
    let (items, malformed) = syscall::parse_control(control);
    let build = || -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        let mut warn = malformed;
        for item in &items {
            warn |= item.truncated;
            list.append((
                item.level,
                item.kind,
                PyBytes::new(py, &control[item.data.clone()]),
            ))?;
        }
        if warn {
            let message = c"received malformed or improperly-truncated ancillary data";
            PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), message as &CStr, 1)?;
        }
        Ok(list)
    };
    build().inspect_err(|_| {
        let fds = received_fds(control, &items);
        py.detach(move || drop(fds));
    })
}

/// Receive into a fresh buffer of at most `size` bytes, inside one release.
pub fn recv_bytes<'py>(
    py: Python<'py>,
    core: &SocketCore,
    size: usize,
    flags: i32,
) -> PyResult<Bound<'py, PyBytes>> {
    let usage = core.begin()?;
    let mode = core.mode();
    let deadline = mode.deadline();
    let mut buf: Vec<u8> = Vec::new();
    blocking(py, || {
        syscall::recv_append(usage.fd, &mut buf, size, flags, mode, deadline).map(|_| ())
    })?;
    drop(usage);
    Ok(PyBytes::new(py, &buf))
}

impl<'a, 'py> FromPyObject<'a, 'py> for CoreOf {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<CoreOf> {
        Ok(CoreOf(obj.cast::<Connection>()?.get().core.clone()))
    }
}

#[pymethods]
impl Connection {
    #[pyo3(signature = (bufsize, flags = 0))]
    fn recv<'py>(
        &self,
        py: Python<'py>,
        bufsize: isize,
        flags: i32,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let size = check_size(bufsize, "recv")?;
        recv_bytes(py, &self.core, size, flags)
    }

    #[pyo3(signature = (buffer, nbytes = 0, flags = 0))]
    fn recv_into(
        &self,
        py: Python<'_>,
        buffer: &Bound<'_, PyAny>,
        nbytes: isize,
        flags: i32,
    ) -> PyResult<usize> {
        let buf = RawBuffer::writable(buffer, "recv_into() argument 1")?;
        let n = check_size(nbytes, "recv_into")?;
        if n > buf.len() {
            return Err(PyValueError::new_err(
                "buffer too small for requested bytes",
            ));
        }
        let n = if n == 0 { buf.len() } else { n };
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let ptr = buf.ptr();
        let fd = usage.fd;
        // SAFETY: `buf` pins `n` writable bytes at `ptr` until after the call.
        blocking(py, move || unsafe {
            syscall::recv_raw(fd, ptr.get(), n, flags, mode, deadline)
        })
    }

    #[pyo3(signature = (bufsize, flags = 0))]
    fn recvfrom<'py>(
        &self,
        py: Python<'py>,
        bufsize: isize,
        flags: i32,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyAny>)> {
        let size = check_size(bufsize, "recvfrom")?;
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let mut buf = vec![0u8; size.min(syscall::MAX_RECV)];
        let (n, addr) = blocking(py, || {
            syscall::recvfrom(usage.fd, &mut buf, flags, mode, deadline)
        })?;
        let addr = match self.core.kind {
            libc::SOCK_STREAM => py.None().into_bound(py),
            _ => address::to_python(py, &addr)?,
        };
        Ok((PyBytes::new(py, &buf[..n]), addr))
    }

    /// `recvmsg(bufsize[, ancbufsize[, flags]])`: `(data, ancdata, msg_flags, address)`.
    #[pyo3(signature = (bufsize, ancbufsize = 0, flags = 0, /))]
    fn recvmsg<'py>(
        &self,
        py: Python<'py>,
        bufsize: isize,
        ancbufsize: isize,
        flags: i32,
    ) -> PyResult<Bound<'py, PyTuple>> {
        if bufsize < 0 {
            return Err(PyValueError::new_err("negative buffer size in recvmsg()"));
        }
        let control_size = control_size(ancbufsize)?;
        let mut data = zeroed((bufsize as usize).min(syscall::MAX_RECV))?;
        // SAFETY: `data` outlives the call and is not touched until it returns.
        let iov = unsafe { syscall::IoVecs::new([(data.as_mut_ptr(), data.len())]) };
        let (got, control) = self.receive_msg(py, &iov, control_size, flags)?;
        // With MSG_TRUNC a datagram's full length may exceed what was received.
        data.truncate(got.len);
        let ancdata = ancillary_to_python(py, &control)?;
        let address = self.sender(py, &got.addr)?;
        PyTuple::new(
            py,
            [
                PyBytes::new(py, &data).into_any(),
                ancdata.into_any(),
                got.flags.into_pyobject(py)?.into_any(),
                address,
            ],
        )
    }

    /// `recvmsg_into(buffers[, ancbufsize[, flags]])`: scatter into writable buffers;
    /// `(nbytes, ancdata, msg_flags, address)`.
    #[pyo3(signature = (buffers, ancbufsize = 0, flags = 0, /))]
    fn recvmsg_into<'py>(
        &self,
        py: Python<'py>,
        buffers: &Bound<'py, PyAny>,
        ancbufsize: isize,
        flags: i32,
    ) -> PyResult<Bound<'py, PyTuple>> {
        const NOT_WRITABLE: &str =
            "recvmsg_into() argument 1 must be an iterable of single-segment read-write buffers";
        let pinned = items_of(buffers, "recvmsg_into() argument 1 must be an iterable")?
            .iter()
            .map(|b| {
                RawBuffer::writable(b, "recvmsg_into() argument 1")
                    .map_err(|_| PyTypeError::new_err(NOT_WRITABLE))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let control_size = control_size(ancbufsize)?;
        // SAFETY: every buffer stays exported (pinned, writable) until `pinned` drops,
        // after the call.
        let iov = unsafe { syscall::IoVecs::new(pinned.iter().map(|b| (b.ptr().get(), b.len()))) };
        let (got, control) = self.receive_msg(py, &iov, control_size, flags)?;
        drop(pinned);
        let ancdata = ancillary_to_python(py, &control)?;
        let address = self.sender(py, &got.addr)?;
        PyTuple::new(
            py,
            [
                got.len.into_pyobject(py)?.into_any(),
                ancdata.into_any(),
                got.flags.into_pyobject(py)?.into_any(),
                address,
            ],
        )
    }

    /// `recvfrom_into(buffer[, nbytes[, flags]])`: `(nbytes, address)`.
    #[pyo3(signature = (buffer, nbytes = 0, flags = 0))]
    fn recvfrom_into<'py>(
        &self,
        py: Python<'py>,
        buffer: &Bound<'py, PyAny>,
        nbytes: isize,
        flags: i32,
    ) -> PyResult<(usize, Bound<'py, PyAny>)> {
        let buf = RawBuffer::writable(buffer, "recvfrom_into() argument 1")?;
        if nbytes < 0 {
            return Err(PyValueError::new_err(
                "negative buffersize in recvfrom_into",
            ));
        }
        let n = match nbytes as usize {
            0 => buf.len(),
            n if n > buf.len() => {
                return Err(PyValueError::new_err(
                    "nbytes is greater than the length of the buffer",
                ))
            }
            n => n,
        };
        // SAFETY: `buf` pins `n` writable bytes until after the call.
        let iov = unsafe { syscall::IoVecs::new([(buf.ptr().get(), n)]) };
        let (got, _) = self.receive_msg(py, &iov, 0, flags)?;
        drop(buf);
        Ok((got.len, self.sender(py, &got.addr)?))
    }

    /// `sendmsg(buffers[, ancdata[, flags[, address]]])`: gather-send the buffers with
    /// ancillary data (`(level, type, data)` items); returns the bytes sent. Arguments
    /// are checked in the stdlib's order: flags, address, buffers, ancillary data.
    #[pyo3(signature = (buffers, *rest))]
    fn sendmsg(
        &self,
        py: Python<'_>,
        buffers: &Bound<'_, PyAny>,
        rest: &Bound<'_, PyTuple>,
    ) -> PyResult<usize> {
        if rest.len() > 3 {
            return Err(PyTypeError::new_err(format!(
                "sendmsg() takes at most 4 arguments ({} given)",
                rest.len() + 1
            )));
        }
        let ancdata = rest.get_item(0).ok();
        let flags: i32 = match rest.get_item(1) {
            Ok(f) => f.extract()?,
            Err(_) => 0,
        };
        let addr = match rest.get_item(2) {
            Ok(a) if !a.is_none() => Some(address::from_python(&a, self.core.family)?),
            _ => None,
        };
        let data = items_of(buffers, "sendmsg() argument 1 must be an iterable")?
            .iter()
            .map(|b| RawBuffer::get(b, false))
            .collect::<PyResult<Vec<_>>>()?;
        let items = match &ancdata {
            Some(a) => items_of(a, "sendmsg() argument 2 must be an iterable")?
                .iter()
                .map(control_item)
                .collect::<PyResult<Vec<_>>>()?,
            None => Vec::new(),
        };
        let control = syscall::build_control(
            &items
                .iter()
                .map(|(level, kind, d)| (*level, *kind, d.as_slice()))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| PyOverflowError::new_err(e.message()))?;
        // SAFETY: every buffer stays exported until `data` drops, after the call; the
        // kernel only reads them.
        let iov = unsafe { syscall::IoVecs::new(data.iter().map(|b| (b.ptr().get(), b.len()))) };
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let sent = blocking(py, || {
            syscall::sendmsg(
                usage.fd,
                &iov,
                &control,
                addr.as_ref(),
                flags,
                mode,
                deadline,
            )
        });
        drop(usage);
        drop(items);
        drop(data);
        sent
    }

    /// Whether the descriptor stays open across `exec` (as `os.get_inheritable`).
    fn get_inheritable(&self) -> PyResult<bool> {
        let usage = self.core.begin()?;
        Ok(syscall::get_inheritable(usage.fd)?)
    }

    /// Set whether the descriptor stays open across `exec` (as `os.set_inheritable`,
    /// which takes an int).
    fn set_inheritable(&self, inheritable: i32) -> PyResult<()> {
        let usage = self.core.begin()?;
        Ok(syscall::set_inheritable(usage.fd, inheritable != 0)?)
    }

    #[pyo3(signature = (data, flags = 0))]
    fn send(&self, py: Python<'_>, data: &Bound<'_, PyAny>, flags: i32) -> PyResult<usize> {
        let buf = RawBuffer::get(data, false)?;
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let bytes = buf.as_slice();
        blocking(py, || syscall::send(usage.fd, bytes, flags, mode, deadline))
    }

    #[pyo3(signature = (data, flags = 0))]
    fn sendall(&self, py: Python<'_>, data: &Bound<'_, PyAny>, flags: i32) -> PyResult<()> {
        let buf = RawBuffer::get(data, false)?;
        send_all(py, &self.core, buf.as_slice(), flags)
    }

    /// `sendto(data, address)` or `sendto(data, flags, address)`.
    #[pyo3(signature = (data, flags_or_address, address = None))]
    fn sendto(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        flags_or_address: &Bound<'_, PyAny>,
        address: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let (flags, address) = match address {
            Some(a) => (flags_or_address.extract::<i32>()?, a),
            None => (0, flags_or_address),
        };
        let buf = RawBuffer::get(data, false)?;
        let addr = address::from_python(address, self.core.family)?;
        let usage = self.core.begin()?;
        let mode = self.core.mode();
        let deadline = mode.deadline();
        let bytes = buf.as_slice();
        blocking(py, || {
            syscall::sendto(usage.fd, bytes, flags, &addr, mode, deadline)
        })
    }

    /// Send a file's contents with `sendfile(2)` when it has a descriptor, else by reading
    /// it; returns the byte count and leaves the file positioned after the sent data.
    #[pyo3(signature = (file, offset = 0, count = None))]
    fn sendfile(
        &self,
        py: Python<'_>,
        file: &Bound<'_, PyAny>,
        offset: i64,
        count: Option<i64>,
    ) -> PyResult<u64> {
        if offset < 0 {
            return Err(PyValueError::new_err(format!(
                "offset must be >= 0, got {offset}"
            )));
        }
        if let Some(c) = count {
            if c <= 0 {
                return Err(PyValueError::new_err(format!(
                    "count must be a positive integer (got {c})"
                )));
            }
        }
        // sendfile(2) has no per-call non-blocking flag: with a timeout (or non-blocking)
        // the read-and-send path below, which honours the mode, does the work instead.
        let zero_copy = self.core.mode() == Mode::Blocking;
        // The file's number belongs to the file object, which another thread may close
        // while the send goes on: the send uses a duplicate of its own (a number that
        // cannot be dup'ed is no descriptor to send from: read instead, as the stdlib
        // falls back when `fstat` fails).
        if let Some(file_fd) = file
            .call_method0("fileno")
            .and_then(|f| f.extract::<RawFd>())
            .ok()
            .filter(|_| zero_copy)
            .and_then(|fd| syscall::duplicate(fd).ok())
            .map(crate::sys::closer::ReleasedFd::new)
        {
            if offset > 0 || file.hasattr("seek")? {
                file.call_method1("seek", (offset,))?;
            }
            let usage = self.core.begin()?;
            let mode = self.core.mode();
            let deadline = mode.deadline();
            let mut off = offset as libc::off_t;
            let mut total: u64 = 0;
            let limit = count.map(|c| c as u64);
            let result = blocking(py, || loop {
                let want = match limit {
                    Some(l) if total >= l => return Ok(()),
                    Some(l) => (l - total).min(1 << 30) as usize,
                    None => 1 << 30,
                };
                // SAFETY: both descriptors are open for the call; off is ours.
                let n = unsafe { libc::sendfile(usage.fd, file_fd.as_raw_fd(), &mut off, want) };
                if n > 0 {
                    total += n as u64;
                    if mode == Mode::Blocking && limit.is_none_or(|l| total < l) {
                        // Short on a blocking socket: a signal, or the end of the file.
                        // Either way, run the signal handlers before going on.
                        return Err(Error::Interrupted);
                    }
                    continue;
                }
                if n == 0 {
                    return Ok(());
                }
                let err = Error::last_os();
                match (&err, mode) {
                    (Error::Os(libc::EAGAIN), Mode::Timeout(_)) => {
                        syscall::wait_fd(usage.fd, libc::POLLOUT, deadline)?
                    }
                    _ => return Err(err),
                }
            });
            drop(usage);
            drop(file_fd);
            if total > 0 {
                file.call_method1("seek", (offset as u64 + total,))?;
            }
            result?;
            return Ok(total);
        }
        // No descriptor: read and send in blocks, as socket.socket.sendfile falls back.
        if offset > 0 {
            file.call_method1("seek", (offset,))?;
        }
        let mut total: u64 = 0;
        loop {
            let want = match count {
                Some(c) if total >= c as u64 => break,
                Some(c) => ((c as u64 - total) as usize).min(1 << 16),
                None => 1 << 16,
            };
            let chunk = file.call_method1("read", (want,))?;
            let buf = RawBuffer::get(&chunk, false)?;
            if buf.len() == 0 {
                break;
            }
            send_all(py, &self.core, buf.as_slice(), 0)?;
            total += buf.len() as u64;
        }
        Ok(total)
    }

    /// Like `socket.socket.makefile`, mode for mode and type for type as far as a
    /// handler can tell: buffered `'rb'` is the engine's own reader and buffered
    /// `'wb'` its own writer (both `io.BufferedIOBase`); `buffering=0` gives the
    /// stdlib's raw `socket.SocketIO` over this connection; `'rwb'` an
    /// `io.BufferedRWPair` over one; text modes wrap the binary file in
    /// `io.TextIOWrapper`.
    #[pyo3(signature = (mode = "r", buffering = None, *, encoding = None, errors = None, newline = None))]
    fn makefile<'py>(
        slf: &Bound<'py, Self>,
        mode: &str,
        buffering: Option<isize>,
        encoding: Option<&Bound<'py, PyAny>>,
        errors: Option<&Bound<'py, PyAny>>,
        newline: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        if !mode.chars().all(|c| "rwb".contains(c)) {
            return Err(PyValueError::new_err(format!(
                "invalid mode {mode:?} (only r, w, b allowed)"
            )));
        }
        let writing = mode.contains('w');
        let reading = mode.contains('r') || !writing;
        let binary = mode.contains('b');
        let size = match buffering {
            Some(n) if n >= 0 => n as usize,
            _ => DEFAULT_BUFFER_SIZE,
        };
        if size == 0 && !binary {
            return Err(PyValueError::new_err("unbuffered streams must be binary"));
        }
        let core = &slf.get().core;
        let io = py.import("io")?;
        let file: Bound<'py, PyAny> = if size > 0 && !(reading && writing) {
            if reading {
                Bound::new(py, SocketReader::new(core.clone(), size))?.into_any()
            } else {
                Bound::new(py, SocketWriter::new(core.clone(), size))?.into_any()
            }
        } else {
            let rawmode = if reading && writing {
                "rw"
            } else if reading {
                "r"
            } else {
                "w"
            };
            let raw = py
                .import("socket")?
                .getattr("SocketIO")?
                .call1((slf, rawmode))?;
            // The raw file's close() gives the reference back (`_decref_socketios`).
            core.add_io_ref();
            if size == 0 {
                return Ok(raw);
            }
            io.getattr("BufferedRWPair")?.call1((&raw, &raw, size))?
        };
        if binary {
            return Ok(file);
        }
        let encoding = io.call_method1("text_encoding", (encoding,))?;
        let text = io
            .getattr("TextIOWrapper")?
            .call1((file, encoding, errors, newline))?;
        text.setattr("mode", mode)?;
        Ok(text)
    }

    /// A file made by `makefile()` was closed: the connection closes for real when it
    /// was closed itself before and no other such file is open (as `socket.socket`).
    fn _decref_socketios(&self, py: Python<'_>) {
        if self.core.drop_io_ref() {
            py.detach(|| self.core.close_now());
        }
    }

    #[pyo3(signature = (value))]
    fn settimeout(&self, value: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.core.set_mode(parse_timeout(value)?);
        Ok(())
    }

    fn gettimeout(&self) -> Option<f64> {
        mode_to_python(self.core.mode())
    }

    #[getter]
    fn timeout(&self) -> Option<f64> {
        mode_to_python(self.core.mode())
    }

    fn setblocking(&self, flag: bool) {
        self.core.set_mode(if flag {
            Mode::Blocking
        } else {
            Mode::NonBlocking
        });
    }

    fn getblocking(&self) -> bool {
        self.core.mode() != Mode::NonBlocking
    }

    #[pyo3(signature = (level, optname, value, optlen = None))]
    fn setsockopt(
        &self,
        level: i32,
        optname: i32,
        value: &Bound<'_, PyAny>,
        optlen: Option<u32>,
    ) -> PyResult<()> {
        let usage = self.core.begin()?;
        let rc = if value.is_none() {
            let len = optlen.ok_or_else(|| {
                PyTypeError::new_err("setsockopt() takes an optlen with a None value")
            })?;
            // SAFETY: a NULL value with a length is what the kernel accepts for this form.
            unsafe { libc::setsockopt(usage.fd, level, optname, std::ptr::null(), len) }
        } else if let Ok(v) = value.extract::<i32>() {
            // SAFETY: an int option value of its size.
            unsafe {
                libc::setsockopt(
                    usage.fd,
                    level,
                    optname,
                    (&v as *const i32).cast(),
                    std::mem::size_of::<i32>() as u32,
                )
            }
        } else {
            let buf = RawBuffer::get(value, false)?;
            let bytes = buf.as_slice();
            // SAFETY: the buffer is valid for its length.
            unsafe {
                libc::setsockopt(
                    usage.fd,
                    level,
                    optname,
                    bytes.as_ptr().cast(),
                    bytes.len() as u32,
                )
            }
        };
        syscall::check(rc)?;
        Ok(())
    }

    #[pyo3(signature = (level, optname, buflen = None))]
    fn getsockopt(
        &self,
        py: Python<'_>,
        level: i32,
        optname: i32,
        buflen: Option<usize>,
    ) -> PyResult<Py<PyAny>> {
        let usage = self.core.begin()?;
        match buflen {
            None | Some(0) => {
                let mut v: i32 = 0;
                let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
                // SAFETY: v is an int-sized output.
                syscall::check(unsafe {
                    libc::getsockopt(
                        usage.fd,
                        level,
                        optname,
                        (&mut v as *mut i32).cast(),
                        &mut len,
                    )
                })?;
                Ok(v.into_pyobject(py)?.into_any().unbind())
            }
            Some(n) => {
                if n > 1024 {
                    return Err(Error::Os(libc::EINVAL).into());
                }
                let mut buf = vec![0u8; n];
                let mut len = n as libc::socklen_t;
                // SAFETY: buf is n bytes.
                syscall::check(unsafe {
                    libc::getsockopt(usage.fd, level, optname, buf.as_mut_ptr().cast(), &mut len)
                })?;
                Ok(PyBytes::new(py, &buf[..len as usize]).into_any().unbind())
            }
        }
    }

    fn getpeername(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.name(py, true)
    }

    fn getsockname(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.name(py, false)
    }

    fn shutdown(&self, py: Python<'_>, how: i32) -> PyResult<()> {
        let usage = self.core.begin()?;
        // shutdown(2) runs the peer's TCP path: do it detached (ARCHITECTURE.md, The GIL rule).
        let rc = py.detach(|| unsafe { libc::shutdown(usage.fd, how) });
        syscall::check(rc)?;
        Ok(())
    }

    /// Read this connection's PROXY protocol header under `policy` (the server's
    /// compatible path, where its own hooks run): the client address the handler should
    /// see (`client_address` itself for a LOCAL or UNKNOWN header), or None when the
    /// header was refused (the caller then ends the request as a refused one).
    fn _read_proxy_header(
        &self,
        py: Python<'_>,
        policy: &Bound<'_, ProxyPolicy>,
        client_address: Py<PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let usage = self.core.begin()?;
        let peer = syscall::sock_name(usage.fd, true)?;
        let Some(client) = policy.get().admit(py, usage.fd, &peer)? else {
            return Ok(None);
        };
        drop(usage);
        // The peer itself (no header address): keep the object the caller has.
        let same = client.len == peer.len
            && client.storage.ss_family == peer.storage.ss_family
            && address::to_python(py, &client)?.eq(address::to_python(py, &peer)?)?;
        if same {
            return Ok(Some(client_address));
        }
        Ok(Some(address::to_python(py, &client)?.unbind()))
    }

    /// Close the connection; the descriptor itself closes once files made from it close.
    fn close(&self, py: Python<'_>) {
        if self.core.owner_close() {
            py.detach(|| self.core.close_now());
        }
    }

    /// Give up the descriptor without closing it and return it (-1 when closed). While
    /// another thread waits on the connection the caller gets a duplicate, and the
    /// waiter an OSError(EBADF) at its next system call, as on a detached
    /// `socket.socket` (see `SocketCore::detach`).
    fn detach(&self) -> PyResult<RawFd> {
        let fd = self.core.detach()?;
        self.core.owner_close();
        Ok(fd)
    }

    fn fileno(&self) -> RawFd {
        self.core.fileno()
    }

    /// A genuine `socket.socket` on a duplicate of the descriptor.
    fn dup<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let usage = self.core.begin()?;
        // SAFETY: duplicating an open descriptor, close-on-exec like Python's sockets.
        let fd = syscall::check(unsafe { libc::fcntl(usage.fd, libc::F_DUPFD_CLOEXEC, 0) })?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("fileno", fd)?;
        let sock = py.import("socket")?.getattr("socket")?.call(
            (self.core.family, self.core.kind, self.core.proto),
            Some(&kwargs),
        );
        if sock.is_err() {
            // SAFETY: the duplicate is ours and unused.
            unsafe { libc::close(fd) };
        }
        let sock = sock?;
        sock.call_method1("settimeout", (self.gettimeout(),))?;
        Ok(sock)
    }

    #[getter]
    fn family<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("socket")?
            .getattr("AddressFamily")?
            .call1((self.core.family,))
    }

    #[getter]
    fn r#type<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("socket")?
            .getattr("SocketKind")?
            .call1((self.core.kind,))
    }

    #[getter]
    fn proto(&self) -> i32 {
        self.core.proto
    }

    #[getter]
    fn _closed(&self) -> bool {
        self.core.owner_closed()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) {
        self.close(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let fd = self.core.fileno();
        let mut s = format!(
            "<fastsocketserver.Connection fd={fd}, family={}, type={}, proto={}",
            self.core.family, self.core.kind, self.core.proto
        );
        if fd >= 0 {
            if let Ok(local) = self.name(py, false) {
                s.push_str(&format!(
                    ", laddr={}",
                    local
                        .bind(py)
                        .repr()
                        .map(|r| r.to_string())
                        .unwrap_or_default()
                ));
            }
            if let Ok(peer) = self.name(py, true) {
                s.push_str(&format!(
                    ", raddr={}",
                    peer.bind(py)
                        .repr()
                        .map(|r| r.to_string())
                        .unwrap_or_default()
                ));
            }
        }
        s.push('>');
        s
    }
}
