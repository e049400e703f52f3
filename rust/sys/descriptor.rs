//! Shared ownership of one socket descriptor.
//!
//! A [`SocketCore`] is shared (behind an `Arc`) by a [`Connection`](crate::blocking::connection)
//! and the reader/writer objects made from it. It owns the descriptor number and
//! guarantees the two rules of ARCHITECTURE.md, Descriptors have owners: an operation in flight holds a *use* of
//! the descriptor, and `close()` while uses are in flight only shuts the socket down
//! (waking the blocked reader or writer); the real `close(2)` happens when the last use
//! ends, under the same lock, so a reused descriptor number can never be hit by mistake.
//!
//! Destructors here follow the rule of [`crate::sys::closer`]: the last use ending, or the
//! core itself dropped, with the descriptor still to close hands it over as an
//! `OwnedFd` ([`closer::release`]), never a `close(2)` made with the GIL held.
//!
//! It also keeps the socket's timeout mode and the `makefile()` reference count that
//! `socket.socket` keeps (`close()` on the connection defers the real close while files
//! made from it are open).

use crate::error::{Error, Result};
use crate::sys::closer;
use crate::sys::syscall::Mode;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Mutex;

struct FdState {
    fd: RawFd,
    users: u32,
    pending_close: Option<OwnedFd>,
}

pub struct SocketCore {
    state: Mutex<FdState>,
    /// Bytes a buffered writer (`wbufsize > 0`) queued and has not sent yet; the
    /// reader sends them inside its next wait's GIL release (ARCHITECTURE.md, The GIL rule). The lock
    /// is held only to move bytes in or out, never across a system call.
    outbox: Mutex<Vec<u8>>,
    mode: AtomicI64,
    io_refs: AtomicUsize,
    owner_closed: AtomicBool,
    pub family: i32,
    pub kind: i32,
    pub proto: i32,
}

/// One operation's use of the descriptor; the descriptor stays open while it lives.
pub struct FdUse<'a> {
    core: &'a SocketCore,
    pub fd: RawFd,
}

impl Drop for FdUse<'_> {
    fn drop(&mut self) {
        let mut st = self.core.lock();
        st.users -= 1;
        // Nobody can reach the number any more: it closes when the owner is dropped.
        let fd = match st.users {
            0 => st.pending_close.take(),
            _ => None,
        };
        drop(st);
        if let Some(fd) = fd {
            closer::release(fd);
        }
    }
}

impl SocketCore {
    pub fn new(fd: RawFd, family: i32, kind: i32, proto: i32) -> SocketCore {
        SocketCore {
            state: Mutex::new(FdState {
                fd,
                users: 0,
                pending_close: None,
            }),
            outbox: Mutex::new(Vec::new()),
            mode: AtomicI64::new(Mode::Blocking.to_nanos()),
            io_refs: AtomicUsize::new(0),
            owner_closed: AtomicBool::new(false),
            family,
            kind,
            proto,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FdState> {
        // The lock is never held across a wait or a Python call, so poisoning can only
        // come from a panic between two plain assignments: the state is still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start an operation: the descriptor, kept open until the returned use is dropped.
    pub fn begin(&self) -> Result<FdUse<'_>> {
        let mut st = self.lock();
        if st.fd < 0 {
            return Err(Error::Os(libc::EBADF));
        }
        st.users += 1;
        Ok(FdUse {
            core: self,
            fd: st.fd,
        })
    }

    /// The descriptor number, or -1 once closed or detached.
    pub fn fileno(&self) -> RawFd {
        self.lock().fd
    }

    /// The descriptor for a file object's `fileno()`: EBADF once closed (a socket's
    /// own `fileno()` returns -1 instead).
    pub fn open_fileno(&self) -> Result<RawFd> {
        match self.fileno() {
            fd if fd < 0 => Err(Error::Os(libc::EBADF)),
            fd => Ok(fd),
        }
    }

    pub fn mode(&self) -> Mode {
        Mode::from_nanos(self.mode.load(Ordering::Relaxed))
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode.to_nanos(), Ordering::Relaxed)
    }

    /// Close the descriptor now, or, while operations are in flight, shut it down to wake
    /// them and close it when the last one ends. Makes a system call: call it detached.
    pub fn close_now(&self) {
        let mut st = self.lock();
        if st.fd < 0 {
            return;
        }
        let fd = std::mem::replace(&mut st.fd, -1);
        if st.users > 0 {
            // SAFETY: fd is still open (its close is deferred to the last user).
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            // SAFETY: the core owned the number; the pending close owns it now.
            st.pending_close = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        } else {
            // SAFETY: fd is ours and unused.
            unsafe { libc::close(fd) };
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue bytes for sending; returns how many are queued now.
    pub fn queue_out(&self, data: &[u8]) -> usize {
        let mut out = self.outbox();
        out.extend_from_slice(data);
        out.len()
    }

    /// Take everything queued, to send it.
    pub fn take_out(&self) -> Vec<u8> {
        std::mem::take(&mut *self.outbox())
    }

    /// Put back what could not be sent, ahead of anything queued since.
    pub fn restore_out(&self, mut unsent: Vec<u8>) {
        if unsent.is_empty() {
            return;
        }
        let mut out = self.outbox();
        unsent.extend_from_slice(&out);
        *out = unsent;
    }

    /// Give up ownership without closing (`socket.detach()`); -1 once closed or detached.
    ///
    /// With no operation in flight the caller gets the descriptor itself. While one is
    /// (another thread waits in `recv`, say) the number it uses must stay ours until it
    /// ends, or the caller could close it and the kernel hand it to someone else's
    /// socket. So the caller gets a duplicate instead (same socket, same close-on-exec
    /// flag), and the number in use is made to refer to an `O_PATH` stub (atomically,
    /// `dup3`): an operation already waiting in the kernel goes on with the socket, as
    /// with the stdlib, and its next system call on the number fails with EBADF, as the
    /// stdlib's does on its detached socket. The stub closes with the last use.
    /// Makes system calls that do not block, under the short lock.
    pub fn detach(&self) -> Result<RawFd> {
        let mut st = self.lock();
        if st.fd < 0 || st.users == 0 {
            return Ok(std::mem::replace(&mut st.fd, -1));
        }
        let fd = st.fd;
        let cmd = match crate::sys::syscall::get_inheritable(fd)? {
            true => libc::F_DUPFD,
            false => libc::F_DUPFD_CLOEXEC,
        };
        // SAFETY: duplicating a descriptor we own and keep open under the lock.
        let handed = crate::sys::syscall::check(unsafe { libc::fcntl(fd, cmd, 0) })?;
        // SAFETY: `handed` is the caller's from here on; the error path closes it.
        let handed_owner = unsafe { OwnedFd::from_raw_fd(handed) };
        let stub = crate::sys::syscall::path_stub()?;
        // SAFETY: both descriptors are ours; dup3 swaps what `fd` refers to in one step.
        crate::sys::syscall::check(unsafe { libc::dup3(stub.as_raw_fd(), fd, libc::O_CLOEXEC) })?;
        drop(stub);
        st.fd = -1;
        // SAFETY: the core owned `fd` (now the stub); the pending close owns it now.
        st.pending_close = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(handed_owner.into_raw_fd())
    }

    /// A file object was made from the connection (`makefile`).
    pub fn add_io_ref(&self) {
        self.io_refs.fetch_add(1, Ordering::AcqRel);
    }

    /// A file object made from the connection was closed. Returns true when the real
    /// close is now due (the connection itself was closed before).
    pub fn drop_io_ref(&self) -> bool {
        // Never below zero, whoever calls `_decref_socketios` too often.
        let before = self
            .io_refs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        before <= 1 && self.owner_closed.load(Ordering::Acquire)
    }

    /// `close()` on the connection: true when the real close is due now (no file object
    /// made from it is still open), as `socket.socket.close` decides.
    pub fn owner_close(&self) -> bool {
        self.owner_closed.store(true, Ordering::Release);
        self.io_refs.load(Ordering::Acquire) == 0
    }

    pub fn owner_closed(&self) -> bool {
        self.owner_closed.load(Ordering::Acquire)
    }
}

impl Drop for SocketCore {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.fd >= 0 {
            // SAFETY: the last owner is gone; nobody else can use the descriptor.
            closer::release(unsafe { OwnedFd::from_raw_fd(st.fd) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        assert_eq!(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) },
            0
        );
        (fds[0], fds[1])
    }

    fn is_open(fd: RawFd) -> bool {
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn close_while_in_use_is_deferred_to_the_last_user() {
        let (a, b) = pair();
        let core = SocketCore::new(a, libc::AF_UNIX, libc::SOCK_STREAM, 0);
        let usage = core.begin().unwrap();
        core.close_now();
        assert_eq!(core.fileno(), -1);
        assert!(is_open(a), "closed under a live use");
        assert!(matches!(core.begin(), Err(Error::Os(libc::EBADF))));
        drop(usage);
        assert!(!is_open(a));
        unsafe { libc::close(b) };
    }

    #[test]
    fn makefile_refs_defer_the_owner_close() {
        let (a, b) = pair();
        let core = SocketCore::new(a, libc::AF_UNIX, libc::SOCK_STREAM, 0);
        core.add_io_ref();
        assert!(!core.owner_close());
        assert!(core.drop_io_ref());
        core.close_now();
        assert!(!is_open(a));
        unsafe { libc::close(b) };
    }

    #[test]
    fn detach_leaves_the_descriptor_open() {
        let (a, b) = pair();
        let core = SocketCore::new(a, libc::AF_UNIX, libc::SOCK_STREAM, 0);
        assert_eq!(core.detach().unwrap(), a);
        drop(core);
        assert!(is_open(a));
        unsafe {
            libc::close(a);
            libc::close(b);
        }
    }

    #[test]
    fn detach_while_in_use_hands_over_a_duplicate_and_stubs_the_number() {
        let (a, b) = pair();
        let core = SocketCore::new(a, libc::AF_UNIX, libc::SOCK_STREAM, 0);
        let usage = core.begin().unwrap();
        let handed = core.detach().unwrap();
        assert_ne!(handed, a);
        assert_eq!(core.fileno(), -1);
        // The number in use is still allocated (no reuse) but no longer the socket.
        let mut byte = [0u8; 1];
        let rc = unsafe { libc::recv(usage.fd, byte.as_mut_ptr().cast(), 1, 0) };
        assert_eq!((rc, crate::error::errno()), (-1, libc::EBADF));
        assert!(is_open(a));
        drop(usage);
        closer::settle();
        assert!(!is_open(a));
        // The duplicate is the socket.
        assert_eq!(unsafe { libc::send(b, b"x".as_ptr().cast(), 1, 0) }, 1);
        assert_eq!(
            unsafe { libc::recv(handed, byte.as_mut_ptr().cast(), 1, 0) },
            1
        );
        unsafe {
            libc::close(handed);
            libc::close(b);
        }
    }
}
