//! `EventLoop`: the evented path (ARCHITECTURE.md, Two handler paths).
//!
//! Handlers shaped like `asyncio.Protocol` (or `asyncio.DatagramProtocol`) run on the
//! thread that serves, with no thread per connection and no thread wake per request.
//! Each `run_once()` is two phases:
//!
//! 1. **I/O, detached** (one GIL release): send what the transports queued since the
//!    last round, close what they closed, wait on the mio `Poll`, then drain every ready
//!    socket — accept until `EAGAIN`, receive until `EAGAIN` (mio is edge-triggered) —
//!    into one arena buffer, recording events.
//! 2. **Callbacks, attached** (one GIL hold for the whole batch): `connection_made`,
//!    `data_received`, `eof_received`, `connection_lost`, `resume_writing`,
//!    `datagram_received`, `error_received`.
//!
//! `pause_reading()` is honoured at once: data (or the end of stream) already read in
//! the round that paused is held in the connection, and delivered, in order and before
//! anything read later, after `resume_reading()`.
//!
//! No system call is made with the GIL held on this path. An exception from a callback
//! goes to the server's `handle_error` and aborts only that connection (as asyncio
//! does); `KeyboardInterrupt`/`SystemExit` propagate, and the events not yet dispatched
//! are kept for the next round, so nothing read is lost.
//!
//! **Descriptors have owners.** An accepted connection is an `OwnedFd` from `accept` to
//! its close: carried in [`Event::Accepted`], then in the connection's slot. It is
//! closed by dropping that owner, in one place ([`close_socket`]), under the
//! connection's channel lock and after the channel is marked closed; a transport that
//! duplicates the descriptor (`get_extra_info('socket')`) does so under the same lock
//! and only while the channel is open, so it can never duplicate a number the kernel
//! has already handed to another socket. Nothing here closes a bare number.

use crate::bridge::address;
use crate::bridge::proxy::ProxyPolicy;
use crate::bridge::buffer::RawBuffer;
use crate::bridge::wait::{blocking, lock};
use crate::error::{catch_panic, is_handled, Error, Result};
use crate::evented::native::NativeEcho;
use crate::evented::proxy::{Awaiting, Outcome as HeaderOutcome};
use crate::evented::transport::{
    self, BaseTransport, ChanState, Channel, DatagramTransport, LoopShared, Transport,
    TransportCore, CURRENT_LOOP,
};
use crate::sys::syscall::{self, Mode, RawAddr};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// Bytes asked of one `recv`.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read from one connection per round before the others get their turn.
const READ_BUDGET: usize = 256 * 1024;
/// Connections accepted (datagrams received) per round before callbacks run.
const ACCEPT_BUDGET: usize = 256;
const DATAGRAM_BUDGET: usize = 1024;
/// The largest datagram an IPv4 or IPv6 socket receives (a UDP payload is at most
/// 65,507 or 65,527 bytes; IPv6 jumbograms would be cut, and reported as `EMSGSIZE`).
const INET_DATAGRAM_MAX: usize = 64 * 1024;
/// What running the loop from inside its own callback raises (asyncio's words).
const ALREADY_RUNNING: &str = "This event loop is already running";
/// How long to wait before retrying `accept` after running out of descriptors.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);
/// What `run_once()` raises on a loop another process made (a forked child's copy).
const FORKED: &str = "this event loop belongs to the process that made it; a forked \
                      child serves on a loop of its own (the server makes one)";

/// How many `fork()`s the process is away from the one it started as: a handler that
/// `pthread_atfork` runs in each child adds one. A loop compares it with the count at
/// its making, one atomic load, where checking the process id would be a system call
/// (between the callbacks of a round).
static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_fork_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// The fork count, with its handler registered (once).
fn fork_count() -> u64 {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: the handler only adds to an atomic (async-signal-safe), and this
        // library is never unloaded (CPython keeps extension modules loaded).
        unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
    });
    FORKS.load(Ordering::Relaxed)
}

/// Why a connection ended, for `connection_lost`.
enum Lost {
    Clean,
    Os(i32),
    Timeout,
    /// The exception a callback raised (kept in the connection).
    Callback,
}

enum Event {
    /// A connection accepted and registered, not yet given a protocol: the event owns
    /// its descriptor until the callback phase moves it into the connection's slot.
    Accepted(usize, OwnedFd, RawAddr, RawAddr),
    Data(usize, usize, usize),
    Eof(usize),
    Lost(usize, Lost),
    Resume(usize),
    /// `resume_reading()` on a connection with received data (or its end of stream)
    /// held while it was paused: deliver it, before anything read later.
    Held(usize),
    Datagram(usize, usize, RawAddr),
    DatagramError(i32),
    /// A connection's PROXY protocol header was refused (it is closed): the peer, why.
    ProxyRefused(RawAddr, String),
}

struct Conn {
    /// The connection's socket, owned; `None` once closed.
    sock: Option<OwnedFd>,
    chan: Arc<Channel>,
    transport: Py<BaseTransport>,
    protocol: Option<Py<PyAny>>,
    /// Where received data goes; None until the protocol is made.
    sink: Option<Sink>,
    /// The transport's `protocol_gen` that `protocol` and `sink` were read at.
    gen: u64,
    addr: Py<PyAny>,
    last_active: Instant,
    writable_interest: bool,
    eof_seen: bool,
    error: Option<PyErr>,
    /// Data read before the protocol called `pause_reading()` (in the same round), held
    /// for `resume_reading()`, in order; and whether the end of stream came after it.
    held: Vec<u8>,
    held_eof: bool,
}

/// How a connection's protocol takes received data.
enum Sink {
    /// A `NativeEcho`: the bytes are queued back without calling Python.
    Native,
    /// `data_received(bytes)` (the bound method).
    Bytes(Py<PyAny>),
    /// An `asyncio.BufferedProtocol`: the bytes are written into the buffer its
    /// `get_buffer(-1)` returns, then `buffer_updated(nbytes)`, as often as the
    /// buffers' sizes need (the bound methods).
    Buffered {
        get_buffer: Py<PyAny>,
        buffer_updated: Py<PyAny>,
    },
}

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
        let cs = lock(py, &self.chan.state);
        if cs.closing || cs.aborting || cs.closed {
            Gate::Drop
        } else if cs.read_paused || (held_first && (!self.held.is_empty() || self.held_eof)) {
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
    fn refresh(&mut self, py: Python<'_>) -> PyResult<()> {
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
            let taken = match self.sink.as_ref() {
                Some(Sink::Native) => {
                    transport::write_slice(self.transport.bind(py), rest)?;
                    rest.len()
                }
                Some(Sink::Bytes(on_data)) => {
                    let data = PyBytes::new(py, rest);
                    catch_panic(|| on_data.call1(py, (data,)))?;
                    rest.len()
                }
                Some(Sink::Buffered {
                    get_buffer,
                    buffer_updated,
                }) => {
                    let (get_buffer, buffer_updated) =
                        (get_buffer.clone_ref(py), buffer_updated.clone_ref(py));
                    let view = protocol_buffer(py, &get_buffer)?;
                    let n = view.len().min(rest.len());
                    // SAFETY: the export is writable, contiguous and `view.len()` >= n
                    // bytes long; it stays pinned until `view` is dropped below.
                    unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), view.ptr().get(), n) };
                    drop(view);
                    catch_panic(|| buffer_updated.call1(py, (n,)))?;
                    n
                }
                None => return Ok(()),
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

    /// Before `eof_received()`: a buffered protocol is asked for a buffer first, as
    /// asyncio asks before the read that finds the end of stream (an empty one fails
    /// the connection there, with no `eof_received()`).
    fn before_eof(&self, py: Python<'_>) -> PyResult<()> {
        match self.sink.as_ref() {
            Some(Sink::Buffered { get_buffer, .. }) => protocol_buffer(py, get_buffer).map(drop),
            _ => Ok(()),
        }
    }

    /// The descriptor, while the connection is open (only the loop, which owns it,
    /// uses this number).
    fn fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    fn closed(&self) -> bool {
        self.sock.is_none()
    }
}

/// The protocol of a datagram server and its transport.
///
/// `transport.close()`/`abort()` end the endpoint as in asyncio: no more
/// `datagram_received`, then `connection_lost(None)`. The socket is the server's (the
/// user's `server.socket`), so ending the endpoint stops the loop using it (it is taken
/// out of the poller and never read again) but does not close it: that stays
/// `server_close()`'s job.
struct DatagramEndpoint {
    chan: Arc<Channel>,
    transport: Py<BaseTransport>,
    /// None once the protocol got its `connection_lost`.
    protocol: Option<Py<PyAny>>,
    /// The protocol is a `NativeEcho`.
    native: bool,
    /// The transport's `protocol_gen` that `protocol` and `native` were read at.
    gen: u64,
    writable_interest: bool,
    /// Ended by the transport's `close()`/`abort()`: out of the poller.
    ended: bool,
}

impl DatagramEndpoint {
    /// After `transport.set_protocol()`: the later callbacks go to the new protocol
    /// (one atomic load when nothing changed; nothing once `connection_lost` ran).
    fn refresh(&mut self, py: Python<'_>) {
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
        let cs = lock(py, &self.chan.state);
        let open = !(cs.closing || cs.aborting || cs.closed);
        drop(cs);
        self.protocol.as_ref().filter(|_| open)
    }
}

struct LoopState {
    poll: Option<Poll>,
    events: Events,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    arena: Vec<u8>,
    pending: VecDeque<Event>,
    retry_read: Vec<usize>,
    listener_ready: bool,
    backoff_until: Option<Instant>,
    next_idle_check: Option<Instant>,
    datagram: Option<DatagramEndpoint>,
    started: bool,
    /// Connections still sending their PROXY protocol header (see `evented::proxy`).
    awaiting: Awaiting,
}

#[pyclass(module = "fastsocketserver._core", frozen)]
pub struct EventLoop {
    state: Mutex<LoopState>,
    /// How many times `wake()` (the server's `shutdown()`) was called. A round does not
    /// block when this differs from the count its caller saw before it last checked for
    /// shutdown: a wake whose event another thread's round consumed is not lost.
    stop_wakes: AtomicU64,
    shared: Arc<LoopShared>,
    fd: RawFd,
    family: i32,
    kind: i32,
    proto: i32,
    factory: Py<PyAny>,
    verify: Option<Py<PyAny>>,
    on_error: Py<PyAny>,
    idle_timeout: Option<Duration>,
    /// The server's PROXY protocol settings: connections wait in `awaiting` until
    /// their header is read.
    proxy: Option<Py<ProxyPolicy>>,
    /// `close()` was called while a round held the loop; the round finishes it.
    closing: AtomicBool,
    /// Open connections (what `connections` reports, also from inside a callback).
    open: AtomicUsize,
    /// False once `stop_accepting()` was called: the listener is left alone, so that
    /// a draining process takes no new connection (or datagram) from a shared socket.
    accepting: AtomicBool,
    /// The process that made the loop. A forked child (`os.fork()` in a callback, say)
    /// shares the parent's epoll instance and eventfd: there the loop never touches
    /// them (see `stale`).
    pid: libc::pid_t,
    /// [`FORKS`] when the loop was made: a fork in a callback is noticed before the
    /// next callback of the round (see [`EventLoop::forked`]).
    forks: u64,
}

fn conn_mut(conns: &mut [Option<Conn>], token: usize) -> Option<&mut Conn> {
    conns.get_mut(token.checked_sub(FIRST_CONN)?)?.as_mut()
}

/// Marks the calling thread as running a round of one loop (in [`CURRENT_LOOP`]) for the
/// guard's life, and restores what was there before (a round of another server's loop
/// run from inside a callback).
struct Running {
    previous: usize,
}

impl Running {
    fn enter(shared: &Arc<LoopShared>) -> Running {
        let previous = CURRENT_LOOP.with(|c| c.replace(Arc::as_ptr(shared) as usize));
        Running { previous }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        CURRENT_LOOP.with(|c| c.set(self.previous));
    }
}

impl EventLoop {
    fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// True inside a round of this loop on the calling thread (a callback, or a signal
    /// handler run while it waits).
    fn running_here(&self) -> bool {
        CURRENT_LOOP.with(|c| c.get()) == Arc::as_ptr(&self.shared) as usize
    }

    /// `stale` without a system call: this process was forked since the loop was made
    /// (by `fork()`, which runs the `pthread_atfork` handlers).
    fn forked(&self) -> bool {
        FORKS.load(Ordering::Relaxed) != self.forks
    }

    // ---- phase 1: I/O, detached ----------------------------------------------------

    fn io_phase(&self, st: &mut LoopState, deadline: Option<Instant>, seen: u64) -> Result<bool> {
        let dirty =
            std::mem::take(&mut *self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        // Flush every transport that queued something, even if one fails.
        let mut failed = None;
        for token in dirty {
            if let Err(err) = self.flush(st, token) {
                failed.get_or_insert(err);
            }
        }
        if let Some(err) = failed {
            return Err(err);
        }
        let now = Instant::now();
        for token in std::mem::take(&mut st.retry_read) {
            self.read_conn(st, token, true, now);
        }
        if st.backoff_until.is_some_and(|t| t <= now) {
            st.backoff_until = None;
        }
        self.check_idle(st, now);
        for (token, outcome) in st.awaiting.expired(now) {
            self.header_done(st, token, outcome);
        }
        let busy = !st.pending.is_empty()
            || (st.listener_ready && st.backoff_until.is_none() && self.accepting())
            || self.stop_wakes.load(Ordering::Acquire) != seen;
        let timeout = if busy {
            Some(Duration::ZERO)
        } else {
            [deadline, st.backoff_until, st.next_idle_check, st.awaiting.next_deadline()]
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now))
        };
        let LoopState { poll, events, .. } = st;
        let poll = poll.as_mut().ok_or(Error::Os(libc::EBADF))?;
        poll.poll(events, timeout)?;
        let mut woken = false;
        let now = Instant::now();
        let ready: Vec<(usize, bool, bool, bool)> = events
            .iter()
            .map(|e| {
                (
                    e.token().0,
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable(),
                    e.is_read_closed() || e.is_error(),
                )
            })
            .collect();
        for (token, readable, writable, closed) in ready {
            match Token(token) {
                WAKER => woken = true,
                LISTENER => {
                    if readable {
                        st.listener_ready = true;
                    }
                    if writable && st.datagram.is_some() {
                        self.flush(st, LISTENER.0)?;
                    }
                }
                _ if st.awaiting.contains(token) => {
                    if let Some(outcome) = st.awaiting.readable(token) {
                        self.header_done(st, token, outcome);
                    }
                }
                _ => {
                    if writable {
                        self.flush(st, token)?;
                    }
                    if readable {
                        self.read_conn(st, token, closed, now);
                    }
                }
            }
        }
        if st.listener_ready && st.backoff_until.is_none() && self.accepting() {
            if self.kind == libc::SOCK_DGRAM {
                self.receive_datagrams(st);
            } else {
                self.accept_all(st)?;
            }
        }
        Ok(woken || !st.pending.is_empty())
    }

    /// A connection's PROXY protocol header is complete: the connection goes on as a
    /// newly accepted one (and is read at the next round: what followed the header is
    /// queued already, with no edge left to announce it); or refused: closed, its slot
    /// freed, the refusal reported in the callback phase.
    fn header_done(&self, st: &mut LoopState, token: usize, outcome: HeaderOutcome) {
        match outcome {
            HeaderOutcome::Ready(sock, client, local) => {
                st.pending.push_back(Event::Accepted(token, sock, client, local));
                st.retry_read.push(token);
            }
            HeaderOutcome::Refused(sock, peer, why) => {
                if let Some(poll) = st.poll.as_ref() {
                    let _ = poll.registry().deregister(&mut SourceFd(&sock.as_raw_fd()));
                }
                drop(sock);
                st.free.push(token);
                st.pending.push_back(Event::ProxyRefused(peer, why));
            }
        }
    }

    fn accept_all(&self, st: &mut LoopState) -> Result<()> {
        for _ in 0..ACCEPT_BUDGET {
            match syscall::accept(self.fd, true) {
                Ok((sock, peer)) => {
                    let fd = sock.as_raw_fd();
                    let local = syscall::sock_name(fd, false).unwrap_or_else(|_| RawAddr::empty());
                    // Register now, detached; the connection's objects are made in the
                    // callback phase, in the slot reserved here.
                    let token = match st.free.pop() {
                        Some(t) => t,
                        None => {
                            st.conns.push(None);
                            st.conns.len() - 1 + FIRST_CONN
                        }
                    };
                    let registered = match st.poll.as_ref() {
                        Some(poll) => poll.registry().register(
                            &mut SourceFd(&fd),
                            Token(token),
                            Interest::READABLE,
                        ),
                        None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
                    };
                    if registered.is_err() {
                        st.free.push(token);
                        drop(sock);
                        continue;
                    }
                    match &self.proxy {
                        None => st.pending.push_back(Event::Accepted(token, sock, peer, local)),
                        Some(proxy) => {
                            let policy = proxy.get().policy();
                            let now = Instant::now();
                            if let Some(o) = st.awaiting.start(policy, token, sock, peer, local, now)
                            {
                                self.header_done(st, token, o);
                            }
                        }
                    }
                }
                Err(Error::Os(libc::EAGAIN)) => {
                    st.listener_ready = false;
                    return Ok(());
                }
                Err(Error::Os(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                    st.backoff_until = Some(Instant::now() + EXHAUSTED_BACKOFF);
                    return Ok(());
                }
                Err(Error::Os(libc::ECONNABORTED | libc::EPROTO | libc::EPERM))
                | Err(Error::Interrupted) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Receive the queued datagrams (up to the round's budget) into the arena, each
    /// whole: a buffer as large as the datagram, never a silent cut (a datagram that
    /// still came cut, `MSG_TRUNC`, is reported to `error_received` as `EMSGSIZE`).
    fn receive_datagrams(&self, st: &mut LoopState) {
        let reading = st.datagram.as_ref().is_some_and(|ep| {
            let cs = ep.chan.state.lock().unwrap_or_else(|p| p.into_inner());
            !(ep.ended || cs.closing || cs.aborting || cs.closed)
        });
        if !reading {
            // Closing: what is queued stays in the socket for its owner.
            st.listener_ready = false;
            return;
        }
        let inet = self.family == libc::AF_INET || self.family == libc::AF_INET6;
        for _ in 0..DATAGRAM_BUDGET {
            let start = st.arena.len();
            // An IP datagram fits in 64 KiB; a Unix one can be as large as its sender's
            // buffer allows, so its size is asked first.
            let got = if inet {
                Ok(INET_DATAGRAM_MAX)
            } else {
                next_datagram_size(self.fd)
            }
            .and_then(|size| recv_datagram(self.fd, &mut st.arena, size.max(1)));
            match got {
                Ok((n, addr, false)) => st.pending.push_back(Event::Datagram(start, n, addr)),
                Ok((_, _, true)) => {
                    st.arena.truncate(start);
                    st.pending.push_back(Event::DatagramError(libc::EMSGSIZE));
                }
                Err(err) => {
                    st.arena.truncate(start);
                    match err {
                        Error::Os(libc::EAGAIN) => st.listener_ready = false,
                        Error::Interrupted => continue,
                        Error::Os(code) => st.pending.push_back(Event::DatagramError(code)),
                        _ => st.listener_ready = false,
                    }
                    if !st.listener_ready {
                        return;
                    }
                }
            }
        }
    }

    /// Receive everything a connection has (up to the round's budget) into the arena.
    ///
    /// mio is edge-triggered, so the socket must be drained, but a short read (fewer
    /// bytes than asked) already says it is: it took everything queued at that moment,
    /// and whatever arrives later raises a new edge. That saves the `recv` that would
    /// only say `EAGAIN`, one system call per request. Not when the event reported the
    /// peer's end of stream or an error (`closed`): the FIN came before the read, raises
    /// no further edge, and the next `recv` must see it.
    fn read_conn(&self, st: &mut LoopState, token: usize, closed: bool, now: Instant) {
        let LoopState {
            conns,
            arena,
            pending,
            retry_read,
            poll,
            ..
        } = st;
        let Some(conn) = conn_mut(conns, token) else {
            return;
        };
        let Some(fd) = conn.fd().filter(|_| !conn.eof_seen) else {
            return;
        };
        {
            let cs = conn.chan.state.lock().unwrap_or_else(|p| p.into_inner());
            if cs.read_paused || cs.closed || cs.aborting {
                return;
            }
        }
        let mut total = 0;
        loop {
            let start = arena.len();
            match syscall::recv_append(
                fd,
                arena,
                READ_CHUNK,
                libc::MSG_DONTWAIT,
                Mode::Blocking,
                None,
            ) {
                Ok(0) => {
                    conn.eof_seen = true;
                    pending.push_back(Event::Eof(token));
                    return;
                }
                Ok(n) => {
                    conn.last_active = now;
                    match pending.back_mut() {
                        Some(Event::Data(t, s, len)) if *t == token && *s + *len == start => {
                            *len += n
                        }
                        _ => pending.push_back(Event::Data(token, start, n)),
                    }
                    total += n;
                    if total >= READ_BUDGET {
                        retry_read.push(token);
                        return;
                    }
                    if n < READ_CHUNK && !closed {
                        return;
                    }
                }
                Err(Error::Os(libc::EAGAIN)) => return,
                Err(Error::Interrupted) => continue,
                Err(Error::Os(code)) => {
                    close_conn(
                        poll.as_ref(),
                        conn,
                        pending,
                        token,
                        Lost::Os(code),
                        &self.open,
                    );
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// Send what a transport queued; carry out its close, abort or write_eof.
    fn flush(&self, st: &mut LoopState, token: usize) -> Result<()> {
        if token == LISTENER.0 {
            return self.flush_datagrams(st);
        }
        let LoopState {
            conns,
            pending,
            retry_read,
            poll,
            ..
        } = st;
        let Some(conn) = conn_mut(conns, token) else {
            return Ok(());
        };
        let Some(fd) = conn.fd() else {
            return Ok(());
        };
        let chan = conn.chan.clone();
        let mut cs = chan.state.lock().unwrap_or_else(|p| p.into_inner());
        cs.queued = false;
        if cs.aborting {
            drop(cs);
            let why = if conn.error.is_some() {
                Lost::Callback
            } else {
                Lost::Clean
            };
            close_conn(poll.as_ref(), conn, pending, token, why, &self.open);
            return Ok(());
        }
        if cs.read_resumed {
            cs.read_resumed = false;
            if !conn.held.is_empty() || conn.held_eof {
                pending.push_back(Event::Held(token));
            }
            retry_read.push(token);
        }
        while cs.out_pos < cs.out.len() {
            let pos = cs.out_pos;
            match syscall::send(fd, &cs.out[pos..], 0, Mode::NonBlocking, None) {
                Ok(n) => cs.out_pos += n,
                Err(Error::Os(libc::EAGAIN)) => break,
                Err(Error::Interrupted) => continue,
                Err(Error::Os(code)) => {
                    drop(cs);
                    close_conn(
                        poll.as_ref(),
                        conn,
                        pending,
                        token,
                        Lost::Os(code),
                        &self.open,
                    );
                    return Ok(());
                }
                Err(err) => return Err(err),
            }
        }
        if cs.out_pos == cs.out.len() {
            cs.out.clear();
            cs.out_pos = 0;
        }
        let left = after_flush(&mut cs, pending, token);
        if let Err(err) = watch_writable(
            poll.as_ref(),
            fd,
            Token(token),
            left > 0,
            &mut conn.writable_interest,
        ) {
            // This connection cannot be watched any more: it ends, the loop goes on.
            drop(cs);
            let code = match err {
                Error::Os(code) => code,
                _ => libc::EIO,
            };
            close_conn(
                poll.as_ref(),
                conn,
                pending,
                token,
                Lost::Os(code),
                &self.open,
            );
            return Ok(());
        }
        if left == 0 {
            if cs.eof_requested && !cs.eof_sent {
                cs.eof_sent = true;
                // SAFETY: `fd` is the connection's, open: the loop owns it.
                unsafe { libc::shutdown(fd, libc::SHUT_WR) };
            }
            if cs.closing {
                drop(cs);
                close_conn(poll.as_ref(), conn, pending, token, Lost::Clean, &self.open);
            }
        }
        Ok(())
    }

    fn flush_datagrams(&self, st: &mut LoopState) -> Result<()> {
        let LoopState {
            datagram,
            pending,
            poll,
            listener_ready,
            ..
        } = st;
        let Some(ep) = datagram.as_mut() else {
            return Ok(());
        };
        if ep.ended {
            return Ok(());
        }
        let chan = ep.chan.clone();
        let mut cs = chan.state.lock().unwrap_or_else(|p| p.into_inner());
        cs.queued = false;
        while let Some((data, addr)) = cs.datagrams.front() {
            match syscall::sendto(self.fd, data, 0, addr, Mode::NonBlocking, None) {
                Err(Error::Os(libc::EAGAIN)) => break,
                Err(Error::Interrupted) => continue,
                other => {
                    let len = data.len();
                    cs.datagrams.pop_front();
                    cs.datagram_bytes -= len;
                    if let Err(Error::Os(code)) = other {
                        pending.push_back(Event::DatagramError(code));
                    }
                }
            }
        }
        if cs.aborting {
            // What the socket did not take at once is dropped.
            cs.datagrams.clear();
            cs.datagram_bytes = 0;
        }
        if cs.aborting || (cs.closing && cs.datagrams.is_empty()) {
            // The endpoint ends: out of the poller, never read again, and the protocol
            // is told. The socket itself stays open: it is the server's.
            cs.closed = true;
            drop(cs);
            if let Some(poll) = poll.as_ref() {
                let _ = poll.registry().deregister(&mut SourceFd(&self.fd));
            }
            ep.ended = true;
            *listener_ready = false;
            pending.push_back(Event::Lost(LISTENER.0, Lost::Clean));
            return Ok(());
        }
        let left = after_flush(&mut cs, pending, LISTENER.0);
        watch_writable(
            poll.as_ref(),
            self.fd,
            LISTENER,
            left > 0,
            &mut ep.writable_interest,
        )?;
        Ok(())
    }

    fn check_idle(&self, st: &mut LoopState, now: Instant) {
        let Some(limit) = self.idle_timeout else {
            return;
        };
        if st.next_idle_check.is_some_and(|t| t > now) {
            return;
        }
        let LoopState {
            conns,
            pending,
            poll,
            ..
        } = st;
        let mut next = now + limit;
        for (i, slot) in conns.iter_mut().enumerate() {
            let Some(conn) = slot.as_mut().filter(|c| !c.closed()) else {
                continue;
            };
            let expires = conn.last_active + limit;
            if expires <= now {
                close_conn(
                    poll.as_ref(),
                    conn,
                    pending,
                    i + FIRST_CONN,
                    Lost::Timeout,
                    &self.open,
                );
            } else {
                next = next.min(expires);
            }
        }
        st.next_idle_check = Some(next);
    }

    // ---- phase 2: callbacks, attached ----------------------------------------------

    fn dispatch(&self, py: Python<'_>, st: &mut LoopState) -> PyResult<()> {
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
                Event::Accepted(token, fd, peer, local) => {
                    self.on_accepted(py, st, token, fd, &peer, &local)?
                }
                Event::Data(token, start, len) => {
                    let Some(conn) = conn_mut(&mut st.conns, token) else {
                        continue;
                    };
                    if let Err(err) = conn.refresh(py) {
                        self.after_callback(py, st, token, Err(err))?;
                        continue;
                    }
                    let LoopState { conns, arena, .. } = &mut *st;
                    let Some(conn) = conn_mut(conns, token) else {
                        continue;
                    };
                    if conn.closed() || conn.sink.is_none() {
                        continue;
                    }
                    let data = &arena[start..start + len];
                    match conn.gate(py, true) {
                        Gate::Open => {}
                        Gate::Hold => {
                            conn.held.extend_from_slice(data);
                            continue;
                        }
                        Gate::Drop => continue,
                    }
                    let result = conn.deliver(py, data);
                    self.after_callback(py, st, token, result)?;
                }
                Event::Eof(token) => self.on_eof(py, st, token, true)?,
                Event::Held(token) => self.on_held(py, st, token)?,
                Event::Resume(token) => {
                    self.refresh(py, st, token);
                    let protocol = if token == LISTENER.0 {
                        st.datagram
                            .as_ref()
                            .and_then(|ep| ep.receiving(py).map(|p| p.clone_ref(py)))
                    } else {
                        conn_mut(&mut st.conns, token)
                            .and_then(|c| c.protocol.as_ref().map(|p| p.clone_ref(py)))
                    };
                    if let Some(protocol) = protocol {
                        self.resume_writing(py, st, token, protocol)?;
                    }
                }
                Event::Lost(token, why) => self.on_lost(py, st, token, why)?,
                Event::Datagram(start, len, addr) => {
                    self.refresh(py, st, LISTENER.0);
                    let Some(ep) = st.datagram.as_ref() else {
                        continue;
                    };
                    let Some(protocol) = ep.receiving(py) else {
                        continue;
                    };
                    if ep.native {
                        let data = &st.arena[start..start + len];
                        let queued = transport::queue_datagram(ep.transport.bind(py), data, addr);
                        self.after_callback(py, st, LISTENER.0, queued)?;
                        continue;
                    }
                    let data = PyBytes::new(py, &st.arena[start..start + len]);
                    let addr = address::to_python(py, &addr)?;
                    let result = catch_panic(|| {
                        protocol.call_method1(py, "datagram_received", (data, addr))
                    })
                    .map(drop);
                    self.after_callback(py, st, LISTENER.0, result)?;
                }
                Event::ProxyRefused(peer, why) => {
                    if let Some(proxy) = &self.proxy {
                        proxy.get().refused(py, &peer, &why);
                    }
                }
                Event::DatagramError(code) => {
                    self.refresh(py, st, LISTENER.0);
                    let Some(protocol) = st.datagram.as_ref().and_then(|ep| ep.receiving(py))
                    else {
                        continue;
                    };
                    let exc: PyErr = Error::Os(code).into();
                    let result = catch_panic(|| {
                        protocol.call_method1(py, "error_received", (exc.value(py),))
                    })
                    .map(drop);
                    self.after_callback(py, st, LISTENER.0, result)?;
                }
            }
        }
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
            let transport = Transport::create(
                py,
                TransportCore {
                    chan: chan.clone(),
                    protocol: Mutex::new(py.None()),
                    protocol_gen: AtomicU64::new(0),
                    peername: addr.clone_ref(py),
                    sockname: address::to_python(py, local)?.unbind(),
                    socket: Mutex::new(None),
                    fd,
                    on_error: self.on_error.clone_ref(py),
                    limits: Mutex::new(None),
                    family: self.family,
                    kind: self.kind,
                    proto: self.proto,
                },
            )?;
            Ok((addr, transport))
        })();
        let (addr, transport) = match objects {
            Ok(objects) => objects,
            Err(err) => {
                // No connection object could be made (MemoryError, say): drop this
                // client, free its slot, and report like any per-connection failure.
                let poll = st.poll.as_ref();
                py.detach(|| {
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
        st.conns[token - FIRST_CONN] = Some(Conn {
            sock: Some(sock),
            chan,
            transport: transport.clone_ref(py),
            protocol: None,
            sink: None,
            gen: 0,
            addr: addr.clone_ref(py),
            last_active: Instant::now(),
            writable_interest: false,
            eof_seen: false,
            error: None,
            held: Vec::new(),
            held_eof: false,
        });
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
        let made = catch_panic(|| -> PyResult<()> {
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
        });
        self.after_callback(py, st, token, made)
    }

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

    fn start(&self, py: Python<'_>, st: &mut LoopState) -> PyResult<()> {
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
        let transport = DatagramTransport::create(
            py,
            TransportCore {
                chan: chan.clone(),
                protocol: Mutex::new(protocol.clone_ref(py)),
                protocol_gen: AtomicU64::new(0),
                peername: py.None(),
                sockname: address::to_python(py, &local)?.unbind(),
                socket: Mutex::new(None),
                fd: self.fd,
                on_error: self.on_error.clone_ref(py),
                limits: Mutex::new(None),
                family: self.family,
                kind: self.kind,
                proto: self.proto,
            },
        )?;
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

/// The length of the datagram at the head of `fd`'s queue, without receiving it:
/// `MSG_PEEK | MSG_TRUNC` into an empty buffer (Linux then returns the datagram's real
/// length). `EAGAIN` when none is queued.
fn next_datagram_size(fd: RawFd) -> Result<usize> {
    let mut byte = 0u8;
    // SAFETY: a valid one-byte buffer, offered with length 0: the kernel writes nothing.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            0,
            libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(Error::last_os());
    }
    Ok(n as usize)
}

/// Receive one datagram into `buf` (appended, at most `max` bytes) with its source
/// address; the flag says the kernel cut it to `max` (`MSG_TRUNC` in the message flags).
fn recv_datagram(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> Result<(usize, RawAddr, bool)> {
    buf.reserve(max);
    let len = buf.len();
    let mut addr = RawAddr::empty();
    let mut iov = libc::iovec {
        // SAFETY: `reserve` made room for `max` bytes past `len`.
        iov_base: unsafe { buf.as_mut_ptr().add(len) }.cast(),
        iov_len: max,
    };
    // SAFETY: all-zero is a valid msghdr (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_mut_ptr().cast();
    msg.msg_namelen = addr.len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: msg points at the address storage and the one iovec above, all alive for
    // the call; without MSG_TRUNC in the call's flags the kernel writes at most `max`.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(Error::last_os());
    }
    addr.len = msg.msg_namelen;
    // SAFETY: the kernel wrote n <= max bytes at `len`.
    unsafe { buf.set_len(len + n as usize) };
    Ok((n as usize, addr, msg.msg_flags & libc::MSG_TRUNC != 0))
}

/// After sending: the bytes still queued; queues `resume_writing` if the protocol was
/// paused and the queue is down to the low-water mark.
fn after_flush(cs: &mut ChanState, pending: &mut VecDeque<Event>, token: usize) -> usize {
    let left = cs.pending();
    if cs.writing_paused && left as f64 <= cs.low {
        cs.writing_paused = false;
        pending.push_back(Event::Resume(token));
    }
    left
}

/// Watch `fd` for writability only while it has bytes queued (edge-triggered: the
/// event after `EAGAIN` says when to send again).
fn watch_writable(
    poll: Option<&Poll>,
    fd: RawFd,
    token: Token,
    want: bool,
    watching: &mut bool,
) -> Result<()> {
    if want == *watching {
        return Ok(());
    }
    let interest = if want {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    if let Some(poll) = poll {
        poll.registry()
            .reregister(&mut SourceFd(&fd), token, interest)?;
    }
    *watching = want;
    Ok(())
}

/// Connections accepted but not yet handed to a protocol: only their descriptors, taken
/// out of the pending events (with every other pending event).
fn unclaimed_descriptors(pending: &mut VecDeque<Event>) -> Vec<OwnedFd> {
    pending
        .drain(..)
        .filter_map(|event| match event {
            Event::Accepted(_, sock, _, _) => Some(sock),
            _ => None,
        })
        .collect()
}

/// Deregister and close a connection's socket (detached: it makes system calls). The
/// channel is marked closed and the owner dropped under the channel's lock, which is
/// what makes a duplicate made under that lock safe (see the module docs). True if the
/// connection was open.
fn close_socket(poll: Option<&Poll>, conn: &mut Conn) -> bool {
    let Some(sock) = conn.sock.take() else {
        return false;
    };
    if let Some(poll) = poll {
        let _ = poll.registry().deregister(&mut SourceFd(&sock.as_raw_fd()));
    }
    let mut cs = conn.chan.state.lock().unwrap_or_else(|p| p.into_inner());
    cs.closed = true;
    drop(sock);
    drop(cs);
    true
}

/// At the loop's end, close every descriptor it owns: the `unclaimed` ones and each open
/// connection's (marked closed for its transport). Nothing is deregistered: the poller
/// is dropped next (and in a forked child it is the parent's). No callback runs here;
/// detached.
fn close_descriptors(unclaimed: Vec<OwnedFd>, conns: &mut [Option<Conn>]) {
    drop(unclaimed);
    for conn in conns.iter_mut().flatten() {
        close_socket(None, conn);
    }
}

/// At the loop's end: the datagram endpoint's transport is dead (`sendto` ignored,
/// no socket made for `get_extra_info`: the server's socket may be closed by now).
fn end_endpoint(ep: &DatagramEndpoint) {
    ep.chan
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .closed = true;
}

/// Close a connection's descriptor now (detached phase) and queue its `connection_lost`.
fn close_conn(
    poll: Option<&Poll>,
    conn: &mut Conn,
    pending: &mut VecDeque<Event>,
    token: usize,
    why: Lost,
    open: &AtomicUsize,
) {
    if close_socket(poll, conn) {
        open.fetch_sub(1, Ordering::Relaxed);
        pending.push_back(Event::Lost(token, why));
    }
}

impl Drop for EventLoop {
    /// A loop dropped without `close()` (its server collected without `server_close()`)
    /// ends as `close()` ends it: it closes the descriptors it owns (connections, the
    /// poller, the waker), and every protocol not yet told gets `connection_lost(None)`
    /// once: each connection's (also one closed in a round whose callbacks did not all
    /// run) and the datagram endpoint's, whose transport is marked dead. An exception
    /// from a callback goes to `sys.unraisablehook` (no server is left to report to).
    /// In a forked child the connections and the endpoint are the parent's: no
    /// callback.
    ///
    /// Drop runs in the object's deallocation, with the GIL held, so it makes no system
    /// call and does not detach (see `crate::sys::closer`): it moves the owners out (marking
    /// each connection closed for its transport, under the channel's short lock) and
    /// hands them to the closer. The Python objects of the connections stay behind and
    /// are dropped attached, afterwards. Taking the waker's lock while attached cannot
    /// wait on a thread that needs the GIL: its only other holders (`wake`, `close`)
    /// hold it for a non-blocking system call at most.
    fn drop(&mut self) {
        let stale = self.stale();
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut unclaimed = unclaimed_descriptors(&mut st.pending);
        unclaimed.extend(st.awaiting.drain());
        let poll = st.poll.take();
        let waker = self.shared.take_waker();
        let socks: Vec<OwnedFd> = st
            .conns
            .iter_mut()
            .flatten()
            .filter_map(|conn| {
                let sock = conn.sock.take()?;
                conn.chan
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .closed = true;
                Some(sock)
            })
            .collect();
        let conns = std::mem::take(&mut st.conns);
        let datagram = st.datagram.take();
        if let Some(ep) = datagram.as_ref() {
            end_endpoint(ep);
        }
        // Closing a socket removes it from the poller; the poller closes last.
        crate::sys::closer::run(move || {
            drop(unclaimed);
            drop(socks);
            drop(poll);
            drop(waker);
        });
        if datagram.is_none() && conns.iter().all(Option::is_none) {
            return;
        }
        // Deallocation holds the GIL already: this attach crosses nothing.
        Python::attach(|py| {
            let lost = |protocol: &Py<PyAny>| {
                if let Err(err) =
                    catch_panic(|| protocol.call_method1(py, "connection_lost", (py.None(),)))
                {
                    err.write_unraisable(py, Some(protocol.bind(py)));
                }
            };
            for mut conn in conns.into_iter().flatten() {
                // (the current protocol: it may have been switched)
                let _ = conn.refresh(py);
                if let Some(protocol) = conn.protocol.as_ref().filter(|_| !stale) {
                    lost(protocol);
                }
                conn.transport.get().core.release(py);
            }
            let Some(mut ep) = datagram else {
                return;
            };
            ep.refresh(py);
            if let Some(protocol) = ep.protocol.as_ref().filter(|_| !stale) {
                lost(protocol);
            }
            ep.transport.get().core.release(py);
        });
    }
}

#[pymethods]
impl EventLoop {
    /// Serve protocol handlers on listening socket `fd` (a stream listener or a
    /// datagram socket). `factory()` makes a protocol; `verify(transport, address)`, if
    /// given, may refuse a connection; `on_error(transport, address, exc)` reports an
    /// exception raised by a callback; `idle_timeout` closes silent connections.
    #[new]
    ///
    /// With `proxy`, each accepted connection sends its PROXY protocol header before it
    /// gets a protocol; its peer address is then the original client.
    #[pyo3(signature = (fd, family, kind, proto, factory, on_error, verify = None, idle_timeout = None, proxy = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        fd: RawFd,
        family: i32,
        kind: i32,
        proto: i32,
        factory: Py<PyAny>,
        on_error: Py<PyAny>,
        verify: Option<Py<PyAny>>,
        idle_timeout: Option<f64>,
        proxy: Option<Py<ProxyPolicy>>,
    ) -> PyResult<EventLoop> {
        if kind == libc::SOCK_STREAM {
            syscall::set_nonblocking(fd, true)?;
        }
        let poll = Poll::new().map_err(Error::from)?;
        poll.registry()
            .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)
            .map_err(Error::from)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(Error::from)?;
        let idle_timeout = match idle_timeout {
            Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "idle_timeout must be a positive number or None",
                ))
            }
            None => None,
        };
        Ok(EventLoop {
            state: Mutex::new(LoopState {
                poll: Some(poll),
                events: Events::with_capacity(1024),
                conns: Vec::new(),
                free: Vec::new(),
                arena: Vec::new(),
                pending: VecDeque::new(),
                retry_read: Vec::new(),
                listener_ready: true,
                backoff_until: None,
                next_idle_check: None,
                datagram: None,
                started: false,
                awaiting: Awaiting::default(),
            }),
            shared: Arc::new(LoopShared {
                dirty: Mutex::new(Vec::new()),
                waker: Mutex::new(Some(waker)),
            }),
            fd,
            family,
            kind,
            proto,
            factory,
            verify,
            on_error,
            idle_timeout,
            proxy,
            closing: AtomicBool::new(false),
            stop_wakes: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            // SAFETY: getpid has no preconditions.
            pid: unsafe { libc::getpid() },
            forks: fork_count(),
        })
    }

    /// One round: send queued output, wait up to `timeout` (None: forever) for
    /// events, run the callbacks. True if anything happened, False on timeout or wake.
    ///
    /// `RuntimeError` in a forked child: the poller is the parent's (the server's
    /// `handle_request()` makes a fresh loop there instead).
    #[pyo3(signature = (timeout = None))]
    fn run_once(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let seen = self.stop_wakes.load(Ordering::Acquire);
        self.round(py, timeout, seen)
    }

    /// The `serve_forever()` loop (see [`crate::bridge::serve`]), one `run_once` per round.
    ///
    /// In a forked child (a callback called `os.fork()` and the child came back from
    /// it) the loop ends after that round, as if `shutdown()` had been called: the
    /// child's `serve_forever()` returns. The poller is the parent's; a child that
    /// goes on polling it would take the parent's events. Serving again in the child
    /// makes a fresh loop there (the server replaces a `stale` one).
    #[pyo3(signature = (server, poll_interval, service_actions = None))]
    fn serve(
        &self,
        py: Python<'_>,
        server: &Bound<'_, PyAny>,
        poll_interval: Option<f64>,
        service_actions: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        crate::bridge::serve::serve_forever(
            server,
            service_actions,
            &self.stop_wakes,
            |stop, seen| {
                if self.stale() {
                    return Ok(true);
                }
                self.round(py, poll_interval, seen)?;
                Ok(self.closing.load(Ordering::Acquire)
                    || self.forked()
                    || self.stale()
                    || stop.is_set()?)
            },
        )
    }

    /// Wake the loop's current (or next) wait.
    ///
    /// In a forked child it does nothing: the eventfd is the parent's.
    fn wake(&self) -> PyResult<()> {
        if self.stale() {
            return Ok(());
        }
        self.stop_wakes.fetch_add(1, Ordering::AcqRel);
        self.shared.wake().map_err(Error::from)?;
        Ok(())
    }

    /// Close every connection (each protocol gets `connection_lost(None)`) and the poller.
    ///
    /// Safe to call during a round (from a callback or signal handler of the serving
    /// thread, or from another thread): the round is woken and finishes the close.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.closing.store(true, Ordering::Release);
        let mut guard = match self.state.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if !self.stale() {
                    let _ = py.detach(|| self.shared.wake());
                }
                if self.running_here() {
                    // A callback (or signal handler) of this loop's own round: the
                    // round finishes the close when it ends.
                    return Ok(());
                }
                // Another thread's round, just woken: wait for it to end (detached,
                // so it can take the GIL to finish its callbacks). The caller may
                // then close the listening socket: no round is using it any more.
                lock(py, &self.state)
            }
        };
        let st = &mut *guard;
        if st.poll.is_none() {
            return Ok(()); // closed already (by the round that just ended)
        }
        let poll = st.poll.take();
        let mut conns = std::mem::take(&mut st.conns);
        let datagram = st.datagram.take();
        let mut unclaimed = unclaimed_descriptors(&mut st.pending);
        unclaimed.extend(st.awaiting.drain());
        drop(guard);
        // Transports may outlive the loop; its eventfd must not.
        let waker = self.shared.take_waker();
        // Nothing is deregistered: the poller goes now, and its registrations with it.
        // The listener's number may already be closed (or another socket's), and in a
        // forked child the epoll instance is the parent's, whose registrations stay.
        py.detach(|| {
            close_descriptors(unclaimed, &mut conns);
            if let Some(ep) = datagram.as_ref() {
                end_endpoint(ep);
            }
            drop(poll);
            drop(waker);
        });
        self.open.store(0, Ordering::Relaxed);
        if self.stale() {
            // A forked child's copy: the connections and their protocols are the
            // parent's; the child only lets go of its descriptors.
            return Ok(());
        }
        let mut first_err = None;
        let mut lost = |protocol: &Py<PyAny>| {
            if let Err(err) =
                catch_panic(|| protocol.call_method1(py, "connection_lost", (py.None(),)))
            {
                first_err.get_or_insert(err);
            }
        };
        // Every protocol not yet told (including connections closed in a round whose
        // callbacks did not all run) gets its connection_lost now.
        for mut conn in conns.into_iter().flatten() {
            // (the current protocol: it may have been switched)
            let _ = conn.refresh(py);
            if let Some(protocol) = conn.protocol.as_ref() {
                lost(protocol);
            }
            conn.transport.get().core.release(py);
        }
        if let Some(mut ep) = datagram {
            ep.refresh(py);
            if let Some(protocol) = ep.protocol.as_ref() {
                lost(protocol);
            }
            ep.transport.get().core.release(py);
        }
        match first_err {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// True when called from inside one of this loop's rounds (a callback) on the
    /// calling thread, where running the loop again raises `RuntimeError`.
    #[getter]
    fn running(&self) -> bool {
        self.running_here()
    }

    /// Take no more connections (or datagrams) from the listening socket; the open
    /// connections are served as before. For a graceful stop: another process sharing
    /// the socket takes what this one leaves in its queue.
    fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    /// Open connections.
    #[getter]
    fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    #[getter]
    fn fd(&self) -> RawFd {
        self.fd
    }

    /// True in a process other than the one that made the loop (a forked child): the
    /// server then makes a fresh loop there, and this one only lets go of its
    /// descriptors, leaving the shared poller alone.
    #[getter]
    fn stale(&self) -> bool {
        // SAFETY: getpid has no preconditions.
        unsafe { libc::getpid() != self.pid }
    }
}

impl EventLoop {
    /// One round of `run_once`; `seen` is the wake count the caller saw before it last
    /// checked for shutdown.
    fn round(&self, py: Python<'_>, timeout: Option<f64>, seen: u64) -> PyResult<bool> {
        if self.running_here() {
            // A callback of this loop runs the loop again (handle_request() or
            // serve_forever() from data_received, say): the round holds the loop, so
            // waiting for it would never end. asyncio refuses the same way.
            return Err(PyRuntimeError::new_err(ALREADY_RUNNING));
        }
        if self.stale() {
            return Err(PyRuntimeError::new_err(FORKED));
        }
        let deadline = crate::bridge::wait::deadline_after(timeout)?;
        let mut guard = lock(py, &self.state);
        let st = &mut *guard;
        if st.poll.is_none() {
            return Err(PyValueError::new_err("the server is closed"));
        }
        let running = Running::enter(&self.shared);
        let result = (|| {
            self.start(py, st)?;
            if !st.pending.is_empty() {
                self.dispatch(py, st)?;
                return Ok(true);
            }
            let active = blocking(py, || self.io_phase(st, deadline, seen))?;
            self.dispatch(py, st)?;
            Ok(active)
        })();
        drop(running);
        drop(guard);
        if self.closing.load(Ordering::Acquire) {
            // close() was called during this round (by a callback, a signal handler or
            // another thread): finish it now that the loop is free.
            self.close(py)?;
        }
        result
    }
}
