//! The system calls of the engine, with CPython's socket-timeout semantics.
//!
//! Nothing here calls into Python (a bad timeout's exception is built lazily, needing
//! no GIL): every function is meant to run inside one
//! `Python::detach` (ARCHITECTURE.md, The GIL rule), and reports EINTR as [`Error::Interrupted`] so the
//! caller can re-attach, run the signal handlers and come back with the same deadline.
//!
//! Timeouts never change the descriptor's `O_NONBLOCK` flag: a socket with a timeout
//! uses `MSG_DONTWAIT` per call and `poll(2)` to wait, a blocking socket makes plain
//! blocking calls (one syscall per wait, the cheapest path).

use crate::error::{Error, Result};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// A socket's timeout mode, as `socket.settimeout` sets it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// `settimeout(None)`: calls block for as long as they need.
    Blocking,
    /// `settimeout(0.0)`: calls never wait; they fail with `EAGAIN`.
    NonBlocking,
    /// `settimeout(t)`: calls wait at most `t` in all, then raise `TimeoutError`.
    Timeout(Duration),
}

impl Mode {
    /// Encode for an atomic: -1 blocking, otherwise nanoseconds.
    pub fn to_nanos(self) -> i64 {
        match self {
            Mode::Blocking => -1,
            Mode::NonBlocking => 0,
            Mode::Timeout(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        }
    }

    pub fn from_nanos(n: i64) -> Mode {
        match n {
            n if n < 0 => Mode::Blocking,
            0 => Mode::NonBlocking,
            n => Mode::Timeout(Duration::from_nanos(n as u64)),
        }
    }

    /// The deadline of one operation that starts now.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Mode::Timeout(d) => Some(Instant::now() + d),
            _ => None,
        }
    }

    fn flags(self) -> libc::c_int {
        match self {
            Mode::Blocking => 0,
            _ => libc::MSG_DONTWAIT,
        }
    }
}

/// Why a timeout in seconds has no nanosecond count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BadTimeout {
    /// The value is NaN (`ValueError`).
    NaN,
    /// The value does not fit a signed 64-bit count of nanoseconds (`OverflowError`).
    TooLarge,
}

/// Seconds as whole nanoseconds, rounded away from zero as CPython rounds a timeout
/// (so that any positive timeout, however tiny, is at least one nanosecond and a
/// timeout, never "don't wait"). The count must fit an `i64`, CPython's time type.
pub fn secs_to_nanos(secs: f64) -> std::result::Result<i64, BadTimeout> {
    if secs.is_nan() {
        return Err(BadTimeout::NaN);
    }
    let ns = secs * 1e9;
    let ns = if ns >= 0.0 { ns.ceil() } else { ns.floor() };
    // 2^63 is exact as an f64; the half-open range is exactly what an i64 holds.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if !(-LIMIT..LIMIT).contains(&ns) {
        return Err(BadTimeout::TooLarge);
    }
    Ok(ns as i64)
}

/// Whole seconds as nanoseconds, if they fit an `i64`.
pub fn int_secs_to_nanos(secs: i64) -> std::result::Result<i64, BadTimeout> {
    secs.checked_mul(1_000_000_000).ok_or(BadTimeout::TooLarge)
}

/// Nanoseconds as seconds in a float: exact for whole seconds, otherwise the nearest
/// float to `ns / 1e9` (what `gettimeout()` reports).
pub fn nanos_to_secs(ns: i64) -> f64 {
    if ns % 1_000_000_000 == 0 {
        (ns / 1_000_000_000) as f64
    } else {
        ns as f64 / 1e9
    }
}

/// Milliseconds left until `deadline` for `poll(2)`, rounded up; -1 waits forever.
pub fn poll_millis(deadline: Option<Instant>) -> libc::c_int {
    match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_nanos().div_ceil(1_000_000);
            ms.min(i32::MAX as u128) as libc::c_int
        }
    }
}

/// Wait until `fd` is ready for `events` or the deadline passes. `poll(2)` takes at
/// most `i32::MAX` milliseconds (about 25 days): a longer timeout polls again.
pub fn wait_fd(fd: RawFd, events: libc::c_short, deadline: Option<Instant>) -> Result<()> {
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, poll_millis(deadline)) };
        match n {
            n if n < 0 => return Err(Error::last_os()),
            0 if deadline.is_none_or(|d| Instant::now() >= d) => return Err(Error::Timeout),
            0 => continue,
            _ => return Ok(()),
        }
    }
}

fn would_block(e: &Error) -> bool {
    matches!(e, Error::Os(c) if *c == libc::EAGAIN || *c == libc::EWOULDBLOCK)
}

/// Run `call` (a MSG_DONTWAIT-capable syscall returning a count) under `mode`,
/// polling for `events` when it would block.
fn with_mode(
    fd: RawFd,
    mode: Mode,
    deadline: Option<Instant>,
    events: libc::c_short,
    mut call: impl FnMut(libc::c_int) -> isize,
) -> Result<usize> {
    loop {
        let n = call(mode.flags());
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = Error::last_os();
        match mode {
            Mode::Timeout(_) if would_block(&err) => wait_fd(fd, events, deadline)?,
            _ => return Err(err),
        }
    }
}

/// `recv(2)` into raw memory.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the whole call.
pub unsafe fn recv_raw(
    fd: RawFd,
    ptr: *mut u8,
    len: usize,
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<usize> {
    with_mode(fd, mode, deadline, libc::POLLIN, |f| unsafe {
        libc::recv(fd, ptr.cast(), len, flags | f)
    })
}

/// `recv(2)` into a slice.
pub fn recv(
    fd: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<usize> {
    // SAFETY: the slice is valid for writes of its length.
    unsafe { recv_raw(fd, buf.as_mut_ptr(), buf.len(), flags, mode, deadline) }
}

/// The most one receive asks for. A stream receive may return less than asked anyway,
/// and no datagram is larger; capping it keeps a huge size a handler got from a client
/// (`rfile.read(int(content_length))`) from allocating that much up front.
pub const MAX_RECV: usize = 4 * 1024 * 1024;

/// `recv(2)` appending up to `max` bytes (at most [`MAX_RECV`]) to `buf` (0 means end
/// of stream). Growing `buf` reports `MemoryError` instead of aborting the process.
pub fn recv_append(
    fd: RawFd,
    buf: &mut Vec<u8>,
    max: usize,
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<usize> {
    let max = max.min(MAX_RECV);
    buf.try_reserve(max).map_err(|_| Error::NoMemory)?;
    let len = buf.len();
    // SAFETY: `reserve` made room for `max` bytes past `len`; only received bytes are
    // exposed by `set_len`.
    unsafe {
        let n = recv_raw(fd, buf.as_mut_ptr().add(len), max, flags, mode, deadline)?;
        buf.set_len(len + n);
        Ok(n)
    }
}

/// `send(2)` once; returns how much the kernel took.
pub fn send(
    fd: RawFd,
    data: &[u8],
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<usize> {
    with_mode(fd, mode, deadline, libc::POLLOUT, |f| unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            flags | f | libc::MSG_NOSIGNAL,
        )
    })
}

/// Send all of `data[*sent..]`, advancing `*sent` as the kernel takes bytes, so that a
/// caller interrupted by a signal can resume where it stopped.
pub fn send_all(
    fd: RawFd,
    data: &[u8],
    sent: &mut usize,
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<()> {
    while *sent < data.len() {
        *sent += send(fd, &data[*sent..], flags, mode, deadline)?;
        if mode == Mode::Blocking && *sent < data.len() {
            // A blocking send returns short only when a signal interrupted it: let the
            // caller run the Python signal handlers (as socket.sendall does), then resume.
            return Err(Error::Interrupted);
        }
    }
    Ok(())
}

/// A raw socket address as the kernel fills it.
#[derive(Clone, Copy)]
pub struct RawAddr {
    pub storage: libc::sockaddr_storage,
    pub len: libc::socklen_t,
}

impl RawAddr {
    pub fn empty() -> RawAddr {
        RawAddr {
            // SAFETY: all-zero is a valid sockaddr_storage.
            storage: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    pub fn as_ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }

    pub fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        (&mut self.storage as *mut libc::sockaddr_storage).cast()
    }
}

/// `accept4(2)` one connection, close-on-exec; in blocking mode as Python sockets
/// start, unless `nonblocking` (the event loop's connections).
pub fn accept(fd: RawFd, nonblocking: bool) -> Result<(OwnedFd, RawAddr)> {
    let mut addr = RawAddr::empty();
    let flags = libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: addr has room for any address; len is in/out.
    let conn = unsafe { libc::accept4(fd, addr.as_mut_ptr(), &mut addr.len, flags) };
    if conn < 0 {
        Err(Error::last_os())
    } else {
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        Ok((unsafe { OwnedFd::from_raw_fd(conn) }, addr))
    }
}

/// `recvfrom(2)` one datagram into `buf`; returns its (possibly truncated) length.
pub fn recvfrom(
    fd: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<(usize, RawAddr)> {
    let mut addr = RawAddr::empty();
    let n = with_mode(fd, mode, deadline, libc::POLLIN, |f| {
        addr.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buf and addr are valid for their lengths.
        unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | f,
                addr.as_mut_ptr(),
                &mut addr.len,
            )
        }
    })?;
    Ok((n, addr))
}

/// `recvfrom(2)` one datagram of at most `max` bytes, appended to `buf` (no zeroing).
pub fn recvfrom_append(
    fd: RawFd,
    buf: &mut Vec<u8>,
    max: usize,
    flags: libc::c_int,
) -> Result<(usize, RawAddr)> {
    buf.reserve(max);
    let len = buf.len();
    let mut addr = RawAddr::empty();
    // SAFETY: `reserve` made room for `max` bytes past `len`; only received bytes are
    // exposed by `set_len`.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().add(len).cast(),
            max,
            flags,
            addr.as_mut_ptr(),
            &mut addr.len,
        )
    };
    if n < 0 {
        return Err(Error::last_os());
    }
    // SAFETY: the kernel wrote n <= max bytes.
    unsafe { buf.set_len(len + n as usize) };
    Ok((n as usize, addr))
}

/// `sendto(2)` one datagram.
pub fn sendto(
    fd: RawFd,
    data: &[u8],
    flags: libc::c_int,
    addr: &RawAddr,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<usize> {
    with_mode(fd, mode, deadline, libc::POLLOUT, |f| unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            flags | f | libc::MSG_NOSIGNAL,
            addr.as_ptr(),
            addr.len,
        )
    })
}

/// The data segments of one `recvmsg(2)` or `sendmsg(2)`, in the kernel's `iovec` form.
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: an `IoVecs` holds only addresses; whoever builds one promises (see `new`) that
// the memory stays valid while it is used, whichever thread the system call runs on.
unsafe impl Send for IoVecs {}
unsafe impl Sync for IoVecs {}

impl IoVecs {
    /// # Safety
    /// Every `(ptr, len)` must stay valid for reads of `len` bytes (and for writes too,
    /// when the vectors are given to [`recvmsg`]) for as long as the `IoVecs` is used.
    pub unsafe fn new(parts: impl IntoIterator<Item = (*mut u8, usize)>) -> IoVecs {
        IoVecs(
            parts
                .into_iter()
                .map(|(ptr, len)| libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: len,
                })
                .collect(),
        )
    }
}

/// What one `recvmsg(2)` returned besides the data itself.
pub struct Received {
    /// The call's return value (with `MSG_TRUNC` in the flags, a datagram's full length).
    pub len: usize,
    /// `msg_flags`: `MSG_TRUNC`, `MSG_CTRUNC`, ...
    pub flags: libc::c_int,
    /// How many bytes of the ancillary buffer the kernel filled.
    pub control_len: usize,
    /// The sender's address (length 0 when the socket type gives none).
    pub addr: RawAddr,
}

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: all-zero is a valid msghdr (no name, no data, no control).
    unsafe { std::mem::zeroed() }
}

/// `recvmsg(2)` into `iov`, with up to `control.len()` bytes of ancillary data.
///
/// Descriptors passed with `SCM_RIGHTS` arrive without close-on-exec, as CPython's
/// `socket.recvmsg` leaves them (no `MSG_CMSG_CLOEXEC` is added to `flags`).
pub fn recvmsg(
    fd: RawFd,
    iov: &IoVecs,
    control: &mut [u8],
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<Received> {
    let mut addr = RawAddr::empty();
    let mut out = (0, 0);
    let n = with_mode(fd, mode, deadline, libc::POLLIN, |f| {
        let mut msg = empty_msghdr();
        addr.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_name = addr.as_mut_ptr().cast();
        msg.msg_namelen = addr.len;
        msg.msg_iov = iov.0.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.0.len() as _;
        if !control.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
        }
        // SAFETY: the name, the control buffer and (by `IoVecs::new`'s contract) every
        // segment are valid for writes of their lengths.
        let n = unsafe { libc::recvmsg(fd, &mut msg, flags | f) };
        addr.len = msg.msg_namelen;
        out = (msg.msg_flags, msg.msg_controllen);
        n
    })?;
    Ok(Received {
        len: n,
        flags: out.0,
        control_len: out.1.min(control.len()),
        addr,
    })
}

/// `recvmsg(2)` once, no ancillary data: one datagram of at most `max` bytes appended
/// to `buf` (no zeroing), with `flags` as given (no waiting added or retried).
/// `Received::len` is what was appended unless `flags` holds `MSG_TRUNC`.
pub fn recvmsg_append(
    fd: RawFd,
    buf: &mut Vec<u8>,
    max: usize,
    flags: libc::c_int,
) -> Result<Received> {
    buf.reserve(max);
    let len = buf.len();
    // SAFETY: `reserve` made room for `max` bytes past `len`, valid for writes while
    // `buf` is borrowed here, which outlives `iov`.
    let iov = unsafe { IoVecs::new([(buf.as_mut_ptr().add(len), max)]) };
    // Mode::Blocking adds no flag, and returns the first result or error as it is.
    let got = recvmsg(fd, &iov, &mut [], flags, Mode::Blocking, None)?;
    let n = got.len.min(max);
    // SAFETY: the kernel wrote at most `max` bytes at `len` (n bytes without MSG_TRUNC),
    // inside the reserved capacity, so the first `len + n` bytes are initialised.
    unsafe { buf.set_len(len + n) };
    Ok(got)
}

/// `sendmsg(2)` of `iov` with the ancillary data `control` (built by
/// [`build_control`]), to `addr` if given.
pub fn sendmsg(
    fd: RawFd,
    iov: &IoVecs,
    control: &[u8],
    addr: Option<&RawAddr>,
    flags: libc::c_int,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<usize> {
    with_mode(fd, mode, deadline, libc::POLLOUT, |f| {
        let mut msg = empty_msghdr();
        if let Some(a) = addr {
            msg.msg_name = a.as_ptr() as *mut libc::c_void;
            msg.msg_namelen = a.len;
        }
        msg.msg_iov = iov.0.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.0.len() as _;
        if !control.is_empty() {
            msg.msg_control = control.as_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len() as _;
        }
        // SAFETY: the kernel only reads through these pointers, all valid for their lengths.
        unsafe { libc::sendmsg(fd, &msg, flags | f | libc::MSG_NOSIGNAL) }
    })
}

/// One ancillary data item found in a received control buffer.
#[derive(Debug, PartialEq)]
pub struct ControlItem {
    pub level: libc::c_int,
    pub kind: libc::c_int,
    /// Where its data lies in the buffer.
    pub data: std::ops::Range<usize>,
    /// The item's header claims more data than the buffer holds (only the part that
    /// is there is in `data`).
    pub truncated: bool,
}

/// Size of a `cmsghdr` with the padding before its data (`CMSG_LEN(0)`).
fn cmsg_header_len() -> usize {
    // SAFETY: a pure size computation.
    unsafe { libc::CMSG_LEN(0) as usize }
}

/// Round up to the alignment of ancillary data items (`CMSG_ALIGN`).
fn cmsg_align(len: usize) -> usize {
    let a = std::mem::size_of::<usize>();
    len.div_ceil(a) * a
}

/// The items of the control buffer `control` as the kernel filled it, and whether the
/// walk stopped at a malformed header (too short to be one). An item whose data runs
/// past the end is kept, cut to what is there, and marked `truncated`.
pub fn parse_control(control: &[u8]) -> (Vec<ControlItem>, bool) {
    let head = cmsg_header_len();
    let mut items = Vec::new();
    let mut at = 0usize;
    while at < control.len() {
        if control.len() - at < std::mem::size_of::<libc::cmsghdr>() {
            return (items, true);
        }
        // SAFETY: a whole header lies at `at`; it may be unaligned, hence the read.
        let hdr: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(control.as_ptr().add(at).cast()) };
        let claimed = hdr.cmsg_len as usize;
        if claimed < head || control.len() - at < head {
            return (items, true);
        }
        let end = at.saturating_add(claimed);
        items.push(ControlItem {
            level: hdr.cmsg_level,
            kind: hdr.cmsg_type,
            data: at + head..end.min(control.len()),
            truncated: end > control.len(),
        });
        at = at.saturating_add(cmsg_align(claimed));
    }
    (items, false)
}

/// Why ancillary data cannot be sent (both are `OverflowError`s in CPython).
#[derive(Debug, PartialEq)]
pub enum ControlTooLarge {
    Item,
    Total,
}

impl ControlTooLarge {
    pub fn message(&self) -> &'static str {
        match self {
            ControlTooLarge::Item => "ancillary data item too large",
            ControlTooLarge::Total => "too much ancillary data",
        }
    }
}

/// The control buffer for `sendmsg(2)` holding `items` (level, type, data), each item
/// padded to the ancillary alignment (`CMSG_SPACE`).
pub fn build_control(
    items: &[(libc::c_int, libc::c_int, &[u8])],
) -> std::result::Result<Vec<u8>, ControlTooLarge> {
    let head = cmsg_header_len();
    let mut total = 0usize;
    for (_, _, data) in items {
        let space = data
            .len()
            .checked_add(head)
            .filter(|&n| n <= u32::MAX as usize)
            .map(cmsg_align)
            .ok_or(ControlTooLarge::Item)?;
        total = total
            .checked_add(space)
            .filter(|&n| n <= i32::MAX as usize)
            .ok_or(ControlTooLarge::Total)?;
    }
    let mut control = vec![0u8; total];
    let mut at = 0usize;
    for &(level, kind, data) in items {
        // SAFETY: all-zero is a valid cmsghdr; the fields are set below.
        let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
        hdr.cmsg_len = (head + data.len()) as _;
        hdr.cmsg_level = level;
        hdr.cmsg_type = kind;
        // SAFETY: `total` counted a header's room at `at` (unaligned write: a Vec<u8>).
        unsafe { std::ptr::write_unaligned(control.as_mut_ptr().add(at).cast(), hdr) };
        control[at + head..at + head + data.len()].copy_from_slice(data);
        at += cmsg_align(head + data.len());
    }
    Ok(control)
}

/// Whether `fd` stays open in programs started by `exec` (no `FD_CLOEXEC`).
pub fn get_inheritable(fd: RawFd) -> Result<bool> {
    // SAFETY: fcntl on a descriptor the caller keeps open; failure is reported.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC == 0)
}

/// Set or clear `FD_CLOEXEC` on `fd`.
pub fn set_inheritable(fd: RawFd, inheritable: bool) -> Result<()> {
    // SAFETY: as in get_inheritable.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    let new = match inheritable {
        true => flags & !libc::FD_CLOEXEC,
        false => flags | libc::FD_CLOEXEC,
    };
    if new != flags {
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, new) })?;
    }
    Ok(())
}

/// A descriptor that refers to no file one can read, write or poll (`O_PATH`): every
/// socket call on it fails with EBADF, and `poll` reports it ready (`POLLNVAL`).
pub fn path_stub() -> Result<OwnedFd> {
    // SAFETY: a constant path; the result is checked.
    let fd = unsafe { libc::open(c"/".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    // SAFETY: open just returned this descriptor.
    check(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec duplicate of `fd`, owned.
pub fn duplicate(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: fcntl on a number the caller got from its owner just now; failure is
    // reported (EBADF for a closed one).
    let dup = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: fcntl just returned this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Check a libc return code.
pub fn check(rc: libc::c_int) -> Result<libc::c_int> {
    if rc < 0 {
        Err(Error::last_os())
    } else {
        Ok(rc)
    }
}

/// Set or clear `O_NONBLOCK` on a descriptor.
pub fn set_nonblocking(fd: RawFd, on: bool) -> Result<()> {
    // SAFETY: fcntl on a descriptor we were given; failure is reported.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        check(unsafe { libc::fcntl(fd, libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// Make `fd` non-blocking; returns its file status flags from before, for
/// [`restore_flags`].
pub fn make_nonblocking(fd: RawFd) -> Result<libc::c_int> {
    // SAFETY: fcntl on a descriptor we were given; failure is reported.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(flags)
}

/// Put back the blocking flag of `fd` as `make_nonblocking` found it.
pub fn restore_flags(fd: RawFd, before: libc::c_int) -> Result<()> {
    if before & libc::O_NONBLOCK == 0 {
        set_nonblocking(fd, false)?;
    }
    Ok(())
}

/// `getsockname(2)`/`getpeername(2)`.
pub fn sock_name(fd: RawFd, peer: bool) -> Result<RawAddr> {
    let mut addr = RawAddr::empty();
    // SAFETY: addr has room for any address.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, addr.as_mut_ptr(), &mut addr.len)
        } else {
            libc::getsockname(fd, addr.as_mut_ptr(), &mut addr.len)
        }
    };
    check(rc)?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        (fds[0], fds[1])
    }

    #[test]
    fn timeout_mode_times_out_and_nonblocking_would_block() {
        let (a, b) = pair();
        let mut buf = [0u8; 4];
        let mode = Mode::Timeout(Duration::from_millis(20));
        let start = Instant::now();
        assert!(matches!(
            recv(a, &mut buf, 0, mode, mode.deadline()),
            Err(Error::Timeout)
        ));
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(matches!(
            recv(a, &mut buf, 0, Mode::NonBlocking, None),
            Err(Error::Os(libc::EAGAIN))
        ));
        let mut sent = 0;
        send_all(b, b"hi", &mut sent, 0, Mode::Blocking, None).unwrap();
        assert_eq!(sent, 2);
        let mut v = Vec::new();
        assert_eq!(
            recv_append(a, &mut v, 16, 0, mode, mode.deadline()).unwrap(),
            2
        );
        assert_eq!(v, b"hi");
        unsafe {
            libc::close(a);
            libc::close(b);
        }
    }

    #[test]
    fn descriptors_pass_both_ways_and_truncation_is_flagged() {
        let (a, b) = pair();
        let (c, d) = pair();
        let fds: [RawFd; 2] = [c, d];
        let raw: Vec<u8> = fds.iter().flat_map(|f| f.to_ne_bytes()).collect();
        let control = build_control(&[(libc::SOL_SOCKET, libc::SCM_RIGHTS, &raw)]).unwrap();
        let mut payload = *b"fd";
        let iov = unsafe { IoVecs::new([(payload.as_mut_ptr(), 2)]) };
        assert_eq!(
            sendmsg(a, &iov, &control, None, 0, Mode::Blocking, None).unwrap(),
            2
        );
        let mut data = [0u8; 8];
        let iov = unsafe { IoVecs::new([(data.as_mut_ptr(), 8)]) };
        let mut room = vec![0u8; 64];
        let got = recvmsg(b, &iov, &mut room, 0, Mode::Blocking, None).unwrap();
        assert_eq!((got.len, got.flags), (2, 0));
        let (items, malformed) = parse_control(&room[..got.control_len]);
        assert!(!malformed);
        assert_eq!(items.len(), 1);
        assert_eq!(
            (items[0].level, items[0].kind),
            (libc::SOL_SOCKET, libc::SCM_RIGHTS)
        );
        assert_eq!(items[0].data.len(), 8);
        for chunk in room[items[0].data.clone()].chunks(4) {
            let fd = RawFd::from_ne_bytes(chunk.try_into().unwrap());
            assert_eq!(get_inheritable(fd).unwrap(), true);
            set_inheritable(fd, false).unwrap();
            assert_eq!(get_inheritable(fd).unwrap(), false);
            unsafe { libc::close(fd) };
        }
        // Room for one descriptor only: the kernel flags MSG_CTRUNC.
        sendmsg(
            a,
            &unsafe { IoVecs::new([(payload.as_mut_ptr(), 2)]) },
            &control,
            None,
            0,
            Mode::Blocking,
            None,
        )
        .unwrap();
        let mut room = vec![0u8; unsafe { libc::CMSG_LEN(4) } as usize];
        let got = recvmsg(b, &iov, &mut room, 0, Mode::Blocking, None).unwrap();
        assert_eq!(got.flags & libc::MSG_CTRUNC, libc::MSG_CTRUNC);
        let (items, _) = parse_control(&room[..got.control_len]);
        assert_eq!(items[0].data.len(), 4);
        let fd = RawFd::from_ne_bytes(room[items[0].data.clone()].try_into().unwrap());
        unsafe {
            libc::close(fd);
            for f in [a, b, c, d] {
                libc::close(f);
            }
        }
    }

    #[test]
    fn control_parsing_marks_short_and_cut_items() {
        let control = build_control(&[(1, 2, b"abcd"), (3, 4, b"xy")]).unwrap();
        let (items, malformed) = parse_control(&control);
        assert!(!malformed);
        assert_eq!(items.len(), 2);
        assert_eq!(&control[items[1].data.clone()], b"xy");
        let cut = cmsg_header_len() + 2;
        let (items, malformed) = parse_control(&control[..cut]);
        assert!(!malformed);
        assert!(items[0].truncated);
        assert_eq!(&control[items[0].data.clone()], b"ab");
        let (items, malformed) = parse_control(&control[..4]);
        assert!(malformed && items.is_empty());
        assert_eq!(build_control(&[]).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn mode_round_trips_through_nanos() {
        for m in [
            Mode::Blocking,
            Mode::NonBlocking,
            Mode::Timeout(Duration::from_millis(1500)),
        ] {
            assert_eq!(Mode::from_nanos(m.to_nanos()), m);
        }
    }

    #[test]
    fn timeouts_round_up_to_whole_nanoseconds() {
        assert_eq!(secs_to_nanos(1e-10), Ok(1));
        assert_eq!(secs_to_nanos(5e-324), Ok(1));
        assert_eq!(secs_to_nanos(1.5e-9), Ok(2));
        assert_eq!(secs_to_nanos(-0.0), Ok(0));
        assert_eq!(secs_to_nanos(-1e-10), Ok(-1));
        assert_eq!(secs_to_nanos(f64::NAN), Err(BadTimeout::NaN));
        assert_eq!(secs_to_nanos(9.3e9), Err(BadTimeout::TooLarge));
        assert_eq!(secs_to_nanos(9.2e9), Ok(9_200_000_000_000_000_000));
        assert_eq!(int_secs_to_nanos(9_223_372_037), Err(BadTimeout::TooLarge));
        assert_eq!(nanos_to_secs(1), 1e-9);
        assert_eq!(nanos_to_secs(3_000_000_000), 3.0);
    }

    #[test]
    fn poll_millis_rounds_up() {
        let d = Instant::now() + Duration::from_micros(10);
        assert!(poll_millis(Some(d)) <= 1);
        assert_eq!(poll_millis(None), -1);
    }
}
