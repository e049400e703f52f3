//! `WorkerPool`: the threads that run `ThreadingMixIn` handlers.
//!
//! A pool of Rust-spawned threads that grows on demand (a new thread only when no idle
//! one can take the request) and shrinks when idle (a thread retires after
//! `idle_timeout` without work). Each thread attaches to the interpreter once, for its
//! whole life, and detaches only to wait for work (ARCHITECTURE.md, The GIL rule; the way granian's
//! blocking pool runs WSGI handlers). Jobs are Python callables with their arguments; an
//! exception escaping a job goes to `threading.excepthook`, as for a `threading.Thread`.
//!
//! An optional cap (`max_threads`) bounds the threads: at the cap `submit` waits,
//! detached, until a worker is free, so the server stops accepting and new clients wait
//! in the kernel's backlog instead of costing a thread each.
//!
//! Worker threads do not block signals: they keep their creator's mask, as a
//! `threading.Thread` does. The mask is inherited by every process a handler starts
//! (`subprocess` restores the caller's mask in the child), so a worker that blocked
//! SIGTERM would start children that `Popen.terminate()` cannot stop. The kernel gives
//! a signal sent to the process to its main thread whenever that thread does not block
//! it, so SIGINT/SIGTERM still interrupt the main thread's wait at once; one that lands
//! on a worker anyway is run by the main thread at its next wake (at the latest after
//! `poll_interval`), as with the stdlib's threads.
//!
//! A reused thread must not carry one request's state into the next, since the stdlib
//! gives every request a new thread: each job runs in a new, empty `contextvars`
//! context, and the thread's state dictionary (where every `threading.local` keeps its
//! values) is cleared after each job, which also runs the destructors of what the job
//! left there, as a thread's end would. Both cost well under a microsecond per job.
//!
//! Threads get the stack size `threading.stack_size()` asked for (the Python side hands
//! it over in `stack_size`); with 0 they get what a new `threading.Thread` gets, the
//! platform's default for a new pthread.
//!
//! A pool belongs to the process that made it. A child forked while workers ran has
//! none of them, and may have inherited the pool's lock held: the pool is then `stale`,
//! its methods touch nothing and the Python side makes a new pool.

use crate::blocking::dispatch::{Dispatch, Taken};
use crate::bridge::wait::detached;
use crate::error::catch_panic;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long `submit` waits for a free worker (at the cap) between signal checks.
const CAPACITY_WAIT_SLICE: Duration = Duration::from_millis(50);

/// What a worker runs: a Python callable, or a request the server's thread took
/// without attaching (see [`crate::blocking::dispatch`]).
pub enum Work {
    Call(Py<PyAny>, Py<PyTuple>),
    Request(Arc<Dispatch>, Taken),
}

pub struct Job {
    work: Work,
    /// `join()` waits for tracked jobs (non-daemonic requests).
    tracked: bool,
}

impl Job {
    pub fn new(work: Work, tracked: bool) -> Job {
        Job { work, tracked }
    }

    /// The work of a job that was not queued.
    pub fn into_work(self) -> Work {
        self.work
    }
}

/// Why [`Shared::push`] did not queue a job.
pub enum Refused {
    /// `max_threads` requests are running or queued.
    Full(Job),
    /// The pool is closed.
    Closed(Job),
    /// No worker could be started, and there is none to take the job.
    NoThread(Job, std::io::Error),
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Job>,
    /// Live worker threads.
    threads: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// Workers spawned that have not yet attached to the interpreter.
    starting: usize,
    /// Jobs submitted and not finished (queued or running).
    busy: usize,
    /// Of those, the ones `join()` waits for.
    tracked: usize,
    /// Threads waiting on `done` (for `join()`, for capacity, for `close()`).
    done_waiters: usize,
    closing: bool,
}

pub struct Shared {
    state: Mutex<PoolState>,
    work: Condvar,
    done: Condvar,
    max_threads: Option<usize>,
    idle_timeout: Duration,
    /// Stack size for new workers (`threading.stack_size()`); 0 for the platform's default.
    stack_size: AtomicUsize,
    /// The process the pool (and its threads) belong to.
    forks: u64,
}

impl Shared {
    /// Inherited by a forked child: no worker of the pool exists here.
    fn stale(&self) -> bool {
        self.forks != crate::sys::fork::generation()
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Critical sections only update counters and the queue; never poisoned midway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait (detached) on `done` until `until` holds, or the deadline passes.
    /// [`Shared::wait_done`] from an attached caller (`server_close()` waiting for the
    /// handlers): detached in slices of `CAPACITY_WAIT_SLICE`, running the signal
    /// handlers between them, so that Ctrl-C ends the wait as it ends the stdlib's
    /// `Thread.join()`. True once `until` holds, False at `deadline`.
    fn wait_sliced(
        &self,
        py: Python<'_>,
        deadline: Option<Instant>,
        until: impl Fn(&PoolState) -> bool + Send + Sync,
    ) -> PyResult<bool> {
        loop {
            let slice = Instant::now() + CAPACITY_WAIT_SLICE;
            let slice = deadline.map_or(slice, |d| d.min(slice));
            let done = detached(py, || self.wait_done(self.lock(), Some(slice), &until).1);
            if done {
                return Ok(true);
            }
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(false);
            }
            py.check_signals()?;
        }
    }

    fn wait_done<'a>(
        &'a self,
        mut st: MutexGuard<'a, PoolState>,
        deadline: Option<Instant>,
        until: impl Fn(&PoolState) -> bool,
    ) -> (MutexGuard<'a, PoolState>, bool) {
        while !until(&st) {
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return (st, false);
            }
            st.done_waiters += 1;
            st = match deadline {
                None => self.done.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    self.done
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            st.done_waiters -= 1;
        }
        (st, true)
    }

    /// The next job for a worker (detached), or None when it should retire. `first` is
    /// true on a worker's first call, made once it is attached and ready.
    fn next_job(&self, first: bool) -> Option<Job> {
        let mut st = self.lock();
        if first {
            st.starting -= 1;
            if st.done_waiters > 0 {
                self.done.notify_all();
            }
        }
        loop {
            if let Some(job) = st.queue.pop_front() {
                return Some(job);
            }
            if st.closing {
                break;
            }
            st.idle += 1;
            let (guard, timeout) = self
                .work
                .wait_timeout(st, self.idle_timeout)
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
            st.idle -= 1;
            if timeout.timed_out() && st.queue.is_empty() {
                break;
            }
        }
        st.threads -= 1;
        if st.done_waiters > 0 {
            self.done.notify_all();
        }
        None
    }

    /// Queue `job` if there is room, and make sure a worker will take it: wake an idle
    /// one, or start a new one and wait (detached: call this detached) until it is
    /// attached and ready, as `Thread.start()` returns once the thread runs, so that a
    /// burst of requests does not start a thread each merely because the new threads
    /// had no chance to attach yet.
    pub fn push(self: &Arc<Self>, job: Job) -> Result<(), Refused> {
        if self.stale() {
            return Err(Refused::Closed(job));
        }
        let mut st = self.lock();
        if st.closing {
            return Err(Refused::Closed(job));
        }
        if st.busy >= self.max_threads.unwrap_or(usize::MAX) {
            return Err(Refused::Full(job));
        }
        st.busy += 1;
        if job.tracked {
            st.tracked += 1;
        }
        st.queue.push_back(job);
        let spawn = st.queue.len() > st.idle + st.starting
            && self.max_threads.is_none_or(|m| st.threads < m);
        let wake_idle = st.idle > 0;
        if spawn {
            st.threads += 1;
            st.starting += 1;
        }
        // Wake an idle worker after unlocking, so it does not block on the pool's lock.
        drop(st);
        if wake_idle {
            self.work.notify_one();
        }
        if !spawn {
            return Ok(());
        }
        match spawn_worker(self.clone()) {
            Ok(()) => {
                drop(self.wait_done(self.lock(), None, |s| s.starting == 0));
                Ok(())
            }
            Err(err) => {
                let mut st = self.lock();
                st.threads -= 1;
                st.starting -= 1;
                // The job stays queued for an existing worker, if there is one.
                if st.threads > 0 {
                    return Ok(());
                }
                let job = st.queue.pop_back().expect("the job just queued");
                st.busy -= 1;
                if job.tracked {
                    st.tracked -= 1;
                }
                Err(Refused::NoThread(job, err))
            }
        }
    }

    fn finished(&self, tracked: bool) {
        let mut st = self.lock();
        st.busy -= 1;
        if tracked {
            st.tracked -= 1;
        }
        if st.done_waiters > 0 {
            self.done.notify_all();
        }
    }
}

/// The body of one worker thread: attached for life, detached to wait.
fn worker(shared: Arc<Shared>) {
    let mut first = true;
    Python::attach(|py| loop {
        let Some(job) = detached(py, || shared.next_job(std::mem::take(&mut first))) else {
            break;
        };
        let tracked = job.tracked;
        let outcome = in_fresh_state(py, || match job.work {
            Work::Call(func, args) => {
                catch_panic(|| func.call1(py, args.bind(py).clone())).map(drop)
            }
            Work::Request(dispatch, taken) => dispatch.run_threaded(py, taken),
        });
        if let Err(err) = outcome {
            report(py, err);
        }
        shared.finished(tracked);
    });
}

/// Run `job` in a new empty `contextvars` context, then clear the thread's state
/// dictionary, so that the next job on this thread starts as on a new thread.
fn in_fresh_state(py: Python<'_>, job: impl FnOnce() -> PyResult<()>) -> PyResult<()> {
    // SAFETY: attached (the `py` token); the context is a new reference we own and
    // release, entered and exited on this thread.
    let context = unsafe { pyo3::ffi::PyContext_New() };
    // SAFETY: attached; `context` was checked non-null just before.
    let entered = !context.is_null() && unsafe { pyo3::ffi::PyContext_Enter(context) } == 0;
    if !entered {
        // Without a context of its own the job still runs; say why not.
        PyErr::take(py).inspect(|err| err.print(py));
    }
    let outcome = job();
    // SAFETY: attached, on the thread that entered `context` (only when `entered`).
    if entered && unsafe { pyo3::ffi::PyContext_Exit(context) } != 0 {
        // Only when the job left a context of its own entered (a misuse of the C API).
        PyErr::take(py).inspect(|err| err.print(py));
    }
    if !context.is_null() {
        // SAFETY: attached; drops the one reference PyContext_New gave us, used no more.
        unsafe { pyo3::ffi::Py_DECREF(context) };
    }
    // SAFETY: attached; a borrowed reference to this thread's dictionary (or null).
    let dict = unsafe { pyo3::ffi::PyThreadState_GetDict() };
    // SAFETY: attached; `dict` was checked non-null and is this thread's live dictionary.
    if !dict.is_null() && unsafe { pyo3::ffi::PyDict_Size(dict) } > 0 {
        // Destructors run here; what they raise goes to sys.unraisablehook.
        // SAFETY: attached; the same live, non-null dictionary as just above.
        unsafe { pyo3::ffi::PyDict_Clear(dict) };
    }
    outcome
}

/// Send an exception that escaped a job to `threading.excepthook`, as a thread would.
fn report(py: Python<'_>, err: PyErr) {
    let hooked = (|| -> PyResult<()> {
        let threading = py.import("threading")?;
        let value = err.value(py);
        let args = threading.getattr("ExceptHookArgs")?.call1(((
            value.get_type(),
            value,
            err.traceback(py),
            py.None(),
        ),))?;
        threading.getattr("excepthook")?.call1((args,))?;
        Ok(())
    })();
    if let Err(hook_err) = hooked {
        hook_err.print(py);
    }
}

/// Spawn a worker. It keeps the signal mask of the thread that starts it, as a
/// `threading.Thread` does (see the module doc).
fn spawn_worker(shared: Arc<Shared>) -> std::io::Result<()> {
    let stack = match shared.stack_size.load(Ordering::Relaxed) {
        0 => default_stack_size(),
        asked => asked,
    };
    std::thread::Builder::new()
        .name("fss-worker".into())
        .stack_size(stack)
        .spawn(move || worker(shared))
        .map(drop)
}

/// What a new pthread gets when its creator asks for nothing (what `threading.Thread`
/// gets with `threading.stack_size()` at 0): on glibc, the stack rlimit at start-up.
fn default_stack_size() -> usize {
    // SAFETY: a local attribute object, initialised, read and destroyed here.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        let mut size = 0;
        if libc::pthread_attr_init(&mut attr) != 0 {
            return 8 << 20;
        }
        let got = libc::pthread_attr_getstacksize(&attr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        if got == 0 && size > 0 {
            size
        } else {
            8 << 20
        }
    }
}

#[pyclass(module = "fastsocketserver._core", frozen, weakref)]
pub struct WorkerPool {
    pub shared: Arc<Shared>,
}

#[pymethods]
impl WorkerPool {
    /// A pool of at most `max_threads` threads (None: unbounded, like the stdlib's one
    /// thread per request); idle threads retire after `idle_timeout` seconds.
    #[new]
    #[pyo3(signature = (max_threads = None, idle_timeout = 5.0))]
    fn new(max_threads: Option<usize>, idle_timeout: f64) -> PyResult<WorkerPool> {
        if max_threads == Some(0) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "max_threads must be at least 1 or None",
            ));
        }
        if !(idle_timeout.is_finite() && idle_timeout >= 0.0) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "idle_timeout must be a finite number >= 0",
            ));
        }
        Ok(WorkerPool {
            shared: Arc::new(Shared {
                state: Mutex::new(PoolState::default()),
                work: Condvar::new(),
                done: Condvar::new(),
                max_threads,
                idle_timeout: Duration::from_secs_f64(idle_timeout),
                stack_size: AtomicUsize::new(0),
                forks: crate::sys::fork::generation(),
            }),
        })
    }

    /// Run `func(*args)` on a worker. `tracked` jobs are the ones `join()` waits for.
    /// At the thread cap, waits (detached) until a worker is free.
    #[pyo3(signature = (func, args, tracked = true))]
    fn submit(
        &self,
        py: Python<'_>,
        func: Py<PyAny>,
        args: Py<PyTuple>,
        tracked: bool,
    ) -> PyResult<()> {
        let shared = &*self.shared;
        if shared.stale() {
            return Err(PyRuntimeError::new_err(
                "this WorkerPool belongs to the parent process; a forked child needs its own",
            ));
        }
        let max = shared.max_threads.unwrap_or(usize::MAX);
        let has_room = |s: &PoolState| s.busy < max || s.closing;
        // Ctrl-C must not wait for a busy handler: a signal handler that raises ends the
        // wait before the job is queued, so the caller still owns the request.
        shared.wait_sliced(py, None, has_room)?;
        let job = Job::new(Work::Call(func, args), tracked);
        match detached(py, || self.shared.push(job)) {
            Ok(()) => Ok(()),
            Err(Refused::Closed(_)) => Err(PyRuntimeError::new_err(
                "cannot submit to a closed WorkerPool",
            )),
            Err(Refused::NoThread(_, err)) => Err(PyRuntimeError::new_err(format!(
                "can't start new thread: {err}"
            ))),
            // Another submitter took the room meanwhile: wait again.
            Err(Refused::Full(job)) => match job.into_work() {
                Work::Call(func, args) => self.submit(py, func, args, tracked),
                Work::Request(..) => unreachable!("submit queues calls only"),
            },
        }
    }

    /// Wait until every tracked job has finished; False if `timeout` passed first.
    #[pyo3(signature = (timeout = None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let shared = &*self.shared;
        let until = crate::bridge::wait::deadline_after(timeout)?;
        if shared.stale() {
            return Ok(true);
        }
        shared.wait_sliced(py, until, |s| s.tracked == 0)
    }

    /// Stop taking jobs; idle workers retire at once, busy ones after their job. Waits
    /// up to `timeout` for the threads to end; True if they all did.
    #[pyo3(signature = (timeout = None))]
    fn close(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let shared = &*self.shared;
        let until = crate::bridge::wait::deadline_after(timeout)?;
        if shared.stale() {
            return Ok(true);
        }
        {
            let mut st = shared.lock();
            st.closing = true;
            shared.work.notify_all();
        }
        shared.wait_sliced(py, until, |s| s.threads == 0)
    }

    /// Tracked jobs not yet finished (what `server_close()` waits for).
    #[getter]
    fn inflight(&self) -> usize {
        self.counter(|st| st.tracked)
    }

    /// Jobs queued or running.
    #[getter]
    fn busy(&self) -> usize {
        self.counter(|st| st.busy)
    }

    /// Live worker threads.
    #[getter]
    fn threads(&self) -> usize {
        self.counter(|st| st.threads)
    }

    /// The stack size of threads started from now on, in bytes; 0 for the platform's
    /// default. The Python side sets it from `threading.stack_size()`.
    #[getter]
    fn stack_size(&self) -> usize {
        self.shared.stack_size.load(Ordering::Relaxed)
    }

    #[setter]
    fn set_stack_size(&self, size: usize) {
        self.shared.stack_size.store(size, Ordering::Relaxed);
    }

    /// True in a process forked from the one that made the pool (whose workers the
    /// child does not have): the pool is closed there.
    #[getter]
    fn stale(&self) -> bool {
        self.shared.stale()
    }

    #[getter]
    fn max_threads(&self) -> Option<usize> {
        self.shared.max_threads
    }

    #[getter]
    fn closed(&self) -> bool {
        self.shared.stale() || self.shared.lock().closing
    }
}

impl WorkerPool {
    /// One of the pool's counters; 0 in a forked child.
    fn counter(&self, read: impl Fn(&PoolState) -> usize) -> usize {
        if self.shared.stale() {
            0
        } else {
            read(&self.shared.lock())
        }
    }
}
