//! How the engine waits: with the GIL released exactly once per wait.
//!
//! [`blocking`] runs one step (every system call it needs) inside a single
//! `Python::detach`. If a signal interrupts it, the thread re-attaches, runs the Python
//! signal handlers (`py.check_signals()`: a handler that raises ends the wait with its
//! exception, PEP 475) and otherwise goes back to the same step, whose deadline and
//! progress the caller keeps outside the closure.

use crate::error::{Error, Result};
use pyo3::prelude::*;

pub fn blocking<T, F>(py: Python<'_>, mut step: F) -> PyResult<T>
where
    F: FnMut() -> Result<T> + Send,
    T: Send,
{
    loop {
        match py.detach(|| step()) {
            Err(Error::Interrupted) => py.check_signals()?,
            other => return other.map_err(PyErr::from),
        }
    }
}

/// Lock `mutex` without ever blocking while attached: if another thread holds it (it
/// may be waiting on its socket, detached), wait for it detached, then try again.
pub fn lock<'a, T: Send>(
    py: Python<'_>,
    mutex: &'a std::sync::Mutex<T>,
) -> std::sync::MutexGuard<'a, T> {
    loop {
        match mutex.try_lock() {
            Ok(guard) => return guard,
            Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => py.detach(|| {
                drop(mutex.lock());
            }),
        }
    }
}
