//! Phase 2 of a round, the callback phase: attached, one GIL hold for the whole batch of
//! events the I/O phase recorded. It makes each connection's objects (transport,
//! protocol) and calls `connection_made`, `data_received` (or a `BufferedProtocol`'s
//! `get_buffer`/`buffer_updated`), `eof_received`, `connection_lost`,
//! `resume_writing`, `datagram_received` and `error_received`.
//!
//! `pause_reading()` is honoured at once: data (or the end of stream) already read in
//! the round that paused is held in the connection, and delivered, in order and before
//! anything read later, after `resume_reading()`.
//!
//! No system call is made here with the GIL held (a connection that cannot be made is
//! let go of detached). An exception from a callback goes to the server's
//! `handle_error` and aborts only that connection (as asyncio does);
//! `KeyboardInterrupt`/`SystemExit` propagate, and the events not yet dispatched are
//! kept for the next round, so nothing read is lost. What a callback asks of its
//! transport (a write, a close) is carried out by the next I/O phase.

use crate::bridge::address;
use crate::bridge::buffer::RawBuffer;
use crate::bridge::wait::{detached, lock};
use crate::error::{catch_panic, is_handled, Error};
use crate::evented::channel::Channel;
use crate::evented::event_loop::EventLoop;
use crate::evented::native::NativeEcho;
use crate::evented::state::{conn_mut, Conn, DatagramEndpoint, Event, LoopState, Lost, Sink};
use crate::evented::state::{FIRST_CONN, LISTENER};
use crate::evented::transport::{self, BaseTransport, DatagramTransport, Transport, TransportCore};
use crate::sys::syscall::{self, RawAddr};
use mio::unix::SourceFd;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The bound method `get_buffer(-1)` returned a buffer of: a writable contiguous
/// export, never empty (asyncio's `RuntimeError`); what the selector loop of asyncio
/// passes as the size hint is -1 (any size).
fn protocol_buffer<'py>(py: Python<'py>, get_buffer: &Py<PyAny>) -> PyResult<RawBuffer<'py>> {
    let buf = catch_panic(|| get_buffer.call1(py, (-1,)))?;
    let view = RawBuffer::writable(buf.bind(py), "get_buffer() result")?;
    if view.len() == 0 {
        return Err(PyRuntimeError::new_err(
            "get_buffer() returned an empty buffer",
        ));
    }
    Ok(view)
}

/// A protocol takes its data through `get_buffer()`/`buffer_updated()`: an instance of
/// `asyncio.BufferedProtocol` (what asyncio checks), or a duck-typed protocol with a
/// `get_buffer` and no `data_received`.
fn is_buffered(py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<bool> {
    let modules = py.import("sys")?.getattr("modules")?;
    if let Some(asyncio) = modules.get_item("asyncio").ok().filter(|m| !m.is_none()) {
        if let Ok(buffered) = asyncio.getattr("BufferedProtocol") {
            if protocol.is_instance(&buffered)? {
                return Ok(true);
            }
        }
    }
    Ok(!protocol.hasattr("data_received")? && protocol.hasattr("get_buffer")?)
}

/// How `protocol` takes received data.
fn make_sink(py: Python<'_>, protocol: &Py<PyAny>) -> PyResult<Sink> {
    Ok(if protocol.bind(py).is_instance_of::<NativeEcho>() {
        Sink::Native
    } else if is_buffered(py, protocol.bind(py))? {
        Sink::Buffered {
            get_buffer: protocol.getattr(py, "get_buffer")?,
            buffer_updated: protocol.getattr(py, "buffer_updated")?,
        }
    } else {
        Sink::Bytes(protocol.getattr(py, "data_received")?)
    })
}

/// Whether received data may go to the protocol now.
enum Gate {
    Open,
    /// Paused (or older data is held): keep it for `resume_reading()`.
    Hold,
    /// The transport is closing: nothing more is delivered.
    Drop,
}

impl Conn {
    /// The gate for data (or the end of stream) arriving now; `held_first`: data held
    /// earlier must go first (false when delivering that held data).
    fn gate(&self, py: Python<'_>, held_first: bool) -> Gate {
        let cs = self.chan.lock(py);
        if cs.is_closing() {
            Gate::Drop
        } else if cs.read_paused() || (held_first && (!self.held.is_empty() || self.held_eof)) {
            Gate::Hold
        } else {
            Gate::Open
        }
    }

    /// After `transport.set_protocol()`: every later callback goes to the new protocol,
    /// and its data the way it takes it (asyncio switches between `data_received` and
    /// a `BufferedProtocol`'s buffers too). One atomic load when nothing changed.
    /// Before the protocol is made there is nothing to switch. An error (the new
    /// protocol has no `data_received`, say) leaves no sink: nothing more is delivered.
    pub(super) fn refresh(&mut self, py: Python<'_>) -> PyResult<()> {
        let core = &self.transport.get().core;
        let gen = core.protocol_gen.load(Ordering::Acquire);
        if gen == self.gen || self.protocol.is_none() {
            return Ok(());
        }
        self.gen = gen;
        let protocol = lock(py, &core.protocol).clone_ref(py);
        self.sink = None;
        self.protocol = Some(protocol.clone_ref(py));
        self.sink = Some(make_sink(py, &protocol)?);
        Ok(())
    }

    /// Hand `data` to the protocol (the transport's current one: a callback may switch
    /// it between two buffers of a `BufferedProtocol`).
    fn deliver(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let mut rest = data;
        loop {
            self.refresh(py)?;
            let Some(taken) = self.deliver_some(py, rest)? else {
                return Ok(());
            };
            rest = &rest[taken..];
            if rest.is_empty() {
                return Ok(());
            }
            // buffer_updated() may have paused reading or closed the transport.
            match self.gate(py, false) {
                Gate::Open => {}
                Gate::Hold => {
                    self.held.splice(0..0, rest.iter().copied());
                    return Ok(());
                }
                Gate::Drop => return Ok(()),
            }
        }
    }

    /// One step of [`Conn::deliver`]: hand the sink what it takes of `data` at once
    /// (all of it, or one protocol buffer's worth). The bytes taken; None without a sink.
    fn deliver_some(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<Option<usize>> {
        Ok(Some(match self.sink.as_ref() {
            Some(Sink::Native) => {
                transport::write_slice(self.transport.bind(py), data)?;
                data.len()
            }
            Some(Sink::Bytes(on_data)) => {
                let bytes = PyBytes::new(py, data);
                catch_panic(|| on_data.call1(py, (bytes,)))?;
                data.len()
            }
            Some(Sink::Buffered {
                get_buffer,
                buffer_updated,
            }) => {
                let (get_buffer, buffer_updated) =
                    (get_buffer.clone_ref(py), buffer_updated.clone_ref(py));
                let view = protocol_buffer(py, &get_buffer)?;
                let n = view.len().min(data.len());
                // SAFETY: the export is writable, contiguous and `view.len()` >= n bytes
                // long; it stays pinned until `view` is dropped below, and it cannot
                // overlap `data`, which is the loop's own arena (or held bytes).
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), view.ptr().get(), n) };
                drop(view);
                catch_panic(|| buffer_updated.call1(py, (n,)))?;
                n
            }
            None => return Ok(None),
        }))
    }

    /// Before `eof_received()`: a buffered protocol is asked for a buffer first, as
    /// asyncio asks before the read that finds the end of stream (an empty one fails
    /// the connection there, with no `eof_received()`).
    fn before_eof(&self, py: Python<'_>) -> PyResult<()> {
        match self.sink.as_ref() {
            Some(Sink::Buffered { get_buffer, .. }) => protocol_buffer(py, get_buffer).map(drop),
            _ => Ok(()),
        }
    }
}

impl DatagramEndpoint {
    /// After `transport.set_protocol()`: the later callbacks go to the new protocol
    /// (one atomic load when nothing changed; nothing once `connection_lost` ran).
    pub(super) fn refresh(&mut self, py: Python<'_>) {
        let core = &self.transport.get().core;
        let gen = core.protocol_gen.load(Ordering::Acquire);
        if gen == self.gen || self.protocol.is_none() {
            return;
        }
        self.gen = gen;
        let protocol = lock(py, &core.protocol).clone_ref(py);
        self.native = protocol.bind(py).is_instance_of::<NativeEcho>();
        self.protocol = Some(protocol);
    }

    /// The protocol, while it is to get datagrams (the transport is not closing).
    fn receiving(&self, py: Python<'_>) -> Option<&Py<PyAny>> {
        let open = !self.chan.lock(py).is_closing();
        self.protocol.as_ref().filter(|_| open)
    }
}

impl EventLoop {
    /// Run the callbacks of the pending events; the arena is emptied once all ran.
    pub(super) fn dispatch(&self, py: Python<'_>, st: &mut LoopState) -> PyResult<()> {
        let result = self.dispatch_all(py, st);
        if st.pending.is_empty() {
            st.arena.clear();
        }
        result
    }

    fn dispatch_all(&self, py: Python<'_>, st: &mut LoopState) -> PyResult<()> {
        loop {
            if self.forked() {
                // A callback forked and this is the child, back from it: the rest of
                // the round's events are the parent's to handle, not this copy's.
                return Ok(());
            }
            let Some(event) = st.pending.pop_front() else {
                return Ok(());
            };
            match event {
                Event::Accepted {
                    token,
                    sock,
                    peer,
                    local,
                } => self.on_accepted(py, st, token, sock, &peer, &local)?,
                Event::Data { token, start, len } => self.on_data(py, st, token, start, len)?,
                Event::Eof { token } => self.on_eof(py, st, token, true)?,
                Event::Held { token } => self.on_held(py, st, token)?,
                Event::Resume { token } => self.on_resume(py, st, token)?,
                Event::Lost { token, why } => self.on_lost(py, st, token, why)?,
                Event::Datagram { start, len, from } => {
                    self.on_datagram(py, st, start, len, from)?
                }
                Event::DatagramError { code } => self.on_datagram_error(py, st, code)?,
                Event::ProxyRefused { peer, why } => {
                    if let Some(proxy) = &self.proxy {
                        proxy.get().refused(py, &peer, &why);
                    }
                }
            }
        }
    }

    /// Bytes received: to the protocol, or held while reading is paused.
    fn on_data(
        &self,
        py: Python<'_>,
        st: &mut LoopState,
        token: usize,
        start: usize,
        len: usize,
    ) -> PyResult<()> {
        let Some(conn) = conn_mut(&mut st.conns, token) else {
            return Ok(());
        };
        if let Err(err) = conn.refresh(py) {
            return self.after_callback(py, st, token, Err(err));
        }
        let LoopState { conns, arena, .. } = &mut *st;
        let Some(conn) = conn_mut(conns, token) else {
            return Ok(());
        };
        if conn.closed() || conn.sink.is_none() {
            return Ok(());
        }
        let data = &arena[start..start + len];
        match conn.gate(py, true) {
            Gate::Open => {}
            Gate::Hold => {
                conn.held.extend_from_slice(data);
                return Ok(());
            }
            Gate::Drop => return Ok(()),
        }
        let result = conn.deliver(py, data);
        self.after_callback(py, st, token, result)
    }

    /// A paused protocol's queue drained: `resume_writing()`.
    fn on_resume(&self, py: Python<'_>, st: &mut LoopState, token: usize) -> PyResult<()> {
        self.refresh(py, st, token);
        let protocol = if token == LISTENER.0 {
            st.datagram
                .as_ref()
                .and_then(|ep| ep.receiving(py).map(|p| p.clone_ref(py)))
        } else {
            conn_mut(&mut st.conns, token)
                .and_then(|c| c.protocol.as_ref().map(|p| p.clone_ref(py)))
        };
        match protocol {
            Some(protocol) => self.resume_writing(py, st, token, protocol),
            None => Ok(()),
        }
    }

    /// One datagram: `datagram_received(data, addr)` (a `NativeEcho` queues it back).
    fn on_datagram(
        &self,
        py: Python<'_>,
        st: &mut LoopState,
        start: usize,
        len: usize,
        from: RawAddr,
    ) -> PyResult<()> {
        self.refresh(py, st, LISTENER.0);
        let Some(ep) = st.datagram.as_ref() else {
            return Ok(());
        };
        let Some(protocol) = ep.receiving(py) else {
            return Ok(());
        };
        if ep.native {
            let data = &st.arena[start..start + len];
            let queued = transport::queue_datagram(ep.transport.bind(py), data, from);
            return self.after_callback(py, st, LISTENER.0, queued);
        }
        let data = PyBytes::new(py, &st.arena[start..start + len]);
        let addr = address::to_python(py, &from)?;
        let result =
            catch_panic(|| protocol.call_method1(py, "datagram_received", (data, addr))).map(drop);
        self.after_callback(py, st, LISTENER.0, result)
    }

    /// A datagram socket's error: `error_received(exc)`.
    fn on_datagram_error(&self, py: Python<'_>, st: &mut LoopState, code: i32) -> PyResult<()> {
        self.refresh(py, st, LISTENER.0);
        let Some(protocol) = st.datagram.as_ref().and_then(|ep| ep.receiving(py)) else {
            return Ok(());
        };
        let exc: PyErr = Error::Os(code).into();
        let result =
            catch_panic(|| protocol.call_method1(py, "error_received", (exc.value(py),))).map(drop);
        self.after_callback(py, st, LISTENER.0, result)
    }

    /// Before a flow-control or datagram callback: follow `set_protocol()` (see
    /// [`Conn::refresh`]; an unusable new sink is reported when data comes, not here).
    fn refresh(&self, py: Python<'_>, st: &mut LoopState, token: usize) {
        if token == LISTENER.0 {
            if let Some(ep) = st.datagram.as_mut() {
                ep.refresh(py);
            }
        } else if let Some(conn) = conn_mut(&mut st.conns, token) {
            let _ = conn.refresh(py);
        }
    }

    /// The peer's end of stream: `eof_received()`, unless reading is paused (then held
    /// for `resume_reading()`) or the transport is closing.
    fn on_eof(
        &self,
        py: Python<'_>,
        st: &mut LoopState,
        token: usize,
        held_first: bool,
    ) -> PyResult<()> {
        let Some(conn) = conn_mut(&mut st.conns, token) else {
            return Ok(());
        };
        if let Err(err) = conn.refresh(py) {
            return self.after_callback(py, st, token, Err(err));
        }
        let Some(conn) = conn_mut(&mut st.conns, token) else {
            return Ok(());
        };
        let Some(protocol) = conn.protocol.as_ref() else {
            return Ok(());
        };
        match conn.gate(py, held_first) {
            Gate::Open => {}
            Gate::Hold => {
                conn.held_eof = true;
                return Ok(());
            }
            Gate::Drop => return Ok(()),
        }
        let protocol = protocol.clone_ref(py);
        let result = conn
            .before_eof(py)
            .and_then(|()| catch_panic(|| protocol.call_method0(py, "eof_received")))
            .and_then(|keep| keep.is_truthy(py));
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                conn.transport.get().core.close(py);
                Ok(())
            }
            Err(err) => self.after_callback(py, st, token, Err(err)),
        }
    }

    /// Reading resumed: deliver what was held, then the held end of stream.
    fn on_held(&self, py: Python<'_>, st: &mut LoopState, token: usize) -> PyResult<()> {
        let Some(conn) = conn_mut(&mut st.conns, token) else {
            return Ok(());
        };
        if conn.closed() {
            return Ok(());
        }
        match conn.gate(py, false) {
            Gate::Open => {}
            Gate::Hold => return Ok(()), // paused again before this ran
            Gate::Drop => {
                conn.held = Vec::new();
                conn.held_eof = false;
                return Ok(());
            }
        }
        let data = std::mem::take(&mut conn.held);
        let eof = std::mem::take(&mut conn.held_eof);
        if !data.is_empty() {
            let result = conn.deliver(py, &data);
            self.after_callback(py, st, token, result)?;
        }
        if eof {
            // Paused again by that data_received: on_eof holds it once more.
            self.on_eof(py, st, token, false)?;
        }
        Ok(())
    }

    /// The shared part of a transport's making: this loop's error report and socket
    /// kind, no extra socket or limits yet.
    fn transport_core(
        &self,
        py: Python<'_>,
        chan: Arc<Channel>,
        protocol: Py<PyAny>,
        peername: Py<PyAny>,
        sockname: Py<PyAny>,
        fd: RawFd,
    ) -> TransportCore {
        TransportCore {
            chan,
            protocol: Mutex::new(protocol),
            protocol_gen: AtomicU64::new(0),
            peername,
            sockname,
            socket: Mutex::new(None),
            fd,
            on_error: self.on_error.clone_ref(py),
            limits: Mutex::new(None),
            family: self.family,
            kind: self.kind,
            proto: self.proto,
        }
    }

    /// A connection accepted: make its transport and slot, ask `verify`, make its
    /// protocol and call `connection_made`.
    fn on_accepted(
        &self,
        py: Python<'_>,
        st: &mut LoopState,
        token: usize,
        sock: OwnedFd,
        peer: &RawAddr,
        local: &RawAddr,
    ) -> PyResult<()> {
        let fd = sock.as_raw_fd();
        let chan = Arc::new(Channel::new(token, self.shared.clone()));
        let objects = (|| -> PyResult<(Py<PyAny>, Py<BaseTransport>)> {
            let addr = address::to_python(py, peer)?.unbind();
            let sockname = address::to_python(py, local)?.unbind();
            let core = self.transport_core(
                py,
                chan.clone(),
                py.None(),
                addr.clone_ref(py),
                sockname,
                fd,
            );
            Ok((addr, Transport::create(py, core)?))
        })();
        let (addr, transport) = match objects {
            Ok(objects) => objects,
            Err(err) => {
                // No connection object could be made (MemoryError, say): drop this
                // client, free its slot, and report like any per-connection failure.
                let poll = st.poll.as_ref();
                detached(py, || {
                    if let Some(poll) = poll {
                        let _ = poll.registry().deregister(&mut SourceFd(&fd));
                    }
                    drop(sock);
                });
                st.free.push(token);
                return self.report(py, py.None(), py.None(), err);
            }
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        st.conns[token - FIRST_CONN] = Some(Conn::new(
            sock,
            chan,
            transport.clone_ref(py),
            addr.clone_ref(py),
        ));
        if let Some(verify) = &self.verify {
            match catch_panic(|| verify.call1(py, (transport.clone_ref(py), addr.clone_ref(py))))
                .and_then(|ok| ok.is_truthy(py))
            {
                Ok(true) => {}
                Ok(false) => {
                    transport.get().core.abort(py);
                    return Ok(());
                }
                Err(err) => return self.after_callback(py, st, token, Err(err)),
            }
        }
        let made = catch_panic(|| self.make_protocol(py, st, token, &transport));
        self.after_callback(py, st, token, made)
    }

    /// The protocol of a new connection: made by the factory, set on the transport and
    /// the connection (with how it takes data), then `connection_made(transport)`.
    fn make_protocol(
        &self,
        py: Python<'_>,
        st: &mut LoopState,
        token: usize,
        transport: &Py<BaseTransport>,
    ) -> PyResult<()> {
        let protocol = self.factory.call0(py)?;
        *lock(py, &transport.get().core.protocol) = protocol.clone_ref(py);
        let sink = make_sink(py, &protocol)?;
        if let Some(conn) = conn_mut(&mut st.conns, token) {
            conn.protocol = Some(protocol.clone_ref(py));
            conn.sink = Some(sink);
            conn.gen = transport.get().core.protocol_gen.load(Ordering::Acquire);
        }
        protocol.call_method1(py, "connection_made", (transport.clone_ref(py),))?;
        Ok(())
    }

    /// The connection ended (its descriptor already closed): `connection_lost(exc)`,
    /// then its slot is free.
    fn on_lost(&self, py: Python<'_>, st: &mut LoopState, token: usize, why: Lost) -> PyResult<()> {
        if token == LISTENER.0 {
            return self.on_datagram_lost(py, st);
        }
        let Some(slot) = st.conns.get_mut(token - FIRST_CONN) else {
            return Ok(());
        };
        let Some(mut conn) = slot.take() else {
            return Ok(());
        };
        st.free.push(token);
        // The current protocol gets connection_lost, even if how it takes data is not
        // usable (that error was reported when data came).
        let _ = conn.refresh(py);
        let Some(protocol) = conn.protocol.take() else {
            conn.transport.get().core.release(py);
            return Ok(());
        };
        let exc: Option<PyErr> = match why {
            Lost::Clean => None,
            Lost::Os(code) => Some(Error::Os(code).into()),
            Lost::Timeout => Some(PyTimeoutError::new_err("connection idle timeout")),
            Lost::Callback => conn.error.take(),
        };
        let arg = exc
            .as_ref()
            .map(|e| e.value(py).clone().into_any().unbind())
            .unwrap_or_else(|| py.None());
        let result = catch_panic(|| protocol.call_method1(py, "connection_lost", (arg,))).map(drop);
        conn.transport.get().core.release(py);
        match result {
            Ok(()) => Ok(()),
            Err(err) if is_handled(py, &err) => self.report(
                py,
                conn.transport.clone_ref(py).into_any(),
                conn.addr.clone_ref(py),
                err,
            ),
            Err(err) => Err(err),
        }
    }

    /// The datagram endpoint ended (its transport closed): `connection_lost(None)`.
    fn on_datagram_lost(&self, py: Python<'_>, st: &mut LoopState) -> PyResult<()> {
        let Some(ep) = st.datagram.as_mut() else {
            return Ok(());
        };
        ep.refresh(py);
        let Some(protocol) = ep.protocol.take() else {
            return Ok(());
        };
        let transport = ep.transport.clone_ref(py);
        let result =
            catch_panic(|| protocol.call_method1(py, "connection_lost", (py.None(),))).map(drop);
        transport.get().core.release(py);
        match result {
            Ok(()) => Ok(()),
            Err(err) if is_handled(py, &err) => {
                self.report(py, transport.into_any(), py.None(), err)
            }
            Err(err) => Err(err),
        }
    }

    /// `resume_writing()`: a failure goes to `handle_error` and the connection stays
    /// open (asyncio sends it to the loop's exception handler and goes on);
    /// `KeyboardInterrupt`/`SystemExit` propagate.
    fn resume_writing(
        &self,
        py: Python<'_>,
        st: &mut LoopState,
        token: usize,
        protocol: Py<PyAny>,
    ) -> PyResult<()> {
        let Err(err) = catch_panic(|| protocol.call_method0(py, "resume_writing")) else {
            return Ok(());
        };
        if !is_handled(py, &err) {
            return Err(err);
        }
        let transport = if token == LISTENER.0 {
            st.datagram.as_ref().map(|ep| ep.transport.clone_ref(py))
        } else {
            conn_mut(&mut st.conns, token).map(|c| c.transport.clone_ref(py))
        };
        match transport {
            Some(transport) => transport.get().core.report(transport.bind(py), err),
            None => Err(err),
        }
    }

    /// After a callback: an ordinary exception goes to `handle_error` and aborts the
    /// connection; anything else (KeyboardInterrupt, SystemExit) propagates.
    fn after_callback(
        &self,
        py: Python<'_>,
        st: &mut LoopState,
        token: usize,
        result: PyResult<()>,
    ) -> PyResult<()> {
        let Err(err) = result else {
            return Ok(());
        };
        if !is_handled(py, &err) {
            return Err(err);
        }
        if token == LISTENER.0 {
            let Some(ep) = st.datagram.as_ref() else {
                return Err(err);
            };
            return self.report(py, ep.transport.clone_ref(py).into_any(), py.None(), err);
        }
        let Some(conn) = conn_mut(&mut st.conns, token) else {
            return Err(err);
        };
        let transport = conn.transport.clone_ref(py);
        let addr = conn.addr.clone_ref(py);
        conn.error = Some(err.clone_ref(py));
        transport.get().core.abort(py);
        self.report(py, transport.into_any(), addr, err)
    }

    /// `on_error(request, address, exc)`: the server's `handle_error`.
    fn report(
        &self,
        py: Python<'_>,
        request: Py<PyAny>,
        addr: Py<PyAny>,
        err: PyErr,
    ) -> PyResult<()> {
        self.on_error
            .call1(py, (request, addr, err.value(py).clone()))
            .map(drop)
    }

    /// The first round of a datagram server: make its endpoint (transport and
    /// protocol) and call `connection_made`. A stream server has nothing to start.
    pub(super) fn start(&self, py: Python<'_>, st: &mut LoopState) -> PyResult<()> {
        if st.started {
            return Ok(());
        }
        st.started = true;
        if self.kind != libc::SOCK_DGRAM {
            return Ok(());
        }
        let chan = Arc::new(Channel::new(LISTENER.0, self.shared.clone()));
        let protocol = self.factory.call0(py)?;
        let local = syscall::sock_name(self.fd, false).map_err(PyErr::from)?;
        let sockname = address::to_python(py, &local)?.unbind();
        let core = self.transport_core(
            py,
            chan.clone(),
            protocol.clone_ref(py),
            py.None(),
            sockname,
            self.fd,
        );
        let transport = DatagramTransport::create(py, core)?;
        st.datagram = Some(DatagramEndpoint {
            chan,
            transport: transport.clone_ref(py),
            protocol: Some(protocol.clone_ref(py)),
            native: protocol.bind(py).is_instance_of::<NativeEcho>(),
            gen: 0,
            writable_interest: false,
            ended: false,
        });
        let result =
            catch_panic(|| protocol.call_method1(py, "connection_made", (transport,))).map(drop);
        self.after_callback(py, st, LISTENER.0, result)
    }
}
