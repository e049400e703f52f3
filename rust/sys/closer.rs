//! Closing descriptors from destructors without a system call under the GIL.
//!
//! # The destructor rule
//!
//! A `Drop` in this engine may run while the thread holds the GIL (a Python object's
//! deallocation, a garbage collection) and possibly while it holds a Rust lock. There it
//! must neither make a system call (`close(2)` of a TCP socket sends the FIN and runs
//! the peer's receive path on loopback; with `SO_LINGER` it can block for seconds) nor
//! attach to or detach from the interpreter (a detach under a held lock breaks the lock
//! rule of [`crate::bridge::wait`]; an attach from a thread that is not attached takes the GIL in
//! a destructor). So destructors hand what they own to [`release`] or [`run`]:
//!
//! - on a thread that does not hold the GIL, the work runs at once, in place;
//! - on a thread that holds it, the work is queued for the *closer*, one Rust thread
//!   that never touches Python and runs queued work in order. Queuing takes a mutex
//!   that nobody holds across a system call or a GIL crossing, and at most wakes the
//!   closer: nothing that can block.
//!
//! Explicit closes (`close()`, the end of a request) do not come here: they already
//! run detached, inside their own GIL release. [`settle`] waits until everything
//! queued so far is done (tests count descriptors after a collection).
//!
//! After `fork()` the child has no closer: the first queued job there starts a new
//! one, with a fresh queue (the parent's may have been locked at the fork).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

type Job = Box<dyn FnOnce() + Send>;

/// Close `fd`: at once if the calling thread does not hold the GIL, else by the closer.
pub fn release(fd: OwnedFd) {
    run(move || drop(fd));
}

/// An owned descriptor whose drop follows the destructor rule: it goes to [`release`]
/// (an `OwnedFd` would call `close(2)` wherever it is dropped).
pub struct ReleasedFd(Option<OwnedFd>);

impl ReleasedFd {
    pub fn new(fd: OwnedFd) -> ReleasedFd {
        ReleasedFd(Some(fd))
    }
}

impl std::os::fd::AsRawFd for ReleasedFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }
}

impl Drop for ReleasedFd {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            release(fd);
        }
    }
}

/// Run `job` (system calls, no Python): at once if the calling thread does not hold
/// the GIL, else by the closer.
pub fn run(job: impl FnOnce() + Send + 'static) {
    if !holds_gil() || ON_CLOSER.with(|c| c.get()) {
        job();
        return;
    }
    match queue() {
        Some(q) => q.push(Box::new(job)),
        // No closer thread could be started: closing in place is the lesser evil.
        None => job(),
    }
}

/// Wait until every job queued before the call has run. Blocks: call it detached.
pub fn settle() {
    let current = CURRENT.load(Ordering::Acquire);
    if current.is_null() {
        return;
    }
    // SAFETY: queues are never freed (see `queue`).
    let q = unsafe { &(*current).queue };
    let mut st = q.lock();
    while !st.jobs.is_empty() || st.running {
        st = q.done.wait(st).unwrap_or_else(|p| p.into_inner());
    }
}

fn holds_gil() -> bool {
    // SAFETY: both only read the interpreter's state; PyGILState_Check may be called
    // from any thread at any time.
    unsafe { pyo3::ffi::Py_IsInitialized() != 0 && pyo3::ffi::PyGILState_Check() == 1 }
}

thread_local! {
    static ON_CLOSER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct State {
    jobs: std::collections::VecDeque<Job>,
    running: bool,
}

struct Queue {
    state: Mutex<State>,
    work: Condvar,
    done: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Held only to move jobs in or out: a poisoned queue is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job) {
        self.lock().jobs.push_back(job);
        self.work.notify_one();
    }

    fn serve(&self) -> ! {
        ON_CLOSER.with(|c| c.set(true));
        let mut st = self.lock();
        loop {
            match st.jobs.pop_front() {
                Some(job) => {
                    st.running = true;
                    drop(st);
                    // A panicking job must not take the closer (and every later close)
                    // with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    st = self.lock();
                    st.running = false;
                }
                None => {
                    self.done.notify_all();
                    st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

/// The closer's queue for this process, and the fork count it was made at.
struct Current {
    queue: Queue,
    forks: u64,
}

static CURRENT: AtomicPtr<Current> = AtomicPtr::new(std::ptr::null_mut());

/// This process's queue, starting the closer thread the first time (and the first
/// time after a fork). Queues are leaked on purpose: a closer may still be using one.
fn queue() -> Option<&'static Queue> {
    loop {
        let forks = crate::sys::fork::generation();
        let current = CURRENT.load(Ordering::Acquire);
        // SAFETY: queues are never freed.
        if !current.is_null() && unsafe { (*current).forks } == forks {
            return Some(unsafe { &(*current).queue });
        }
        let fresh = Box::into_raw(Box::new(Current {
            queue: Queue {
                state: Mutex::new(State {
                    jobs: Default::default(),
                    running: false,
                }),
                work: Condvar::new(),
                done: Condvar::new(),
            },
            forks,
        }));
        if CURRENT
            .compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another thread installed one first: use that.
            // SAFETY: `fresh` was never shared.
            drop(unsafe { Box::from_raw(fresh) });
            continue;
        }
        // SAFETY: installed, hence never freed.
        let q: &'static Queue = unsafe { &(*fresh).queue };
        return spawn_closer(q).then_some(q);
    }
}

/// Start the closer thread with every asynchronous signal blocked, so that signals
/// keep going to the threads that run Python.
fn spawn_closer(q: &'static Queue) -> bool {
    // SAFETY: plain sigset manipulation on local storage; the old mask is restored.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        for sync in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
            libc::SIGSYS,
        ] {
            libc::sigdelset(&mut all, sync);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let spawned = std::thread::Builder::new()
            .name("fss-closer".into())
            .stack_size(64 * 1024)
            .spawn(move || q.serve());
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        spawned.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    #[test]
    fn without_the_gil_a_release_closes_in_place() {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let raw = r.as_raw_fd();
        release(r);
        assert!(unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0);
        drop(w);
    }

    #[test]
    fn queued_jobs_run_in_order_on_the_closer() {
        let q = queue().expect("a closer thread");
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        for i in 0..5 {
            let seen = seen.clone();
            q.push(Box::new(move || {
                assert!(ON_CLOSER.with(|c| c.get()));
                seen.lock().unwrap().push(i);
            }));
        }
        q.push(Box::new(|| panic!("a job that panics")));
        settle();
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }
}
