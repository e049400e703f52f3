//! Phase 1 of a round, the I/O phase: detached, in one GIL release, it makes every
//! system call of the round and records [`Event`]s for the callback phase.
//!
//! In order: send what the transports queued since the last round and carry out their
//! close, abort or `write_eof` ([`EventLoop::flush`]); read again the connections left
//! over from the last round; close the idle ones; wait on the mio `Poll`; then drain
//! every ready socket: accept until `EAGAIN` (backing off when descriptors run out),
//! receive until `EAGAIN` (mio is edge-triggered), datagrams each whole. Everything
//! received goes into one arena buffer, which the events point into.
//!
//! No callback runs here and no Python object is touched. A connection ends here by
//! [`close_conn`]: its descriptor is closed at once and its `connection_lost` queued.

use crate::error::{Error, Result};
use crate::evented::channel::ChanState;
use crate::evented::event_loop::EventLoop;
use crate::evented::proxy::Outcome as HeaderOutcome;
use crate::evented::state::{conn_mut, Conn, DatagramEndpoint, Event, LoopState, Lost};
use crate::evented::state::{FIRST_CONN, LISTENER, WAKER};
use crate::sys::proxy::Policy;
use crate::sys::syscall::{self, Mode, RawAddr};
use mio::event::Event as Ready;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
/// How long to wait before retrying `accept` after running out of descriptors.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

/// What the poller reported for one token.
struct Readiness {
    token: usize,
    /// Something to read (or the end of stream, or an error, which a read reports).
    readable: bool,
    writable: bool,
    /// The peer's end of stream or an error: the next read must see it.
    closed: bool,
}

impl Readiness {
    fn of(event: &Ready) -> Readiness {
        let closed = event.is_read_closed() || event.is_error();
        Readiness {
            token: event.token().0,
            readable: event.is_readable() || closed,
            writable: event.is_writable(),
            closed,
        }
    }
}

/// One datagram received by [`recv_datagram`].
struct Received {
    len: usize,
    from: RawAddr,
    /// The kernel cut it to the buffer's size (`MSG_TRUNC` in the message flags).
    cut: bool,
}

impl EventLoop {
    /// The whole I/O phase (detached). True if the round has events, or was woken.
    /// `seen` is the wake count the caller saw before it last checked for shutdown.
    pub(super) fn io_phase(
        &self,
        st: &mut LoopState,
        deadline: Option<Instant>,
        seen: u64,
    ) -> Result<bool> {
        self.flush_dirty(st)?;
        let now = Instant::now();
        for token in std::mem::take(&mut st.retry_read) {
            self.read_conn(st, token, true, now);
        }
        if st.backoff_until.is_some_and(|t| t <= now) {
            st.backoff_until = None;
        }
        self.check_idle(st, now);
        for (token, outcome) in st.awaiting.expired(now) {
            header_done(st, token, outcome);
        }
        let timeout = self.poll_timeout(st, deadline, seen, now);
        let LoopState { poll, events, .. } = st;
        let poll = poll.as_mut().ok_or(Error::Os(libc::EBADF))?;
        poll.poll(events, timeout)?;
        let ready: Vec<Readiness> = events.iter().map(Readiness::of).collect();
        let woken = self.handle_ready(st, ready)?;
        if self.may_accept(st) {
            if self.kind == libc::SOCK_DGRAM {
                self.receive_datagrams(st);
            } else {
                self.accept_all(st)?;
            }
        }
        Ok(woken || !st.pending.is_empty())
    }

    /// Flush every transport that queued something, even if one fails (the first
    /// failure is returned).
    fn flush_dirty(&self, st: &mut LoopState) -> Result<()> {
        let mut failed = None;
        for token in self.shared.take_dirty() {
            if let Err(err) = self.flush(st, token) {
                failed.get_or_insert(err);
            }
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The listener is to be drained now.
    fn may_accept(&self, st: &LoopState) -> bool {
        st.listener_ready && st.backoff_until.is_none() && self.accepting()
    }

    /// How long the poller may wait: not at all when the round has work already (events
    /// left, a ready listener, a wake the caller has not seen), else until the earliest
    /// of the caller's deadline, the accept back-off and the next idle check.
    fn poll_timeout(
        &self,
        st: &LoopState,
        deadline: Option<Instant>,
        seen: u64,
        now: Instant,
    ) -> Option<Duration> {
        let busy = !st.pending.is_empty()
            || self.may_accept(st)
            || self.stop_wakes.load(Ordering::Acquire) != seen;
        if busy {
            return Some(Duration::ZERO);
        }
        [
            deadline,
            st.backoff_until,
            st.next_idle_check,
            st.awaiting.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.saturating_duration_since(now))
    }

    /// Act on what the poller reported: send to the writable, read the readable, note a
    /// ready listener. True if the waker was among them.
    fn handle_ready(&self, st: &mut LoopState, ready: Vec<Readiness>) -> Result<bool> {
        let mut woken = false;
        let now = Instant::now();
        for r in ready {
            match Token(r.token) {
                WAKER => woken = true,
                LISTENER => {
                    if r.readable {
                        st.listener_ready = true;
                    }
                    if r.writable && st.datagram.is_some() {
                        self.flush(st, LISTENER.0)?;
                    }
                }
                _ if st.awaiting.contains(r.token) => {
                    if let Some(outcome) = st.awaiting.readable(r.token) {
                        header_done(st, r.token, outcome);
                    }
                }
                _ => {
                    if r.writable {
                        self.flush(st, r.token)?;
                    }
                    if r.readable {
                        self.read_conn(st, r.token, r.closed, now);
                    }
                }
            }
        }
        Ok(woken)
    }

    /// Accept until `EAGAIN` (or the round's budget), registering each connection.
    /// Running out of descriptors (or memory) backs off for [`EXHAUSTED_BACKOFF`]: the
    /// listener stays ready, and the loop does not spin on it.
    fn accept_all(&self, st: &mut LoopState) -> Result<()> {
        for _ in 0..ACCEPT_BUDGET {
            match syscall::accept(self.fd, true) {
                Ok((sock, peer)) => {
                    let policy = self.proxy.as_ref().map(|p| p.get().policy());
                    register_accepted(st, sock, peer, policy)
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
            let cs = ep.chan.lock_detached();
            !(ep.ended || cs.is_closing())
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
                Ok(Received {
                    len,
                    from,
                    cut: false,
                }) => st.pending.push_back(Event::Datagram { start, len, from }),
                Ok(Received { cut: true, .. }) => {
                    st.arena.truncate(start);
                    st.pending.push_back(Event::DatagramError {
                        code: libc::EMSGSIZE,
                    });
                }
                Err(err) => {
                    st.arena.truncate(start);
                    match err {
                        Error::Os(libc::EAGAIN) => st.listener_ready = false,
                        Error::Interrupted => continue,
                        Error::Os(code) => st.pending.push_back(Event::DatagramError { code }),
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
        if !conn.chan.lock_detached().may_read() {
            return;
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
                    pending.push_back(Event::Eof { token });
                    return;
                }
                Ok(n) => {
                    conn.last_active = now;
                    push_data(pending, token, start, n);
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

    /// Send what a transport queued; carry out its close, abort or `write_eof`.
    pub(super) fn flush(&self, st: &mut LoopState, token: usize) -> Result<()> {
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
        let poll = poll.as_ref();
        let Some(conn) = conn_mut(conns, token) else {
            return Ok(());
        };
        let Some(fd) = conn.fd() else {
            return Ok(());
        };
        let chan = conn.chan.clone();
        let mut cs = chan.lock_detached();
        cs.unqueue();
        if cs.aborting() {
            drop(cs);
            let why = if conn.error.is_some() {
                Lost::Callback
            } else {
                Lost::Clean
            };
            close_conn(poll, conn, pending, token, why, &self.open);
            return Ok(());
        }
        if cs.take_read_resumed() {
            if !conn.held.is_empty() || conn.held_eof {
                pending.push_back(Event::Held { token });
            }
            retry_read.push(token);
        }
        let left = match send_stream(poll, &mut cs, fd, token, conn, pending)? {
            Sent::Left(left) => left,
            Sent::Failed(code) => {
                drop(cs);
                close_conn(poll, conn, pending, token, Lost::Os(code), &self.open);
                return Ok(());
            }
        };
        if left == 0 {
            if cs.take_eof_due() {
                // SAFETY: shutdown(2) takes a number and no memory; `fd` is the
                // connection's, open (the loop owns it and closes it only by dropping
                // `conn.sock`, which this borrow keeps alive).
                unsafe { libc::shutdown(fd, libc::SHUT_WR) };
            }
            if cs.closing() {
                drop(cs);
                close_conn(poll, conn, pending, token, Lost::Clean, &self.open);
            }
        }
        Ok(())
    }

    /// The datagram endpoint's [`EventLoop::flush`]: send the queued datagrams; end the
    /// endpoint once it is closed and they are sent (at once, if aborted).
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
        let mut cs = chan.lock_detached();
        cs.unqueue();
        cs.send_datagrams(self.fd, |code| {
            pending.push_back(Event::DatagramError { code })
        });
        if cs.aborting() {
            // What the socket did not take at once is dropped.
            cs.drop_datagrams();
        }
        if cs.aborting() || (cs.closing() && cs.datagrams_sent()) {
            // The endpoint ends: out of the poller, never read again, and the protocol
            // is told. The socket itself stays open: it is the server's.
            cs.mark_closed();
            drop(cs);
            if let Some(poll) = poll.as_ref() {
                let _ = poll.registry().deregister(&mut SourceFd(&self.fd));
            }
            ep.ended = true;
            *listener_ready = false;
            pending.push_back(Event::Lost {
                token: LISTENER.0,
                why: Lost::Clean,
            });
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

    /// Close the connections silent for `idle_timeout` (their `connection_lost` gets a
    /// `TimeoutError`), and note when the next one may expire.
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
                let token = i + FIRST_CONN;
                close_conn(
                    poll.as_ref(),
                    conn,
                    pending,
                    token,
                    Lost::Timeout,
                    &self.open,
                );
            } else {
                next = next.min(expires);
            }
        }
        st.next_idle_check = Some(next);
    }
}

/// How [`send_stream`] left a connection.
enum Sent {
    /// The bytes still queued (the connection watched for writability while any are).
    Left(usize),
    /// A send, or the poller's change of interest, failed with this `errno`: the
    /// connection ends (the loop goes on).
    Failed(i32),
}

/// Send a connection's queue (its channel's state locked by the caller), queue
/// `resume_writing` if that drained a paused protocol's queue, and watch the socket for
/// writability while bytes are left.
fn send_stream(
    poll: Option<&Poll>,
    cs: &mut ChanState,
    fd: RawFd,
    token: usize,
    conn: &mut Conn,
    pending: &mut VecDeque<Event>,
) -> Result<Sent> {
    match cs.send_out(fd) {
        Ok(()) => {}
        Err(Error::Os(code)) => return Ok(Sent::Failed(code)),
        Err(err) => return Err(err),
    }
    let left = after_flush(cs, pending, token);
    let want = left > 0;
    match watch_writable(poll, fd, Token(token), want, &mut conn.writable_interest) {
        Ok(()) => Ok(Sent::Left(left)),
        Err(Error::Os(code)) => Ok(Sent::Failed(code)),
        Err(_) => Ok(Sent::Failed(libc::EIO)),
    }
}

/// Register a connection just accepted (detached) in a slot reserved for it, and queue
/// its [`Event::Accepted`]; the connection's objects are made in the callback phase.
/// One the poller refuses is closed here (its slot freed). With a PROXY protocol
/// `policy` the connection first waits in `awaiting` for its header.
fn register_accepted(st: &mut LoopState, sock: OwnedFd, peer: RawAddr, policy: Option<&Policy>) {
    let fd = sock.as_raw_fd();
    let local = syscall::sock_name(fd, false).unwrap_or_else(|_| RawAddr::empty());
    let token = match st.free.pop() {
        Some(t) => t,
        None => {
            st.conns.push(None);
            st.conns.len() - 1 + FIRST_CONN
        }
    };
    let registered = match st.poll.as_ref() {
        Some(poll) => {
            poll.registry()
                .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
        }
        None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
    };
    if registered.is_err() {
        st.free.push(token);
        drop(sock);
        return;
    }
    if let Some(policy) = policy {
        let now = Instant::now();
        if let Some(outcome) = st.awaiting.start(policy, token, sock, peer, local, now) {
            header_done(st, token, outcome);
        }
        return;
    }
    st.pending.push_back(Event::Accepted {
        token,
        sock,
        peer,
        local,
    });
}

/// A connection's PROXY protocol header is complete: the connection goes on as a
/// newly accepted one (read at the next round: what followed the header is queued
/// already, with no edge left to announce it); or refused: closed, its slot freed, the
/// refusal reported in the callback phase.
fn header_done(st: &mut LoopState, token: usize, outcome: HeaderOutcome) {
    match outcome {
        HeaderOutcome::Ready(sock, client, local) => {
            st.pending.push_back(Event::Accepted {
                token,
                sock,
                peer: client,
                local,
            });
            st.retry_read.push(token);
        }
        HeaderOutcome::Refused(sock, peer, why) => {
            if let Some(poll) = st.poll.as_ref() {
                let _ = poll.registry().deregister(&mut SourceFd(&sock.as_raw_fd()));
            }
            drop(sock);
            st.free.push(token);
            st.pending.push_back(Event::ProxyRefused { peer, why });
        }
    }
}

/// Record `n` bytes read at `start` of the arena: appended to the last event when that
/// is this connection's data just before them, so a burst is one `data_received`.
fn push_data(pending: &mut VecDeque<Event>, token: usize, start: usize, n: usize) {
    match pending.back_mut() {
        Some(Event::Data {
            token: t,
            start: s,
            len,
        }) if *t == token && *s + *len == start => *len += n,
        _ => pending.push_back(Event::Data {
            token,
            start,
            len: n,
        }),
    }
}

/// The length of the datagram at the head of `fd`'s queue, without receiving it:
/// `MSG_PEEK | MSG_TRUNC` into an empty buffer (Linux then returns the datagram's real
/// length). `EAGAIN` when none is queued.
fn next_datagram_size(fd: RawFd) -> Result<usize> {
    let mut byte = [0u8; 1];
    // A real one-byte buffer offered with length 0: the kernel writes nothing.
    // Mode::Blocking adds no flag of its own and returns the one call's result.
    syscall::recv(
        fd,
        &mut byte[..0],
        libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        Mode::Blocking,
        None,
    )
}

/// Receive one datagram into `buf` (appended, at most `max` bytes) with its source
/// address.
fn recv_datagram(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> Result<Received> {
    // Without MSG_TRUNC in the call's flags, `len` is what was appended.
    let got = syscall::recvmsg_append(fd, buf, max, libc::MSG_DONTWAIT)?;
    Ok(Received {
        len: got.len,
        from: got.addr,
        cut: got.flags & libc::MSG_TRUNC != 0,
    })
}

/// After sending: the bytes still queued; queues `resume_writing` if the protocol was
/// paused and the queue is down to the low-water mark.
fn after_flush(cs: &mut ChanState, pending: &mut VecDeque<Event>, token: usize) -> usize {
    if cs.resume_writing_due() {
        pending.push_back(Event::Resume { token });
    }
    cs.pending()
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
pub(super) fn unclaimed_descriptors(pending: &mut VecDeque<Event>) -> Vec<OwnedFd> {
    pending
        .drain(..)
        .filter_map(|event| match event {
            Event::Accepted { sock, .. } => Some(sock),
            _ => None,
        })
        .collect()
}

/// Deregister and close a connection's socket (detached: it makes system calls). The
/// channel is marked closed and the owner dropped under the channel's lock, which is
/// what makes a duplicate made under that lock safe (see the state module's notes on
/// descriptors). True if the connection was open.
pub(super) fn close_socket(poll: Option<&Poll>, conn: &mut Conn) -> bool {
    let Some(sock) = conn.sock.take() else {
        return false;
    };
    if let Some(poll) = poll {
        let _ = poll.registry().deregister(&mut SourceFd(&sock.as_raw_fd()));
    }
    let mut cs = conn.chan.lock_detached();
    cs.mark_closed();
    drop(sock);
    drop(cs);
    true
}

/// At the loop's end, close every descriptor it owns: the `unclaimed` ones and each open
/// connection's (marked closed for its transport). Nothing is deregistered: the poller
/// is dropped next (and in a forked child it is the parent's). No callback runs here;
/// detached.
pub(super) fn close_descriptors(unclaimed: Vec<OwnedFd>, conns: &mut [Option<Conn>]) {
    drop(unclaimed);
    for conn in conns.iter_mut().flatten() {
        close_socket(None, conn);
    }
}

/// At the loop's end: the datagram endpoint's transport is dead (`sendto` ignored,
/// no socket made for `get_extra_info`: the server's socket may be closed by now).
pub(super) fn end_endpoint(ep: &DatagramEndpoint) {
    ep.chan.lock_detached().mark_closed();
}

/// Close a connection's descriptor now (detached phase) and queue its `connection_lost`.
pub(super) fn close_conn(
    poll: Option<&Poll>,
    conn: &mut Conn,
    pending: &mut VecDeque<Event>,
    token: usize,
    why: Lost,
    open: &AtomicUsize,
) {
    if close_socket(poll, conn) {
        open.fetch_sub(1, Ordering::Relaxed);
        pending.push_back(Event::Lost { token, why });
    }
}
