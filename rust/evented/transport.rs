//! Transports of the event-driven path: what `asyncio.Protocol` handlers write to.
//!
//! A transport is a thin face on its connection's [`Channel`] (channel.rs): `write()`
//! and `sendto()` queue there, make no system call, and the loop sends in its next GIL
//! release; `close()`, `abort()`, `write_eof()` and the reading switches leave their
//! request there too. What the transport adds: asyncio's write-buffer limits as Python
//! numbers, the pause half of flow control with its one send (see
//! [`TransportCore::maybe_pause`]), `set_protocol()`, and the extra info.

use crate::bridge::address;
use crate::bridge::buffer::RawBuffer;
use crate::bridge::wait::{detached, lock};
use crate::evented::channel::{Channel, DEFAULT_HIGH_WATER};
use crate::sys::syscall::RawAddr;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::PyClass;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The `get_extra_info('socket')` objects: a `socket.socket` on a duplicate of the
/// descriptor, and the `asyncio.trsock.TransportSocket` that wraps it.
pub struct ExtraSocket {
    socket: Py<PyAny>,
    wrapper: Py<PyAny>,
}

/// The limit objects `set_write_buffer_limits()` computed, as Python numbers.
pub struct WriteLimits {
    low: Py<PyAny>,
    high: Py<PyAny>,
}

/// Shared by the stream and datagram transports.
pub struct TransportCore {
    pub chan: Arc<Channel>,
    pub protocol: Mutex<Py<PyAny>>,
    /// Bumped by each `set_protocol()`: the loop re-reads `protocol` (and how it takes
    /// data) only when this differs from what it saw last, one atomic load per event.
    pub protocol_gen: AtomicU64,
    pub peername: Py<PyAny>,
    pub sockname: Py<PyAny>,
    /// `get_extra_info('socket')`, made on first request: a `socket.socket` on a
    /// duplicate of the descriptor, and the `asyncio.trsock.TransportSocket` that wraps
    /// it (what the protocol gets: it refuses I/O, as asyncio's and uvloop's do).
    pub socket: Mutex<Option<ExtraSocket>>,
    /// The descriptor's number. The loop owns the descriptor (a connection's slot, or
    /// the server's socket for a datagram endpoint); this number is only duplicated
    /// under the channel's lock while the channel is open, and the loop closes it under
    /// that lock after marking the channel closed.
    pub fd: std::os::fd::RawFd,
    /// `on_error(transport, address, exc)`: the server's report of a callback's
    /// exception (its `handle_error`).
    pub on_error: Py<PyAny>,
    /// The `(low, high)` objects `set_write_buffer_limits()` last computed, returned as
    /// they are by `get_write_buffer_limits()` (ints stay ints, floats floats); None
    /// until it is called.
    pub limits: Mutex<Option<WriteLimits>>,
    pub family: i32,
    pub kind: i32,
    pub proto: i32,
}

impl TransportCore {
    /// asyncio's pause check, after every write and `set_write_buffer_limits()`: the
    /// protocol's `pause_writing()` is called once when the buffer rises above the
    /// high-water mark (and not again until `resume_writing()`).
    ///
    /// asyncio's buffer holds only what the socket did not take: its `write()` sends at
    /// once. Here `write()` queues and the loop sends in its next I/O phase, so before
    /// pausing, a stream transport offers the queue to the socket (one GIL release,
    /// only when the queue passed the mark): the protocol is paused only when the
    /// kernel is full, exactly when asyncio's would be. A failed `pause_writing()` goes
    /// to the server's error handler (asyncio: the loop's exception handler); the
    /// connection stays open; `KeyboardInterrupt`/`SystemExit` propagate.
    fn maybe_pause(&self, transport: &Bound<'_, BaseTransport>) -> PyResult<()> {
        let py = transport.py();
        if !self.chan.lock(py).over_high_water() {
            return Ok(());
        }
        if self.kind == libc::SOCK_STREAM {
            detached(py, || self.send_queued());
        }
        let pause = self.chan.lock(py).pause_writing_due();
        if !pause {
            return Ok(());
        }
        let protocol = lock(py, &self.protocol).clone_ref(py);
        match crate::error::catch_panic(|| protocol.call_method0(py, "pause_writing")) {
            Ok(_) => Ok(()),
            Err(err) if crate::error::is_handled(py, &err) => self.report(transport, err),
            Err(err) => Err(err),
        }
    }

    /// Send what the socket takes of the queue now, without waiting (detached). Under
    /// the channel's lock, as the loop's own sends: while the channel is open, `fd` is
    /// the loop's open descriptor. A send error is left for the loop's next send to
    /// meet again and end the connection.
    fn send_queued(&self) {
        let mut st = self.chan.lock_detached();
        if st.closed() || st.aborting() {
            return;
        }
        let _ = st.send_out(self.fd);
    }

    /// Report an exception of a flow-control callback: `on_error(transport, peer, exc)`.
    pub fn report(&self, transport: &Bound<'_, BaseTransport>, err: PyErr) -> PyResult<()> {
        let py = transport.py();
        self.on_error
            .call1(
                py,
                (
                    transport,
                    self.peername.clone_ref(py),
                    err.value(py).clone(),
                ),
            )
            .map(drop)
    }

    fn get_extra_info(
        &self,
        py: Python<'_>,
        name: &str,
        default: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        Ok(match name {
            "peername" => self.peername.clone_ref(py),
            "sockname" => self.sockname.clone_ref(py),
            "socket" => match self.transport_socket(py)? {
                Some(sock) => sock,
                None => default.unwrap_or_else(|| py.None()),
            },
            _ => default.unwrap_or_else(|| py.None()),
        })
    }

    /// The `get_extra_info('socket')` object: made once, while the connection is open;
    /// afterwards the one made before (closed by then: `fileno()` is -1), or None.
    fn transport_socket(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        if let Some(made) = lock(py, &self.socket).as_ref() {
            return Ok(Some(made.wrapper.clone_ref(py)));
        }
        let Some(dup) = detached(py, || self.duplicate())? else {
            return Ok(None);
        };
        let socket = py.import("socket")?.getattr("socket")?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("fileno", dup.as_raw_fd())?;
        let sock = socket.call((self.family, self.kind, self.proto), Some(&kwargs))?;
        // The socket object owns the duplicate now.
        let _ = dup.into_raw_fd();
        let wrapper = py
            .import("asyncio.trsock")?
            .getattr("TransportSocket")?
            .call1((&sock,))?;
        let made = ExtraSocket {
            socket: sock.unbind(),
            wrapper: wrapper.unbind(),
        };
        let (kept, extra) = {
            let mut slot = lock(py, &self.socket);
            match slot.as_ref() {
                // Another thread made one meanwhile: keep that one.
                Some(other) => (other.wrapper.clone_ref(py), Some(made)),
                None => {
                    let kept = made.wrapper.clone_ref(py);
                    *slot = Some(made);
                    (kept, None)
                }
            }
        };
        if let Some(extra) = extra {
            extra.socket.call_method0(py, "close")?;
        }
        // The connection may have ended while this one was made, and its release()
        // may have run before the socket was stored: then close it here (closing it
        // twice is harmless).
        if self.chan.lock(py).closed() {
            self.drop_socket(py);
        }
        Ok(Some(kept))
    }

    /// Duplicate the descriptor, close-on-exec, if the channel is still open. Detached:
    /// the channel's lock is taken and released here, so the loop cannot close the
    /// descriptor between the check and the duplicate.
    fn duplicate(&self) -> crate::error::Result<Option<OwnedFd>> {
        let st = self.chan.lock_detached();
        if st.closed() {
            return Ok(None);
        }
        // The channel is open, so `fd` is the loop's open descriptor, and it stays open
        // while this lock is held.
        let dup = crate::sys::syscall::duplicate(self.fd)?;
        drop(st);
        Ok(Some(dup))
    }

    /// At the connection's end: forget the protocol (as asyncio does, so that the usual
    /// protocol <-> transport cycle does not keep both alive) and close the
    /// `get_extra_info('socket')` object, if one was made.
    pub fn release(&self, py: Python<'_>) {
        let protocol = std::mem::replace(&mut *lock(py, &self.protocol), py.None());
        drop(protocol);
        self.drop_socket(py);
    }

    /// Close the `get_extra_info('socket')` object, if one was made (connection end).
    /// The wrapper stays usable (it reports `fileno() == -1`, as asyncio's does).
    pub fn drop_socket(&self, py: Python<'_>) {
        let made = lock(py, &self.socket)
            .as_ref()
            .map(|made| made.socket.clone_ref(py));
        if let Some(sock) = made {
            let _ = sock.call_method0(py, "close");
        }
    }

    pub fn close(&self, py: Python<'_>) {
        self.chan.close(py)
    }

    pub fn abort(&self, py: Python<'_>) {
        self.chan.abort(py)
    }

    fn is_closing(&self, py: Python<'_>) -> bool {
        self.chan.lock(py).is_closing()
    }
}

/// `set_write_buffer_limits()` as asyncio computes it, with Python's own operators (so
/// ints, floats and other numbers behave, and fail, as there): `high` defaults to 64 KiB
/// (or `4 * low`), `low` to `high // 4`, and `high >= low >= 0` must hold. Returns the
/// `(low, high)` objects.
fn write_limits<'py>(
    py: Python<'py>,
    high: Option<Bound<'py, PyAny>>,
    low: Option<Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let high = match (high, &low) {
        (Some(high), _) => high,
        (None, None) => DEFAULT_HIGH_WATER.into_pyobject(py)?.into_any(),
        (None, Some(low)) => 4i64.into_pyobject(py)?.mul(low)?,
    };
    let low = match low {
        Some(low) => low,
        None => high.floor_div(4i64)?,
    };
    if !(high.ge(&low)? && low.ge(0i64)?) {
        return Err(PyValueError::new_err(format!(
            "high ({}) must be >= low ({}) must be >= 0",
            high.repr()?,
            low.repr()?
        )));
    }
    Ok((low, high))
}

/// A limit as a number the queue's size is compared with; one too large for a float
/// (a huge int: it is >= 0 here) is infinite.
fn limit_value(limit: &Bound<'_, PyAny>) -> PyResult<f64> {
    match limit.extract::<f64>() {
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyOverflowError>(limit.py()) => {
            Ok(f64::INFINITY)
        }
        other => other,
    }
}

/// What every transport has (`asyncio.BaseTransport` and the write-buffer methods of
/// `asyncio.WriteTransport`); `Transport` and `DatagramTransport` extend it.
#[pyclass(module = "fastsocketserver._core", frozen, subclass, weakref)]
pub struct BaseTransport {
    pub core: TransportCore,
}

#[pymethods]
impl BaseTransport {
    /// Close after the queued data is sent; `connection_lost(None)` follows.
    fn close(&self, py: Python<'_>) {
        self.core.close(py)
    }

    /// Close at once, dropping queued data; `connection_lost(None)` follows.
    fn abort(&self, py: Python<'_>) {
        self.core.abort(py)
    }

    fn is_closing(&self, py: Python<'_>) -> bool {
        self.core.is_closing(py)
    }

    /// What the socket has not taken, as asyncio reports it: a stream transport first
    /// offers its queue to the socket (one GIL release, only when something is queued;
    /// `write()` queues where asyncio's sends at once). Not while writing is paused:
    /// asyncio's buffer then shrinks only as its loop sends, so `pause_writing()`
    /// reads a size above the high-water mark, and so does ours.
    fn get_write_buffer_size(&self, py: Python<'_>) -> usize {
        let core = &self.core;
        let (queued, paused) = {
            let st = core.chan.lock(py);
            (st.pending(), st.writing_paused())
        };
        if queued == 0 || paused || core.kind != libc::SOCK_STREAM {
            return queued;
        }
        detached(py, || core.send_queued());
        core.chan.lock(py).pending()
    }

    fn get_write_buffer_limits(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if let Some(WriteLimits { low, high }) = lock(py, &self.core.limits).as_ref() {
            return Ok((low.clone_ref(py), high.clone_ref(py))
                .into_pyobject(py)?
                .into_any()
                .unbind());
        }
        let (low, high) = self.core.chan.lock(py).limits();
        let (low, high) = (low as usize, high as usize);
        Ok((low, high).into_pyobject(py)?.into_any().unbind())
    }

    #[pyo3(signature = (high = None, low = None))]
    fn set_write_buffer_limits(
        slf: &Bound<'_, Self>,
        high: Option<Bound<'_, PyAny>>,
        low: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let (low, high) = write_limits(py, high, low)?;
        let (low_value, high_value) = (limit_value(&low)?, limit_value(&high)?);
        let core = &slf.get().core;
        *lock(py, &core.limits) = Some(WriteLimits {
            low: low.unbind(),
            high: high.unbind(),
        });
        core.chan.lock(py).set_limits(low_value, high_value);
        core.maybe_pause(slf)
    }

    #[pyo3(signature = (name, default = None))]
    fn get_extra_info(
        &self,
        py: Python<'_>,
        name: &str,
        default: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        self.core.get_extra_info(py, name, default)
    }

    fn get_protocol(&self, py: Python<'_>) -> Py<PyAny> {
        lock(py, &self.core.protocol).clone_ref(py)
    }

    /// Every later callback goes to `protocol` (asyncio: also whether data comes
    /// through `data_received` or a `BufferedProtocol`'s buffers); the loop sees the
    /// new generation before its next callback for this transport.
    fn set_protocol(&self, py: Python<'_>, protocol: Py<PyAny>) {
        *lock(py, &self.core.protocol) = protocol;
        self.core.protocol_gen.fetch_add(1, Ordering::AcqRel);
    }
}

/// The transport of one stream connection (`asyncio.Transport`'s methods).
#[pyclass(module = "fastsocketserver._core", frozen, extends = BaseTransport)]
pub struct Transport;

impl Transport {
    pub fn create(py: Python<'_>, core: TransportCore) -> PyResult<Py<BaseTransport>> {
        let init = PyClassInitializer::from(BaseTransport { core }).add_subclass(Transport);
        Ok(Bound::new(py, init)?.into_super().unbind())
    }
}

fn core_of<'a, T: PyClass<BaseType = BaseTransport> + Sync>(
    slf: &'a Bound<'_, T>,
) -> &'a TransportCore {
    &slf.as_super().get().core
}

#[pymethods]
impl Transport {
    /// Queue `data` for sending; it goes out in the loop's next I/O phase.
    fn write(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = RawBuffer::get(data, false)?;
        write_slice(slf.as_super(), buf.as_slice())
    }

    fn writelines(slf: &Bound<'_, Self>, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut joined = Vec::new();
        for line in lines.try_iter()? {
            joined.extend_from_slice(RawBuffer::get(&line?, false)?.as_slice());
        }
        write_slice(slf.as_super(), &joined)
    }

    /// Close the write side once the queued data is sent.
    fn write_eof(slf: &Bound<'_, Self>) {
        core_of(slf).chan.write_eof(slf.py())
    }

    fn can_write_eof(&self) -> bool {
        true
    }

    fn pause_reading(slf: &Bound<'_, Self>) {
        core_of(slf).chan.pause_reading(slf.py())
    }

    fn resume_reading(slf: &Bound<'_, Self>) {
        core_of(slf).chan.resume_reading(slf.py())
    }

    fn is_reading(slf: &Bound<'_, Self>) -> bool {
        core_of(slf).chan.is_reading(slf.py())
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let py = slf.py();
        let core = core_of(slf);
        let peer = core
            .peername
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let state = if core.is_closing(py) {
            "closing"
        } else {
            "open"
        };
        format!("<fastsocketserver.Transport {state} peer={peer}>")
    }
}

/// Queue `data` on a stream transport (what `write()` does).
pub fn write_slice(transport: &Bound<'_, BaseTransport>, data: &[u8]) -> PyResult<()> {
    let py = transport.py();
    let core = &transport.get().core;
    if !core.chan.queue_bytes(py, data)? {
        return Ok(());
    }
    core.maybe_pause(transport)
}

/// Queue a datagram to `raw` on a datagram transport (what `sendto()` does).
///
/// Accepted until the endpoint has ended, also after `close()`/`abort()`: asyncio's
/// unconnected endpoint sends every `sendto` until its `connection_lost`, and the loop
/// sends what is queued here before it ends the endpoint. Ignored afterwards.
pub fn queue_datagram(
    transport: &Bound<'_, BaseTransport>,
    data: &[u8],
    raw: RawAddr,
) -> PyResult<()> {
    let py = transport.py();
    let core = &transport.get().core;
    if !core.chan.queue_datagram(py, data, raw) {
        return Ok(());
    }
    core.maybe_pause(transport)
}

/// The transport of a datagram server socket (`asyncio.DatagramTransport`'s methods).
#[pyclass(module = "fastsocketserver._core", frozen, extends = BaseTransport)]
pub struct DatagramTransport {
    family: i32,
}

impl DatagramTransport {
    pub fn create(py: Python<'_>, core: TransportCore) -> PyResult<Py<BaseTransport>> {
        let family = core.family;
        let init = PyClassInitializer::from(BaseTransport { core })
            .add_subclass(DatagramTransport { family });
        Ok(Bound::new(py, init)?.into_super().unbind())
    }
}

#[pymethods]
impl DatagramTransport {
    /// Queue one datagram for `addr`; it goes out in the loop's next I/O phase.
    #[pyo3(signature = (data, addr = None))]
    fn sendto(
        slf: &Bound<'_, Self>,
        data: &Bound<'_, PyAny>,
        addr: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let buf = RawBuffer::get(data, false)?;
        let Some(addr) = addr.filter(|a| !a.is_none()) else {
            return Err(PyValueError::new_err(
                "Invalid address: must be a destination for an unconnected socket",
            ));
        };
        let raw = address::from_python(addr, slf.get().family)?;
        queue_datagram(slf.as_super(), buf.as_slice(), raw)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> String {
        let py = slf.py();
        let local = core_of(slf)
            .sockname
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_default();
        format!("<fastsocketserver.DatagramTransport local={local}>")
    }
}
