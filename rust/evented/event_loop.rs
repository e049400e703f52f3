//! `EventLoop`: the evented path (ARCHITECTURE.md, Two handler paths).
//!
//! Handlers shaped like `asyncio.Protocol` (or `asyncio.DatagramProtocol`) run on the
//! thread that serves, with no thread per connection and no thread wake per request.
//! Each `run_once()` is two phases:
//!
//! 1. **I/O, detached** (one GIL release, io.rs): send what the transports queued since
//!    the last round, close what they closed, wait on the mio `Poll`, then drain every
//!    ready socket — accept until `EAGAIN`, receive until `EAGAIN` (mio is
//!    edge-triggered) — into one arena buffer, recording events.
//! 2. **Callbacks, attached** (one GIL hold for the whole batch, callbacks.rs):
//!    `connection_made`, `data_received`, `eof_received`, `connection_lost`,
//!    `resume_writing`, `datagram_received`, `error_received`.
//!
//! This file owns the Python class, its methods and its life: making the poller,
//! running a round under the loop's mutex (one round at a time; a callback that runs
//! the loop again is refused), `wake()`, `close()` from anywhere (a callback, a signal
//! handler, another thread), the destructor, and the fork checks. What a round holds is
//! in state.rs; what a transport shares with the loop, in channel.rs.
//!
//! No system call is made with the GIL held on this path: `close()` makes its closes
//! detached, and the destructor hands what it owns to the closer.

use crate::bridge::proxy::ProxyPolicy;
use crate::bridge::wait::{blocking, detached, lock};
use crate::error::{catch_panic, Error};
use crate::evented::channel::LoopShared;
use crate::evented::io::{close_descriptors, end_endpoint, unclaimed_descriptors};
use crate::evented::state::{Conn, DatagramEndpoint, LoopState, Running, LISTENER, WAKER};
use crate::sys::syscall;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Waker};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What running the loop from inside its own callback raises (asyncio's words).
const ALREADY_RUNNING: &str = "This event loop is already running";
/// What `run_once()` raises on a loop another process made (a forked child's copy).
const FORKED: &str = "this event loop belongs to the process that made it; a forked \
                      child serves on a loop of its own (the server makes one)";

#[pyclass(module = "fastsocketserver._core", frozen)]
pub struct EventLoop {
    pub(super) state: Mutex<LoopState>,
    /// How many times `wake()` (the server's `shutdown()`) was called. A round does not
    /// block when this differs from the count its caller saw before it last checked for
    /// shutdown: a wake whose event another thread's round consumed is not lost.
    pub(super) stop_wakes: AtomicU64,
    pub(super) shared: Arc<LoopShared>,
    pub(super) fd: RawFd,
    pub(super) family: i32,
    pub(super) kind: i32,
    pub(super) proto: i32,
    pub(super) factory: Py<PyAny>,
    pub(super) verify: Option<Py<PyAny>>,
    pub(super) on_error: Py<PyAny>,
    pub(super) idle_timeout: Option<Duration>,
    /// The server's PROXY protocol settings: connections wait in `awaiting` until
    /// their header is read.
    pub(super) proxy: Option<Py<ProxyPolicy>>,
    /// `close()` was called while a round held the loop; the round finishes it.
    pub(super) closing: AtomicBool,
    /// Open connections (what `connections` reports, also from inside a callback).
    pub(super) open: AtomicUsize,
    /// False once `stop_accepting()` was called: the listener is left alone, so that
    /// a draining process takes no new connection (or datagram) from a shared socket.
    pub(super) accepting: AtomicBool,
    /// The fork generation of the process that made the loop (`crate::sys::fork`). A
    /// forked child (`os.fork()` in a callback, say) shares the parent's epoll instance
    /// and eventfd: there the loop never touches them (see `stale`), and a fork in a
    /// callback is noticed before the next callback of the round.
    pub(super) forks: u64,
}

impl EventLoop {
    pub(super) fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// True inside a round of this loop on the calling thread (a callback, or a signal
    /// handler run while it waits).
    fn running_here(&self) -> bool {
        crate::evented::channel::CURRENT_LOOP.with(|c| c.get())
            == Arc::as_ptr(&self.shared) as usize
    }

    /// This process was forked since the loop was made (one atomic load).
    pub(super) fn forked(&self) -> bool {
        crate::sys::fork::generation() != self.forks
    }

    /// The loop's state for `close()`: taken at once when free; when a round holds it,
    /// that round is woken, and then either it is this thread's own round (None: the
    /// round finishes the close when it ends) or another thread's, waited for.
    fn state_for_close(&self, py: Python<'_>) -> Option<MutexGuard<'_, LoopState>> {
        match self.state.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {
                if !self.forked() {
                    let _ = detached(py, || self.shared.wake());
                }
                if self.running_here() {
                    // A callback (or signal handler) of this loop's own round: the
                    // round finishes the close when it ends.
                    return None;
                }
                // Another thread's round, just woken: wait for it to end (detached,
                // so it can take the GIL to finish its callbacks). The caller may
                // then close the listening socket: no round is using it any more.
                Some(lock(py, &self.state))
            }
        }
    }
}

/// Each open connection's descriptor owner, taken out of its slot, its channel marked
/// closed for its transport (under the channel's short lock): the destructor's part of
/// a close, with no system call.
fn take_sockets(conns: &mut [Option<Conn>]) -> Vec<OwnedFd> {
    conns
        .iter_mut()
        .flatten()
        .filter_map(|conn| {
            let sock = conn.sock.take()?;
            conn.chan.lock_detached().mark_closed();
            Some(sock)
        })
        .collect()
}

/// At the loop's end, the protocols not yet told: each connection's (also one closed in
/// a round whose callbacks did not all run) and the datagram endpoint's get
/// `connection_lost(None)` through `lost` when `tell`; every transport lets go of its
/// protocol.
fn tell_lost(
    py: Python<'_>,
    conns: Vec<Option<Conn>>,
    datagram: Option<DatagramEndpoint>,
    tell: bool,
    mut lost: impl FnMut(&Py<PyAny>),
) {
    for mut conn in conns.into_iter().flatten() {
        // (the current protocol: it may have been switched)
        let _ = conn.refresh(py);
        if let Some(protocol) = conn.protocol.as_ref().filter(|_| tell) {
            lost(protocol);
        }
        conn.transport.get().core.release(py);
    }
    if let Some(mut ep) = datagram {
        ep.refresh(py);
        if let Some(protocol) = ep.protocol.as_ref().filter(|_| tell) {
            lost(protocol);
        }
        ep.transport.get().core.release(py);
    }
}

/// `connection_lost(None)` on `protocol`.
fn connection_lost(py: Python<'_>, protocol: &Py<PyAny>) -> PyResult<()> {
    catch_panic(|| protocol.call_method1(py, "connection_lost", (py.None(),))).map(drop)
}

/// `idle_timeout` as a duration: a positive number, or None.
fn idle_limit(idle_timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match idle_timeout {
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(_) => Err(PyValueError::new_err(
            "idle_timeout must be a positive number or None",
        )),
        None => Ok(None),
    }
}

/// The loop's poller, with the listener (`LISTENER`) and a waker (`WAKER`) registered.
fn make_poller(fd: RawFd) -> Result<(Poll, Waker), Error> {
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    Ok((poll, waker))
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
        let stale = self.forked();
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut unclaimed = unclaimed_descriptors(&mut st.pending);
        unclaimed.extend(st.awaiting.drain());
        let poll = st.poll.take();
        let waker = self.shared.take_waker();
        let socks = take_sockets(&mut st.conns);
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
            tell_lost(py, conns, datagram, !stale, |protocol| {
                if let Err(err) = connection_lost(py, protocol) {
                    err.write_unraisable(py, Some(protocol.bind(py)));
                }
            });
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
        let (poll, waker) = make_poller(fd)?;
        let idle_timeout = idle_limit(idle_timeout)?;
        Ok(EventLoop {
            state: Mutex::new(LoopState::new(poll)),
            shared: Arc::new(LoopShared::new(waker)),
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
            forks: crate::sys::fork::generation(),
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
                if self.forked() {
                    return Ok(true);
                }
                self.round(py, poll_interval, seen)?;
                Ok(self.closing.load(Ordering::Acquire) || self.forked() || stop.is_set()?)
            },
        )
    }

    /// Wake the loop's current (or next) wait.
    ///
    /// In a forked child it does nothing: the eventfd is the parent's.
    fn wake(&self) -> PyResult<()> {
        if self.forked() {
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
        let Some(mut guard) = self.state_for_close(py) else {
            return Ok(());
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
        detached(py, || {
            close_descriptors(unclaimed, &mut conns);
            if let Some(ep) = datagram.as_ref() {
                end_endpoint(ep);
            }
            drop(poll);
            drop(waker);
        });
        self.open.store(0, Ordering::Relaxed);
        if self.forked() {
            // A forked child's copy: the connections and their protocols are the
            // parent's; the child only lets go of its descriptors.
            return Ok(());
        }
        let mut first_err = None;
        // Every protocol not yet told (including connections closed in a round whose
        // callbacks did not all run) gets its connection_lost now.
        tell_lost(py, conns, datagram, true, |protocol| {
            if let Err(err) = connection_lost(py, protocol) {
                first_err.get_or_insert(err);
            }
        });
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
        self.forked()
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
        if self.forked() {
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
