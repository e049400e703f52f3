//! The event loop's state, named: what a round holds between its two phases (the
//! [`LoopState`] behind the loop's mutex), the [`Event`]s the I/O phase records for the
//! callback phase, and what the loop keeps per connection ([`Conn`]) and for a datagram
//! server ([`DatagramEndpoint`]).
//!
//! **Descriptors have owners.** An accepted connection is an `OwnedFd` from `accept` to
//! its close: carried in [`Event::Accepted`], then in the connection's slot
//! ([`Conn::sock`]). It is closed by dropping that owner, in one place
//! (`io::close_socket`), under the connection's channel lock and after the channel is
//! marked closed; a transport that duplicates the descriptor (`get_extra_info('socket')`)
//! does so under the same lock and only while the channel is open, so it can never
//! duplicate a number the kernel has already handed to another socket. Nothing here
//! closes a bare number.

use crate::evented::channel::{Channel, LoopShared, CURRENT_LOOP};
use crate::evented::proxy::Awaiting;
use crate::evented::transport::BaseTransport;
use crate::sys::syscall::RawAddr;
use mio::{Events, Poll, Token};
use pyo3::prelude::*;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

/// The listening socket's token (also the datagram endpoint's, whose socket it is).
pub const LISTENER: Token = Token(0);
/// The waker's token (`wake()`, a transport used from another thread).
pub const WAKER: Token = Token(1);
/// The first connection's token: connection slot `i` has token `i + FIRST_CONN`.
pub const FIRST_CONN: usize = 2;

/// Why a connection ended, for `connection_lost`.
pub enum Lost {
    Clean,
    Os(i32),
    Timeout,
    /// The exception a callback raised (kept in the connection).
    Callback,
}

/// What the I/O phase found, for the callback phase, in the order found. Received
/// bytes are in the round's arena, at `start..start + len`.
pub enum Event {
    /// A connection accepted and registered, not yet given a protocol: the event owns
    /// its descriptor until the callback phase moves it into the connection's slot.
    Accepted {
        token: usize,
        sock: OwnedFd,
        peer: RawAddr,
        local: RawAddr,
    },
    /// Bytes received on a connection.
    Data {
        token: usize,
        start: usize,
        len: usize,
    },
    /// The peer's end of stream.
    Eof { token: usize },
    /// The connection (or, with [`LISTENER`], the datagram endpoint) ended.
    Lost { token: usize, why: Lost },
    /// The queue drained to the low-water mark of a paused protocol: `resume_writing()`.
    Resume { token: usize },
    /// `resume_reading()` on a connection with received data (or its end of stream)
    /// held while it was paused: deliver it, before anything read later.
    Held { token: usize },
    /// One datagram received, from `from`.
    Datagram {
        start: usize,
        len: usize,
        from: RawAddr,
    },
    /// A datagram socket's error (`errno`), for `error_received()`.
    DatagramError { code: i32 },
    /// A connection's PROXY protocol header was refused (it is closed already): the
    /// peer, and why, for the server's log.
    ProxyRefused { peer: RawAddr, why: String },
}

/// How a connection's protocol takes received data.
pub enum Sink {
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

/// One stream connection, in its slot.
pub struct Conn {
    /// The connection's socket, owned; `None` once closed.
    pub sock: Option<OwnedFd>,
    pub chan: Arc<Channel>,
    pub transport: Py<BaseTransport>,
    pub protocol: Option<Py<PyAny>>,
    /// Where received data goes; None until the protocol is made.
    pub sink: Option<Sink>,
    /// The transport's `protocol_gen` that `protocol` and `sink` were read at.
    pub gen: u64,
    pub addr: Py<PyAny>,
    pub last_active: Instant,
    pub writable_interest: bool,
    pub eof_seen: bool,
    pub error: Option<PyErr>,
    /// Data read before the protocol called `pause_reading()` (in the same round), held
    /// for `resume_reading()`, in order; and whether the end of stream came after it.
    pub held: Vec<u8>,
    pub held_eof: bool,
}

impl Conn {
    /// A connection just accepted, its protocol not made yet.
    pub fn new(
        sock: OwnedFd,
        chan: Arc<Channel>,
        transport: Py<BaseTransport>,
        addr: Py<PyAny>,
    ) -> Conn {
        Conn {
            sock: Some(sock),
            chan,
            transport,
            protocol: None,
            sink: None,
            gen: 0,
            addr,
            last_active: Instant::now(),
            writable_interest: false,
            eof_seen: false,
            error: None,
            held: Vec::new(),
            held_eof: false,
        }
    }

    /// The descriptor, while the connection is open (only the loop, which owns it,
    /// uses this number).
    pub fn fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    pub fn closed(&self) -> bool {
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
pub struct DatagramEndpoint {
    pub chan: Arc<Channel>,
    pub transport: Py<BaseTransport>,
    /// None once the protocol got its `connection_lost`.
    pub protocol: Option<Py<PyAny>>,
    /// The protocol is a `NativeEcho`.
    pub native: bool,
    /// The transport's `protocol_gen` that `protocol` and `native` were read at.
    pub gen: u64,
    pub writable_interest: bool,
    /// Ended by the transport's `close()`/`abort()`: out of the poller.
    pub ended: bool,
}

/// What the loop holds between rounds (behind its mutex: one round at a time).
pub struct LoopState {
    /// The poller; `None` once the loop is closed.
    pub poll: Option<Poll>,
    pub events: Events,
    /// Connection slots (token `i + FIRST_CONN`), and the free ones.
    pub conns: Vec<Option<Conn>>,
    pub free: Vec<usize>,
    /// The bytes the I/O phase received this round; events point into it.
    pub arena: Vec<u8>,
    /// Events not dispatched yet (also the rest of a round a callback interrupted).
    pub pending: VecDeque<Event>,
    /// Connections to read again next round (their read budget ran out, or reading
    /// resumed).
    pub retry_read: Vec<usize>,
    /// The listener may have connections (datagrams) queued.
    pub listener_ready: bool,
    /// After running out of descriptors: no `accept` before this.
    pub backoff_until: Option<Instant>,
    pub next_idle_check: Option<Instant>,
    pub datagram: Option<DatagramEndpoint>,
    /// The first round ran (it makes the datagram endpoint).
    pub started: bool,
    /// Connections still sending their PROXY protocol header (see `evented::proxy`).
    pub awaiting: Awaiting,
}

impl LoopState {
    pub fn new(poll: Poll) -> LoopState {
        LoopState {
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
        }
    }
}

/// The connection in slot `token`, if there is one.
pub fn conn_mut(conns: &mut [Option<Conn>], token: usize) -> Option<&mut Conn> {
    conns.get_mut(token.checked_sub(FIRST_CONN)?)?.as_mut()
}

/// Marks the calling thread as running a round of one loop (in [`CURRENT_LOOP`]) for the
/// guard's life, and restores what was there before (a round of another server's loop
/// run from inside a callback).
pub struct Running {
    previous: usize,
}

impl Running {
    pub fn enter(shared: &Arc<LoopShared>) -> Running {
        let previous = CURRENT_LOOP.with(|c| c.replace(Arc::as_ptr(shared) as usize));
        Running { previous }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        CURRENT_LOOP.with(|c| c.set(self.previous));
    }
}
