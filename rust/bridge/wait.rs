//! How the engine waits: with the GIL released exactly once per wait.
//!
//! [`blocking`] runs one step (every system call it needs) inside a single
//! `Python::detach`. If a signal interrupts it, the thread re-attaches, runs the Python
//! signal handlers (`py.check_signals()`: a handler that raises ends the wait with its
//! exception, PEP 475) and otherwise goes back to the same step, whose deadline and
//! progress the caller keeps outside the closure.
//!
//! # The lock rule
//!
//! Every lock in the engine follows one rule with the GIL: **no thread holds a Rust
//! lock across a detach or an attach, and no attached thread blocks on a lock whose
//! holder could be waiting for the GIL.** Breaking it deadlocks two threads (one holds
//! the lock and waits for the GIL, the other holds the GIL and waits for the lock); only
//! a race shows it. Two tools keep it:
//!
//! - [`Turn`], for state a thread keeps during a wait (a poller): the value is taken
//!   out of its mutex for the wait, so the mutex itself is only ever held for a few
//!   instructions and may be locked while attached.
//! - [`lock`], for a mutex that may be held across a wait: it never blocks while
//!   attached (it waits detached, then tries again).
//!
//! Every crossing of the GIL in the engine goes through this module: [`blocking`] for a
//! wait (it may last, so a signal must be able to end it) and [`detached`] for a single
//! short release that no signal needs to interrupt. `grep detach rust/` finds them all
//! here.
//!
//! Any other `Mutex` in the engine is held only for short sections that neither detach
//! nor attach, which makes blocking on it while attached safe.

use crate::error::{Error, Result};
use crate::sys::syscall;
use pyo3::prelude::*;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Run `step` detached until it ends with anything but [`Error::Interrupted`], running
/// the signal handlers attached between tries (see the module doc).
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

/// Run `f` once with the GIL released and hand back its result: for a close, a wake, a
/// single system call that does not wait on a peer, or dropping owners whose destructors
/// may block. Nothing here re-attaches on a signal, so a wait that can last goes through
/// [`blocking`] instead.
pub fn detached<T: Send, F: FnOnce() -> T + Send>(py: Python<'_>, f: F) -> T {
    py.detach(f)
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

/// A value that one thread at a time takes out to wait with, while others queue for it.
///
/// This is how the engine shares a poller between threads without breaking its lock
/// rule: the `Mutex` inside is held only for a few instructions (to take the value
/// out, queue a ticket, or put the value back), never across a detach or an attach, so
/// a thread may lock it while attached — no holder can be waiting for the GIL. The
/// long wait happens with the value *out* of the mutex, in the taker's hands.
///
/// Waiters are served in arrival order (a thread that just gave the value back queues
/// behind those already waiting), and each gives up at its own deadline or when
/// `give_up` says so (the owner is closing). A thread waiting for its turn releases the
/// GIL while it waits, and re-attaches every [`TURN_SLICE`] to run signal handlers.
pub struct Turn<T> {
    slot: Mutex<Slot<T>>,
    changed: Condvar,
}

struct Slot<T> {
    value: Option<T>,
    queue: VecDeque<u64>,
    next_ticket: u64,
}

/// How long a thread waits for its turn, detached, before it re-attaches to run
/// pending signal handlers.
const TURN_SLICE: Duration = Duration::from_millis(100);

/// The value of a [`Turn`], taken out; dropping it gives it back to the next in line.
pub struct Held<'a, T> {
    turn: &'a Turn<T>,
    value: Option<T>,
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("a held turn has its value")
    }
}

impl<T> std::ops::DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("a held turn has its value")
    }
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        let mut slot = self.turn.lock_slot();
        slot.value = self.value.take();
        let waiting = !slot.queue.is_empty();
        drop(slot);
        if waiting {
            self.turn.changed.notify_all();
        }
    }
}

/// A place in the queue of a [`Turn`]; leaving it (taking the value, giving up, or an
/// exception from a signal handler) removes it and lets the next waiter look.
struct Ticket<'a, T> {
    turn: &'a Turn<T>,
    number: u64,
}

impl<T> Drop for Ticket<'_, T> {
    fn drop(&mut self) {
        let mut slot = self.turn.lock_slot();
        let before = slot.queue.len();
        slot.queue.retain(|&n| n != self.number);
        let left_now = slot.queue.len() != before;
        drop(slot);
        // A ticket that took the value left the queue already: nobody's view changed.
        if left_now {
            self.turn.changed.notify_all();
        }
    }
}

enum Look<T> {
    Got(T),
    Slice,
    Expired,
}

impl<T> Turn<T> {
    fn lock_slot(&self) -> MutexGuard<'_, Slot<T>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T: Send> Turn<T> {
    pub fn new(value: T) -> Turn<T> {
        Turn {
            slot: Mutex::new(Slot {
                value: Some(value),
                queue: VecDeque::new(),
                next_ticket: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Take the value at once if it is free and nobody is queued for it.
    pub fn try_take(&self) -> Option<Held<'_, T>> {
        let mut slot = self.lock_slot();
        if !slot.queue.is_empty() {
            return None;
        }
        let value = slot.value.take()?;
        Some(Held {
            turn: self,
            value: Some(value),
        })
    }

    /// Take the value, waiting in line (detached) until `deadline`; None at the
    /// deadline or as soon as `give_up()` is true. An exception raised by a signal
    /// handler while waiting ends the wait with that exception.
    pub fn take(
        &self,
        py: Python<'_>,
        deadline: Option<Instant>,
        give_up: impl Fn() -> bool + Sync,
    ) -> PyResult<Option<Held<'_, T>>> {
        if let Some(held) = self.try_take() {
            return Ok(Some(held));
        }
        let ticket = {
            let mut slot = self.lock_slot();
            let number = slot.next_ticket;
            slot.next_ticket += 1;
            slot.queue.push_back(number);
            Ticket { turn: self, number }
        };
        loop {
            let look = py.detach(|| self.wait_in_line(ticket.number, deadline, &give_up));
            match look {
                Look::Got(value) => {
                    drop(ticket);
                    return Ok(Some(Held {
                        turn: self,
                        value: Some(value),
                    }));
                }
                Look::Expired => return Ok(None),
                Look::Slice => py.check_signals()?,
            }
        }
    }

    /// Wait (detached) until ticket `number` is first in line and the value is back,
    /// for at most one slice.
    fn wait_in_line(
        &self,
        number: u64,
        deadline: Option<Instant>,
        give_up: &(impl Fn() -> bool + Sync),
    ) -> Look<T> {
        let slice_end = Instant::now() + TURN_SLICE;
        let mut slot = self.lock_slot();
        loop {
            if give_up() {
                return Look::Expired;
            }
            if slot.queue.front() == Some(&number) {
                if let Some(value) = slot.value.take() {
                    slot.queue.pop_front();
                    return Look::Got(value);
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Look::Expired;
            }
            if slice_end <= now {
                return Look::Slice;
            }
            let until = deadline.map_or(slice_end, |d| d.min(slice_end));
            slot = self
                .changed
                .wait_timeout(slot, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wake every waiter so that it checks its `give_up` condition again.
    pub fn notify(&self) {
        self.changed.notify_all();
    }
}

/// The deadline of a wait of `timeout` seconds from Python starting now, with the
/// stdlib's errors for a server timeout or poll interval: None waits forever, zero or
/// a negative value means now (look once without waiting), NaN raises `ValueError`
/// and a value too large to count in nanoseconds (infinity too) `OverflowError`.
pub fn deadline_after(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    let Some(t) = timeout else {
        return Ok(None);
    };
    if t <= 0.0 {
        return Ok(Some(Instant::now()));
    }
    let ns = syscall::secs_to_nanos(t)?;
    // Cannot fail: at most 2^63 ns (292 years) from now.
    Ok(Instant::now().checked_add(Duration::from_nanos(ns as u64)))
}

#[cfg(test)]
mod deadline_tests {
    use super::deadline_after;
    use std::time::Instant;

    #[test]
    fn deadline_after_handles_odd_timeouts() {
        assert_eq!(deadline_after(None).unwrap(), None);
        let now = Instant::now();
        assert!(deadline_after(Some(f64::NAN)).is_err());
        assert!(deadline_after(Some(f64::INFINITY)).is_err());
        assert!(deadline_after(Some(1e10)).is_err());
        assert!(deadline_after(Some(-1.0))
            .unwrap()
            .is_some_and(|d| d <= Instant::now()));
        assert!(deadline_after(Some(f64::NEG_INFINITY))
            .unwrap()
            .is_some_and(|d| d <= Instant::now()));
        assert!(deadline_after(Some(0.5)).unwrap().is_some_and(|d| d > now));
    }
}
