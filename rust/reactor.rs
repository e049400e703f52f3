//! `Reactor`: the server's wait for its listening socket, on `mio`.
//!
//! One `mio::Poll` watches the listening socket and a `mio::Waker`. `shutdown()` from
//! any thread wakes the wait at once (the stdlib waits out `poll_interval`).
//!
//! Two ways to use it, decided once per server (DESIGN.md §3):
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

use crate::address;
use crate::connection::Connection;
use crate::error::{catch_panic, is_handled, Error, Result};
use crate::syscall::{self, Mode, RawAddr};
use crate::wait::{blocking, lock};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
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
}

enum Want {
    Readiness,
    Accept,
    Datagram(usize),
}

enum Outcome {
    Ready,
    Accepted(RawFd, RawAddr),
    Datagram(usize, RawAddr),
    Woken,
    TimedOut,
    Closed,
}

#[pyclass(module = "fastsocketserver._core", frozen)]
pub struct Reactor {
    state: Mutex<PollState>,
    waker: Mutex<Option<Waker>>,
    fd: RawFd,
    family: i32,
    kind: i32,
    proto: i32,
    accepting: bool,
    /// `close()` was called; whoever holds the wait finishes it (see `close`).
    closing: AtomicBool,
}

fn exhausted(code: i32) -> bool {
    matches!(
        code,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

impl Reactor {
    /// One wait, all of it detached: poll, then take the connection or datagram.
    fn step(&self, st: &mut PollState, want: &Want, deadline: Option<Instant>) -> Result<Outcome> {
        let fd = self.fd;
        let PollState {
            poll,
            events,
            maybe_ready,
            rearm,
            backoff_until,
            datagram,
        } = st;
        let poll = poll.as_mut().ok_or(Error::Os(libc::EBADF))?;
        if *rearm {
            poll.registry()
                .reregister(&mut SourceFd(&fd), LISTENER, Interest::READABLE)?;
            *rearm = false;
        }
        let mut looked = false;
        loop {
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
                            Ok((n, addr)) => return Ok(Outcome::Datagram(n, addr)),
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

    fn run(&self, py: Python<'_>, want: Want, timeout: Option<f64>) -> PyResult<Outcome> {
        let deadline = syscall::deadline_after(timeout);
        let mut st = lock(py, &self.state);
        let st = &mut *st;
        if self.closing.load(Ordering::Acquire) {
            self.release(st);
            return Ok(Outcome::Closed);
        }
        let outcome = blocking(py, || self.step(st, &want, deadline));
        if self.closing.load(Ordering::Acquire) {
            // close() was called meanwhile (from a signal handler or a callback of this
            // thread, or from another thread): finish it here, where the lock is held.
            self.release(st);
            return Ok(Outcome::Closed);
        }
        outcome
    }

    fn release(&self, st: &mut PollState) {
        if let Some(poll) = st.poll.take() {
            let _ = poll.registry().deregister(&mut SourceFd(&self.fd));
        }
        self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
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

/// `BaseServer._handle_accepted` with the library's own hooks, for one request.
fn inline_dispatch(
    server: &Bound<'_, PyAny>,
    report: &Bound<'_, PyAny>,
    request: &Bound<'_, PyAny>,
    addr: &Bound<'_, PyAny>,
    conn: Option<&Bound<'_, Connection>>,
) -> PyResult<()> {
    let py = server.py();
    let handler = server.getattr(intern!(py, "RequestHandlerClass"))?;
    let outcome = match catch_panic(|| handler.call1((request, addr, server))) {
        Ok(_) => Ok(()),
        Err(err) if is_handled(py, &err) => {
            // As the stdlib: if handle_error itself raises, the request is left as is.
            report.call1((request, addr, err.value(py)))?;
            Ok(())
        }
        Err(err) => Err(err),
    };
    if let Some(conn) = conn {
        conn.get().shutdown_and_close(py);
    }
    outcome
}

#[pymethods]
impl Reactor {
    /// Watch listening socket `fd`. With `accepting`, the reactor itself accepts
    /// connections (the socket is put in non-blocking mode) or receives datagrams.
    #[new]
    #[pyo3(signature = (fd, family, kind, proto, accepting))]
    fn new(fd: RawFd, family: i32, kind: i32, proto: i32, accepting: bool) -> PyResult<Reactor> {
        if accepting && kind == libc::SOCK_STREAM {
            syscall::set_nonblocking(fd, true)?;
        }
        let poll = Poll::new().map_err(Error::from)?;
        poll.registry()
            .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)
            .map_err(Error::from)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(Error::from)?;
        Ok(Reactor {
            state: Mutex::new(PollState {
                poll: Some(poll),
                events: Events::with_capacity(8),
                maybe_ready: false,
                rearm: false,
                backoff_until: None,
                datagram: Vec::new(),
            }),
            waker: Mutex::new(Some(waker)),
            fd,
            family,
            kind,
            proto,
            accepting,
            closing: AtomicBool::new(false),
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
                let conn = Connection::new(fd, self.family, libc::SOCK_STREAM, self.proto);
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
            Outcome::Datagram(n, addr) => {
                let st = lock(py, &self.state);
                let data = PyBytes::new(py, &st.datagram[..n]);
                drop(st);
                Ok(Some((data, address::to_python(py, &addr)?)))
            }
            outcome => Self::check_closed(&outcome).map(|_| None),
        }
    }

    /// The `serve_forever()` loop (see [`crate::serve`]): `handle(request, address)`
    /// for each connection (accepting mode; for datagrams the request is
    /// `(data, sock)`), or `handle()` when the listener is readable (readiness mode).
    /// An `OSError` while taking a request is ignored, as the stdlib ignores one from
    /// `get_request()`.
    ///
    /// With `report` given, none of the dispatch hooks (`verify_request`,
    /// `process_request`, `finish_request`, `shutdown_request`, `close_request`) is
    /// overridden, and the engine runs their library versions itself: it instantiates
    /// `server.RequestHandlerClass(request, address, server)`, sends an exception to
    /// `report(request, address, exc)` (which calls `handle_error` inside an `except`
    /// block), and shuts the connection down and closes it in one release.
    #[pyo3(signature = (server, poll_interval, handle, service_actions = None, sock = None, bufsize = 8192, report = None))]
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        py: Python<'_>,
        server: &Bound<'_, PyAny>,
        poll_interval: Option<f64>,
        handle: &Bound<'_, PyAny>,
        service_actions: Option<&Bound<'_, PyAny>>,
        sock: Option<&Bound<'_, PyAny>>,
        bufsize: usize,
        report: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let want = || match (self.accepting, self.kind) {
            (false, _) => Want::Readiness,
            (true, libc::SOCK_DGRAM) => Want::Datagram(bufsize),
            (true, _) => Want::Accept,
        };
        crate::serve::serve_forever(server, service_actions, |stop| {
            let outcome = match self.run(py, want(), poll_interval) {
                Ok(outcome) => outcome,
                Err(err) if err.is_instance_of::<pyo3::exceptions::PyOSError>(py) => {
                    Outcome::TimedOut
                }
                Err(err) => return Err(err),
            };
            if matches!(outcome, Outcome::Closed) {
                return Ok(true);
            }
            let stopping = match stop.is_set() {
                Ok(stopping) => stopping,
                Err(err) => {
                    if let Outcome::Accepted(fd, _) = outcome {
                        // SAFETY: just accepted, owned by nothing else yet.
                        unsafe { libc::close(fd) };
                    }
                    return Err(err);
                }
            };
            match outcome {
                Outcome::Ready if !stopping => {
                    handle.call0()?;
                }
                Outcome::Accepted(fd, addr) => {
                    let conn = Bound::new(
                        py,
                        Connection::new(fd, self.family, libc::SOCK_STREAM, self.proto),
                    )?;
                    let addr = address::to_python(py, &addr)?;
                    match report {
                        Some(report) => {
                            inline_dispatch(server, report, conn.as_any(), &addr, Some(&conn))?
                        }
                        None => drop(handle.call1((conn, addr))?),
                    }
                }
                Outcome::Datagram(n, addr) => {
                    let data = PyBytes::new(py, &lock(py, &self.state).datagram[..n]);
                    let request = (data, sock).into_pyobject(py)?.into_any();
                    let addr = address::to_python(py, &addr)?;
                    match report {
                        Some(report) => inline_dispatch(server, report, &request, &addr, None)?,
                        None => drop(handle.call1((request, addr))?),
                    }
                }
                _ => {}
            }
            Ok(stopping)
        })
    }

    /// Wake the current (or next) wait; it returns None/False.
    fn wake(&self, py: Python<'_>) -> PyResult<()> {
        let waker = lock(py, &self.waker);
        if let Some(w) = waker.as_ref() {
            py.detach(|| w.wake()).map_err(Error::from)?;
        }
        Ok(())
    }

    /// Release the poller and the waker (the listening socket is not ours to close).
    ///
    /// Safe to call while a wait is in progress, from another thread or re-entrantly from
    /// a signal handler or callback run by the waiting thread: the wait is woken and the
    /// waiting side releases the poller; `serve()` then returns and later waits raise
    /// `ValueError`.
    fn close(&self, py: Python<'_>) {
        self.closing.store(true, Ordering::Release);
        match self.state.try_lock() {
            Ok(mut st) => self.release(&mut st),
            Err(std::sync::TryLockError::Poisoned(p)) => self.release(&mut p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {
                if let Some(waker) = self
                    .waker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    let _ = py.detach(|| waker.wake());
                }
            }
        }
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
