//! Which process an object belongs to, after `fork()`.
//!
//! A child of `fork()` inherits copies of the engine's objects (a reactor's epoll
//! instance, shared with the parent; a pool whose threads it does not have; locks some
//! parent thread held) and must not use them as its own. Every object that cares
//! records [`generation`] when it is made and compares it later: a handler that
//! `pthread_atfork` runs in every child adds one to the count, so the check is one
//! atomic load (a `getpid()` would be a system call, and is wrong under PID
//! namespaces' reuse of numbers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static FORKS: AtomicU64 = AtomicU64::new(0);

extern "C" fn forked_child() {
    FORKS.fetch_add(1, Ordering::AcqRel);
}

/// How many `fork()`s separate this process from the one that loaded the engine.
pub fn generation() -> u64 {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: the handler only adds to an atomic (async-signal-safe), and this
        // library is never unloaded (CPython keeps extension modules loaded).
        unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
    });
    FORKS.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::generation;

    #[test]
    fn a_fork_is_counted_in_the_child_only() {
        let before = generation();
        // SAFETY: the child only reads an atomic and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = if generation() == before + 1 { 0 } else { 1 };
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just made.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(generation(), before);
    }
}
