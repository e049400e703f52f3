//! `Reactor`: the server's wait for its listening socket, on `mio`.
//!
//! One `mio::Poll` watches the listening socket and a `mio::Waker`. `shutdown()` from
//! any thread wakes the wait at once (the stdlib waits out `poll_interval`).
//!
//! Two ways to use it, decided once per server (ARCHITECTURE.md, Fast path, compatible path):
//! - *accepting* (the server's `get_request` is the library's own): `accept()` /
//!   `recvfrom()` wait and take the next connection or datagram inside the same GIL
//!   release. mio is edge-triggered, so after an event the listener counts as "maybe
//!   ready" until a non-blocking accept or receive says `EAGAIN`.
//! - *readiness only* (a subclass overrides `get_request`): `wait()` reports that the
//!   listener is readable and re-arms it before the next wait, so a second pending
//!   client raises a new event even though the user's code took only one.
//!
//! Descriptor exhaustion (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) on accept backs off
//! for a short while instead of spinning; the server keeps waiting and retries.
//!
//! Threads share the poller through a [`Turn`]: one waits with it at a time, the others
//! queue in arrival order, each until its own deadline (`handle_request(timeout)` from
//! one thread while another runs `serve_forever()` returns on time). The waker sits
//! behind an `Arc` so that `wake()` and `close()` only ever hold its mutex for a clone.
//!
//! The listening socket belongs to the user. Accepting needs it non-blocking (an
//! edge-triggered poller accepts until `EAGAIN`), and the blocking flag lives in the
//! open file description, shared with every copy of the descriptor; so the flag is set
//! only while the engine waits on the socket and put back as it was when the last wait
//! ends (`serve()` returns, or a single `accept()` finishes).
//!
//! A reactor belongs to the process that made it: after `fork()` the child shares the
//! parent's epoll instance and may hold a copy of a turn some parent thread had taken.
//! In a child, `stale` is true; the server then builds a fresh reactor and drops the
//! old one without touching the shared poller (`close()` does nothing there).

use crate::blocking::connection::Connection;
use crate::blocking::dispatch::{Dispatch, Taken};
use crate::blocking::pool::{self, Job, Refused, Work, WorkerPool};
use crate::bridge::address;
use crate::bridge::proxy::ProxyPolicy;
use crate::bridge::wait::{blocking, detached, Held, Turn};
use crate::error::{Error, Result};
use crate::sys::syscall::{self, Mode, RawAddr};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// How long to wait before retrying `accept` after running out of descriptors.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

struct PollState {
    poll: Option<Poll>,
    events: Events,
    maybe_ready: bool,
    rearm: bool,
    backoff_until: Option<Instant>,
    datagram: Vec<u8>,
    /// The listener's file status flags before the engine made it non-blocking, while it
    /// is so (see `Reactor::make_nonblocking`).
    saved_flags: Option<libc::c_int>,
}

enum Want {
    Readiness,
    Accept,
    Datagram(usize),
}

enum Outcome {
    Ready,
    Accepted(OwnedFd, RawAddr),
    /// A datagram, copied out of the shared receive buffer inside the wait (so that two
    /// threads waiting on one reactor never read each other's datagram).
    Datagram(Vec<u8>, RawAddr),
    /// Requests went to the worker pool (see `pump`).
    Dispatched,
    /// The worker pool did not take a request: the Python path must.
    Refused(Refused),
    Woken,
    TimedOut,
    Closed,
}

/// At most this many requests go to the pool in one wait before the server's thread
/// attaches again to check for `shutdown()` and signals.
const MAX_BATCH: usize = 64;

#[pyclass(module = "fastsocketserver._core", frozen)]
pub struct Reactor {
    state: Turn<PollState>,
    waker: Mutex<Option<Arc<Waker>>>,
    fd: RawFd,
    family: i32,
    kind: i32,
    proto: i32,
    accepting: bool,
    /// `close()` was called; whoever holds the wait finishes it (see `close`).
    closing: AtomicBool,
    /// How many times `wake()` was called. A wait ends as soon as this differs from
    /// the count its caller saw before it last checked for `shutdown()`: a wake is never
    /// lost to another thread's wait that happened to consume the waker's event.
    wakes: AtomicU64,
    /// How many `serve()` loops are running: while any is, the listener stays
    /// non-blocking between rounds.
    serving: AtomicUsize,
    /// A `serve()` loop ended while another thread held the poller: whoever gives the
    /// poller back next puts the listener's flags back (see `settle`).
    restore_requested: AtomicBool,
    /// The fork generation of the process that made this reactor.
    forks: u64,
    /// A duplicate of the listener, made by `close()` while the user's socket is still
    /// open, through which the closing side puts the blocking flag back: by then the
    /// user may have closed `fd` and the kernel given its number to another file.
    handoff: Mutex<Option<OwnedFd>>,
}

/// What `release` took from a closed reactor, to be closed without the GIL. Closing
/// the poller drops its registrations; nothing is deregistered by number (the
/// listener's number may already belong to another file).
struct Released {
    _poll: Option<Poll>,
    _waker: Option<Arc<Waker>>,
    listener: Option<OwnedFd>,
}

fn exhausted(code: i32) -> bool {
    matches!(
        code,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

impl Reactor {
    /// One wait, all of it detached: poll, then take the connection or datagram.
    fn step(
        &self,
        st: &mut PollState,
        want: &Want,
        deadline: Option<Instant>,
        seen: u64,
    ) -> Result<Outcome> {
        let fd = self.fd;
        let PollState {
            poll,
            events,
            maybe_ready,
            rearm,
            backoff_until,
            datagram,
            saved_flags,
        } = st;
        let poll = poll.as_mut().ok_or(Error::Os(libc::EBADF))?;
        if matches!(want, Want::Accept) && saved_flags.is_none() {
            *saved_flags = Some(syscall::make_nonblocking(fd)?);
        }
        if *rearm {
            poll.registry()
                .reregister(&mut SourceFd(&fd), LISTENER, Interest::READABLE)?;
            *rearm = false;
        }
        let mut looked = false;
        loop {
            if self.wakes.load(Ordering::Acquire) != seen || self.closing.load(Ordering::Acquire) {
                return Ok(Outcome::Woken);
            }
            let now = Instant::now();
            if backoff_until.is_some_and(|t| t <= now) {
                *backoff_until = None;
            }
            if *maybe_ready && backoff_until.is_none() {
                match want {
                    Want::Readiness => {
                        *maybe_ready = false;
                        *rearm = true;
                        return Ok(Outcome::Ready);
                    }
                    Want::Accept => match syscall::accept(fd, false) {
                        Ok((conn, addr)) => return Ok(Outcome::Accepted(conn, addr)),
                        Err(Error::Os(libc::EAGAIN)) => *maybe_ready = false,
                        Err(Error::Os(code)) if exhausted(code) => {
                            *backoff_until = Some(now + EXHAUSTED_BACKOFF)
                        }
                        Err(Error::Os(libc::ECONNABORTED | libc::EPROTO | libc::EPERM)) => continue,
                        Err(err) => return Err(err),
                    },
                    Want::Datagram(size) => {
                        datagram.resize((*size).min(syscall::MAX_RECV), 0);
                        match syscall::recvfrom(
                            fd,
                            datagram,
                            libc::MSG_DONTWAIT,
                            Mode::Blocking,
                            None,
                        ) {
                            Ok((n, addr)) => {
                                return Ok(Outcome::Datagram(datagram[..n].to_vec(), addr))
                            }
                            Err(Error::Os(libc::EAGAIN)) => *maybe_ready = false,
                            Err(err) => return Err(err),
                        }
                    }
                }
            }
            // Past the deadline, give up, but only after one look without waiting (as
            // select() with a zero timeout does), and whatever is pending, even while
            // accepting is backed off.
            if deadline.is_some_and(|d| d <= now) && looked {
                return Ok(Outcome::TimedOut);
            }
            looked = true;
            let wait_until = match (deadline, *backoff_until) {
                (Some(d), Some(b)) => Some(d.min(b)),
                (d, b) => d.or(b),
            };
            let timeout = wait_until.map(|t| t.saturating_duration_since(now));
            poll.poll(events, timeout)?;
            let mut woken = false;
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => *maybe_ready = true,
                    _ => woken = true,
                }
            }
            if woken {
                return Ok(Outcome::Woken);
            }
        }
    }

    /// Take requests and queue them on `pool` without attaching, until the wait ends,
    /// `wake()` is called, the deadline passes or `MAX_BATCH` requests went (with
    /// `batch` false, after one request). A request the pool refuses is returned.
    fn pump(
        &self,
        st: &mut PollState,
        want: &Want,
        deadline: Option<Instant>,
        pool: &Arc<pool::Shared>,
        job: &(dyn Fn(Taken) -> Job + Sync),
        batch: bool,
        seen: u64,
    ) -> Result<Outcome> {
        let mut queued = 0;
        loop {
            let taken = match self.step(st, want, deadline, seen)? {
                Outcome::Accepted(fd, addr) => Taken::Stream(fd, addr),
                Outcome::Datagram(data, addr) => Taken::Datagram(data, addr),
                Outcome::TimedOut if queued > 0 => return Ok(Outcome::Dispatched),
                other => return Ok(other),
            };
            if let Err(refused) = pool.push(job(taken)) {
                return Ok(Outcome::Refused(refused));
            }
            queued += 1;
            if !batch
                || queued >= MAX_BATCH
                || self.wakes.load(Ordering::Acquire) != seen
                || deadline.is_some_and(|d| d <= Instant::now())
            {
                return Ok(Outcome::Dispatched);
            }
        }
    }

    fn run(&self, py: Python<'_>, want: Want, timeout: Option<f64>) -> PyResult<Outcome> {
        let seen = self.wakes.load(Ordering::Acquire);
        self.run_with(py, timeout, |st, deadline| {
            self.step(st, &want, deadline, seen)
        })
    }

    /// One round's wait: `wait(state, deadline)` runs detached (see [`blocking`]).
    ///
    /// The deadline covers the wait for the poller too: a thread whose turn does not
    /// come in time times out like one whose wait saw nothing.
    fn run_with(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        mut wait: impl FnMut(&mut PollState, Option<Instant>) -> Result<Outcome> + Send,
    ) -> PyResult<Outcome> {
        let deadline = crate::bridge::wait::deadline_after(timeout)?;
        let closing = || self.closing.load(Ordering::Acquire);
        let Some(mut st) = self.state.take(py, deadline, closing)? else {
            return Ok(if closing() {
                self.close_now(py);
                Outcome::Closed
            } else {
                Outcome::TimedOut
            });
        };
        if closing() {
            self.release_held(py, st);
            return Ok(Outcome::Closed);
        }
        let outcome = {
            let st = &mut *st;
            blocking(py, || {
                let outcome = wait(st, deadline);
                if self.serving.load(Ordering::Acquire) == 0 {
                    self.restore_flags(st);
                }
                outcome
            })
        };
        if closing() {
            // close() was called meanwhile (from a signal handler or a callback of this
            // thread, or from another thread): finish it here, where the poller is held.
            self.release_held(py, st);
            return Ok(Outcome::Closed);
        }
        drop(st);
        self.settle(py);
        outcome
    }

    /// Put the listener's file status flags back as they were before the engine made
    /// it non-blocking (detached: a system call).
    fn restore_flags(&self, st: &mut PollState) {
        // A forked child's copy never puts flags back: the open file description is
        // shared with the parent, whose loop may still be waiting on it.
        if self.stale() {
            st.saved_flags = None;
        }
        if let Some(flags) = st.saved_flags.take() {
            let _ = syscall::restore_flags(self.fd, flags);
        }
    }

    /// After a `serve()` loop ended while another thread held the poller: put the
    /// flags back if no loop is left and the poller is free. Every thread that gives
    /// the poller back calls this, so the last one does it.
    fn settle(&self, py: Python<'_>) {
        while self.restore_requested.load(Ordering::Acquire) {
            let Some(mut st) = self.state.try_take() else {
                return;
            };
            self.restore_requested.store(false, Ordering::Release);
            if self.serving.load(Ordering::Acquire) == 0 && st.saved_flags.is_some() {
                let st = &mut *st;
                detached(py, || self.restore_flags(st));
            }
        }
    }

    /// Take what a closed reactor holds (the poller, the waker, the duplicate).
    fn release(&self, st: &mut PollState) -> Released {
        Released {
            _poll: st.poll.take(),
            _waker: self.waker.lock().unwrap_or_else(|p| p.into_inner()).take(),
            listener: self
                .handoff
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        }
    }

    /// Release with the poller held: the flags put back through the duplicate (none
    /// when the listener was already gone), the poller and waker closed, all detached;
    /// the turn is given back so that queued waiters see the close.
    fn release_held(&self, py: Python<'_>, mut st: Held<'_, PollState>) {
        let released = self.release(&mut st);
        {
            let st = &mut *st;
            detached(py, move || {
                let saved = st.saved_flags.take();
                if let (Some(flags), Some(fd)) = (saved, &released.listener) {
                    let _ = syscall::restore_flags(fd.as_raw_fd(), flags);
                }
                drop(released);
            });
        }
        drop(st);
        self.state.notify();
    }

    /// Finish a close now if the poller is free; otherwise wake whoever holds it, who
    /// finishes the close when its wait returns.
    fn close_now(&self, py: Python<'_>) {
        match self.state.try_take() {
            Some(st) => self.release_held(py, st),
            None => {
                self.wake_detached(py);
                self.state.notify();
            }
        }
    }

    /// Wake the current wait. The waker's mutex is held only to clone the `Arc`, never
    /// across the detach.
    fn wake_detached(&self, py: Python<'_>) {
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(waker) = waker {
            let _ = detached(py, || waker.wake());
        }
    }

    /// A taken request, or None; ValueError once the reactor is closed (as the stdlib's
    /// loop fails on a closed server's descriptor).
    fn check_closed(outcome: &Outcome) -> PyResult<()> {
        match outcome {
            Outcome::Closed => Err(PyValueError::new_err("the server is closed")),
            _ => Ok(()),
        }
    }
}

#[pymethods]
impl Reactor {
    /// Watch listening socket `fd`. With `accepting`, the reactor itself accepts
    /// connections (the socket is non-blocking only while the engine waits on it) or
    /// receives datagrams.
    #[new]
    #[pyo3(signature = (fd, family, kind, proto, accepting))]
    fn new(fd: RawFd, family: i32, kind: i32, proto: i32, accepting: bool) -> PyResult<Reactor> {
        let poll = Poll::new().map_err(Error::from)?;
        poll.registry()
            .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)
            .map_err(Error::from)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(Error::from)?;
        Ok(Reactor {
            state: Turn::new(PollState {
                poll: Some(poll),
                events: Events::with_capacity(8),
                maybe_ready: false,
                rearm: false,
                backoff_until: None,
                datagram: Vec::new(),
                saved_flags: None,
            }),
            waker: Mutex::new(Some(Arc::new(waker))),
            fd,
            family,
            kind,
            proto,
            accepting,
            closing: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            serving: AtomicUsize::new(0),
            restore_requested: AtomicBool::new(false),
            forks: crate::sys::fork::generation(),
            handoff: Mutex::new(None),
        })
    }

    /// Wait until the listening socket is readable: True, or False on timeout or wake.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let outcome = self.run(py, Want::Readiness, timeout)?;
        Self::check_closed(&outcome)?;
        Ok(matches!(outcome, Outcome::Ready))
    }

    /// Wait for and accept one connection: `(Connection, address)`, or None on timeout
    /// or wake.
    #[pyo3(signature = (timeout = None))]
    fn accept(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Option<(Connection, Py<PyAny>)>> {
        match self.run(py, Want::Accept, timeout)? {
            Outcome::Accepted(fd, addr) => {
                let conn =
                    Connection::new(fd.into_raw_fd(), self.family, libc::SOCK_STREAM, self.proto);
                Ok(Some((conn, address::to_python(py, &addr)?.unbind())))
            }
            outcome => Self::check_closed(&outcome).map(|_| None),
        }
    }

    /// Wait for and receive one datagram of at most `bufsize` bytes (longer ones are
    /// truncated): `(data, address)`, or None on timeout or wake.
    #[pyo3(signature = (bufsize, timeout = None))]
    fn recvfrom<'py>(
        &self,
        py: Python<'py>,
        bufsize: usize,
        timeout: Option<f64>,
    ) -> PyResult<Option<(Bound<'py, PyBytes>, Bound<'py, PyAny>)>> {
        match self.run(py, Want::Datagram(bufsize), timeout)? {
            Outcome::Datagram(data, addr) => Ok(Some((
                PyBytes::new(py, &data),
                address::to_python(py, &addr)?,
            ))),
            outcome => Self::check_closed(&outcome).map(|_| None),
        }
    }

    /// The `serve_forever()` loop (see [`crate::bridge::serve`]): `handle(request, address)`
    /// for each connection (accepting mode; for datagrams the request is
    /// `(data, sock)`), or `handle()` when the listener is readable (readiness mode).
    /// An `OSError` while taking a request is ignored, as the stdlib ignores one from
    /// `get_request()`.
    ///
    /// With `report` given, none of the dispatch hooks is overridden and the engine runs
    /// their library versions itself (see [`crate::blocking::dispatch`]), reporting a handler's
    /// exception through `report(request, address, exc)`. With `pool` given as well (a
    /// `ThreadingMixIn` server), requests go to the pool's workers without this thread
    /// attaching: it takes up to `MAX_BATCH` of them per wait (one, when
    /// `service_actions` must run after each), reading `server.daemon_threads` once per
    /// round. When the pool refuses one (at `max_threads`, closed) it goes through
    /// `handle`, whose `process_request` waits for room as the stdlib path does.
    ///
    /// `listener` is `server.socket` as the server saw it when the loop started: the
    /// `sock` of each datagram request and the listener a connection's request refers
    /// to. With it given, every round checks that `server.socket` is still that
    /// object; when it was replaced (closed and another socket assigned, even one with
    /// the same descriptor number), the loop ends and returns True so that the server
    /// can make a reactor for the new socket and go on. Otherwise it returns False.
    ///
    /// With `proxy` (and `report`), each connection's PROXY protocol header is read
    /// where the request runs (a pool worker, or inline with the policy's timeout)
    /// before its handler; the `handle` path reads it itself (`_handle_accepted`).
    ///
    /// Everything after `service_actions` is keyword-only.
    #[pyo3(signature = (server, poll_interval, handle, service_actions = None, *, listener = None, bufsize = 8192, report = None, pool = None, proxy = None))]
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        py: Python<'_>,
        server: &Bound<'_, PyAny>,
        poll_interval: Option<f64>,
        handle: &Bound<'_, PyAny>,
        service_actions: Option<&Bound<'_, PyAny>>,
        listener: Option<&Bound<'_, PyAny>>,
        bufsize: usize,
        report: Option<&Bound<'_, PyAny>>,
        pool: Option<&Bound<'_, WorkerPool>>,
        proxy: Option<&Bound<'_, ProxyPolicy>>,
    ) -> PyResult<bool> {
        let want = || match (self.accepting, self.kind) {
            (false, _) => Want::Readiness,
            (true, libc::SOCK_DGRAM) => Want::Datagram(bufsize),
            (true, _) => Want::Accept,
        };
        let none = py.None().into_bound(py);
        let sock = listener.unwrap_or(&none);
        let dispatch = report.map(|r| {
            Arc::new(Dispatch::new(
                server,
                r,
                Some(sock),
                self.family,
                self.proto,
                proxy,
            ))
        });
        let pool = pool
            .filter(|_| dispatch.is_some())
            .map(|p| p.get().shared.clone());
        let batch = service_actions.is_none();
        self.serving.fetch_add(1, Ordering::AcqRel);
        let mut replaced = false;
        let served = crate::bridge::serve::serve_forever(
            server,
            service_actions,
            &self.wakes,
            |stop, seen| {
                // A handler forked and the child came back here: the poller is the
                // parent's, so the loop goes on with a reactor of the child's own (as
                // for a replaced listener: the server makes a fresh one).
                if self.stale() {
                    replaced = true;
                    return Ok(true);
                }
                if let Some(listener) = listener {
                    if !server.getattr(intern!(py, "socket"))?.is(listener) {
                        replaced = true;
                        return Ok(true);
                    }
                }
                let outcome = match (&pool, &dispatch) {
                    (Some(pool), Some(dispatch)) => {
                        let tracked =
                            !server.getattr(intern!(py, "daemon_threads"))?.is_truthy()?;
                        let job = |taken| Job::new(Work::Request(dispatch.clone(), taken), tracked);
                        let want = want();
                        self.run_with(py, poll_interval, |st, deadline| {
                            self.pump(st, &want, deadline, pool, &job, batch, seen)
                        })
                    }
                    _ => {
                        let want = want();
                        self.run_with(py, poll_interval, |st, deadline| {
                            self.step(st, &want, deadline, seen)
                        })
                    }
                };
                let outcome = match outcome {
                    Ok(outcome) => outcome,
                    Err(err) if err.is_instance_of::<pyo3::exceptions::PyOSError>(py) => {
                        Outcome::TimedOut
                    }
                    Err(err) => return Err(err),
                };
                let ready = matches!(outcome, Outcome::Ready);
                let taken = match outcome {
                    Outcome::Closed => return Ok(true),
                    Outcome::Ready => None,
                    Outcome::Accepted(fd, addr) => Some(Taken::Stream(fd, addr)),
                    Outcome::Datagram(data, addr) => Some(Taken::Datagram(data, addr)),
                    Outcome::Refused(
                        Refused::Full(job) | Refused::Closed(job) | Refused::NoThread(job, _),
                    ) => match job.into_work() {
                        Work::Request(_, taken) => Some(taken),
                        Work::Call(..) => None,
                    },
                    Outcome::Dispatched | Outcome::Woken | Outcome::TimedOut => None,
                };
                // An accepted connection is closed (dropped) if this check raises.
                let stopping = stop.is_set()?;
                if ready && !stopping {
                    handle.call0()?;
                }
                if let Some(taken) = taken {
                    match (&dispatch, &pool) {
                        (Some(dispatch), None) => dispatch.run_inline(py, taken)?,
                        _ => {
                            let req = taken.into_python(py, self.family, self.proto, sock)?;
                            handle.call1((req.request, req.address))?;
                        }
                    }
                }
                Ok(stopping)
            },
        );
        // The listener goes back to its own flags once no loop is left (whoever holds
        // the poller now does it when it gives the poller back, if this cannot).
        self.serving.fetch_sub(1, Ordering::AcqRel);
        self.restore_requested.store(true, Ordering::Release);
        self.settle(py);
        served.map(|()| replaced)
    }

    /// Wake the current (or next) wait; it returns None/False.
    ///
    /// In a forked child it does nothing: the waker is the parent's.
    fn wake(&self, py: Python<'_>) -> PyResult<()> {
        if self.stale() {
            return Ok(());
        }
        self.wakes.fetch_add(1, Ordering::AcqRel);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(waker) = waker {
            detached(py, || waker.wake()).map_err(Error::from)?;
        }
        Ok(())
    }

    /// Release the poller and the waker (the listening socket is not ours to close).
    ///
    /// Safe to call while a wait is in progress, from another thread or re-entrantly from
    /// a signal handler or callback run by the waiting thread: the wait is woken and the
    /// waiting side releases the poller; `serve()` then returns and later waits raise
    /// `ValueError`.
    ///
    /// `listener_open` says that the listening socket is still open under the number
    /// the reactor was made for (false once the user closed or replaced it): only then is
    /// its blocking flag put back, through a duplicate made here.
    ///
    /// In a forked child (see `stale`) it only marks the reactor closed: the poller is
    /// shared with the parent, whose registrations must stay.
    #[pyo3(signature = (listener_open = true))]
    fn close(&self, py: Python<'_>, listener_open: bool) {
        if self.stale() {
            self.closing.store(true, Ordering::Release);
            return;
        }
        if listener_open && !self.closing.load(Ordering::Acquire) {
            // Made before `closing` is set, so whoever finishes the close finds it.
            // SAFETY: the caller says `fd` is the listener, still open.
            let dup = py.detach(|| unsafe { libc::fcntl(self.fd, libc::F_DUPFD_CLOEXEC, 0) });
            if dup >= 0 {
                // SAFETY: fcntl just returned this descriptor; nothing else owns it.
                *self.handoff.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(unsafe { OwnedFd::from_raw_fd(dup) });
            }
        }
        self.closing.store(true, Ordering::Release);
        self.close_now(py);
    }

    /// True in a process other than the one that made the reactor (a forked child).
    #[getter]
    fn stale(&self) -> bool {
        crate::sys::fork::generation() != self.forks
    }

    /// The socket type of the listening socket (`SOCK_STREAM` or `SOCK_DGRAM`).
    #[getter]
    fn kind(&self) -> i32 {
        self.kind
    }

    /// The listening socket's descriptor.
    #[getter]
    fn fd(&self) -> RawFd {
        self.fd
    }

    /// True when the reactor accepts connections (receives datagrams) itself.
    #[getter]
    fn accepting(&self) -> bool {
        self.accepting
    }
}
