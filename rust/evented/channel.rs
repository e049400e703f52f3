//! The channel between one transport and its event loop: what the transport queued,
//! how it wants the connection to end, and both halves of flow control.
//!
//! A small write makes no system call: `write()` queues bytes on the [`Channel`] and
//! marks it dirty; the loop sends everything queued inside its next GIL release
//! (ARCHITECTURE.md, The GIL rule). Flow control follows asyncio: the protocol's
//! `pause_writing()` is called once when the queue exceeds the high-water mark with the
//! socket full ([`ChanState::pause_writing_due`], asked by the transport after each
//! write) and `resume_writing()` once when the loop has drained it to the low-water
//! mark ([`ChanState::resume_writing_due`], asked by the loop after each send).
//! Reading is paused and resumed here too: `pause_reading()` holds at once, and
//! `resume_reading()` leaves a note for the loop (edge-triggered, it must try a read).
//!
//! The state sits behind the channel's mutex. Attached code takes it through
//! [`Channel::lock`] (the lock rule's tool, which never blocks while attached); the
//! loop's detached phase through [`Channel::lock_detached`]. Every holder keeps it only
//! for a section that neither detaches nor attaches; the system calls made under it
//! (`send`, `sendto`, the loop's close and the transport's duplicate) do not block.
//!
//! A transport may be used from another thread: it then wakes the loop, so the write is
//! not left waiting for the next event.

use crate::bridge::wait::lock;
use crate::error::{Error, Result};
use crate::sys::syscall::{self, Mode, RawAddr};
use mio::Waker;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

/// asyncio's default write buffer limits.
pub const DEFAULT_HIGH_WATER: usize = 64 * 1024;

thread_local! {
    /// The loop whose round this thread is running (address of its `LoopShared`), 0 if none.
    pub static CURRENT_LOOP: Cell<usize> = const { Cell::new(0) };
}

/// What the loop and its transports share.
pub struct LoopShared {
    /// Tokens of channels with work for the loop's next I/O phase.
    dirty: Mutex<Vec<usize>>,
    /// Dropped when the loop closes, so transports that outlive their loop do not keep
    /// its eventfd open.
    waker: Mutex<Option<Waker>>,
}

impl LoopShared {
    pub fn new(waker: Waker) -> LoopShared {
        LoopShared {
            dirty: Mutex::new(Vec::new()),
            waker: Mutex::new(Some(waker)),
        }
    }

    pub fn wake(&self) -> std::io::Result<()> {
        match self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(waker) => waker.wake(),
            None => Ok(()),
        }
    }

    /// Take the waker out at the loop's close (its eventfd is closed when dropped).
    pub fn take_waker(&self) -> Option<Waker> {
        self.waker.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The tokens of the channels marked dirty since the last call (the loop's I/O
    /// phase takes them all at its start).
    pub fn take_dirty(&self) -> Vec<usize> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn on_loop_thread(self: &Arc<Self>) -> bool {
        CURRENT_LOOP.with(|c| c.get()) == Arc::as_ptr(self) as usize
    }
}

/// A datagram queued by `sendto()`, with its destination.
pub struct QueuedDatagram {
    pub data: Vec<u8>,
    pub to: RawAddr,
}

/// The state behind a channel's mutex. Its fields are the channel's own: the transport
/// and the loop change them only through the methods here.
#[derive(Default)]
pub struct ChanState {
    /// A stream's queued bytes; those before `out_pos` are sent.
    out: Vec<u8>,
    out_pos: usize,
    /// Datagrams waiting to be sent, with their destinations.
    datagrams: VecDeque<QueuedDatagram>,
    datagram_bytes: usize,
    /// Already in the loop's dirty list.
    queued: bool,
    closing: bool,
    aborting: bool,
    eof_requested: bool,
    eof_sent: bool,
    read_paused: bool,
    /// `resume_reading()` was called: the loop must try to read (edge-triggered).
    read_resumed: bool,
    /// The write buffer limits as numbers to compare with (asyncio's may be floats).
    high: f64,
    low: f64,
    writing_paused: bool,
    /// The descriptor is closed; the transport is dead.
    closed: bool,
}

impl ChanState {
    /// Whether `pause_writing()` was called and `resume_writing()` not yet.
    pub fn writing_paused(&self) -> bool {
        self.writing_paused
    }

    /// Bytes queued and not yet taken by the socket.
    pub fn pending(&self) -> usize {
        self.out.len() - self.out_pos + self.datagram_bytes
    }

    /// `close()` or `abort()` was called, or the descriptor is closed: nothing more is
    /// delivered to the protocol (asyncio's `is_closing()`).
    pub fn is_closing(&self) -> bool {
        self.closing || self.aborting || self.closed
    }

    /// `close()` was called (the connection ends once its queue is sent).
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// `abort()` was called (the connection ends now, its queue dropped).
    pub fn aborting(&self) -> bool {
        self.aborting
    }

    /// The descriptor is closed (or, for a datagram endpoint, no longer used).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Mark the descriptor closed: the transport is dead. The loop does this under the
    /// lock just before it drops the descriptor's owner (see [`Channel`]).
    pub fn mark_closed(&mut self) {
        self.closed = true;
    }

    /// Reading is paused (by `pause_reading()` or `close()`).
    pub fn read_paused(&self) -> bool {
        self.read_paused
    }

    /// Whether the loop may read the connection now.
    pub fn may_read(&self) -> bool {
        !(self.read_paused || self.closed || self.aborting)
    }

    /// The loop took the channel off its dirty list: a later change marks it again.
    pub fn unqueue(&mut self) {
        self.queued = false;
    }

    /// Whether `resume_reading()` was called since the loop last asked (it must try a
    /// read, and deliver what was held while paused).
    pub fn take_read_resumed(&mut self) -> bool {
        std::mem::take(&mut self.read_resumed)
    }

    /// Send what the socket takes of the stream queue now, without waiting: stops at
    /// `EAGAIN` (Ok) or at the first other error (returned, the rest left queued).
    pub fn send_out(&mut self, fd: RawFd) -> Result<()> {
        let mut result = Ok(());
        while self.out_pos < self.out.len() {
            match syscall::send(fd, &self.out[self.out_pos..], 0, Mode::NonBlocking, None) {
                Ok(n) => self.out_pos += n,
                Err(Error::Os(libc::EAGAIN)) => break,
                Err(Error::Interrupted) => continue,
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        result
    }

    /// Send the queued datagrams on `fd` until the socket is full. A datagram the
    /// socket refused with an error is dropped, and the error given to `failed`.
    pub fn send_datagrams(&mut self, fd: RawFd, mut failed: impl FnMut(i32)) {
        while let Some(queued) = self.datagrams.front() {
            match syscall::sendto(fd, &queued.data, 0, &queued.to, Mode::NonBlocking, None) {
                Err(Error::Os(libc::EAGAIN)) => break,
                Err(Error::Interrupted) => continue,
                other => {
                    self.datagram_bytes -= queued.data.len();
                    self.datagrams.pop_front();
                    if let Err(Error::Os(code)) = other {
                        failed(code);
                    }
                }
            }
        }
    }

    /// Drop the datagrams the socket has not taken (at an abort).
    pub fn drop_datagrams(&mut self) {
        self.datagrams.clear();
        self.datagram_bytes = 0;
    }

    /// Whether no datagram is waiting to be sent.
    pub fn datagrams_sent(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Whether `write_eof()` asked for the write side to be shut down and it has not
    /// been yet: true once, and the caller then shuts it down.
    pub fn take_eof_due(&mut self) -> bool {
        let due = self.eof_requested && !self.eof_sent;
        if due {
            self.eof_sent = true;
        }
        due
    }

    /// The queue is above the high-water mark and the protocol not paused yet.
    pub fn over_high_water(&self) -> bool {
        !self.writing_paused && !self.closed && self.pending() as f64 > self.high
    }

    /// The pause half of flow control: true once when the queue rose above the
    /// high-water mark (the caller then calls `pause_writing()`); the protocol is
    /// counted as paused until [`ChanState::resume_writing_due`].
    pub fn pause_writing_due(&mut self) -> bool {
        let due = self.over_high_water();
        if due {
            self.writing_paused = true;
        }
        due
    }

    /// The resume half of flow control, after the loop sent: true once when a paused
    /// protocol's queue is down to the low-water mark (the loop then calls
    /// `resume_writing()`).
    pub fn resume_writing_due(&mut self) -> bool {
        let due = self.writing_paused && self.pending() as f64 <= self.low;
        if due {
            self.writing_paused = false;
        }
        due
    }

    /// The write buffer limits, `(low, high)`.
    pub fn limits(&self) -> (f64, f64) {
        (self.low, self.high)
    }

    pub fn set_limits(&mut self, low: f64, high: f64) {
        self.low = low;
        self.high = high;
    }
}

/// One transport's channel to its loop. The loop owns the descriptor; it closes it by
/// dropping its owner under this lock after [`ChanState::mark_closed`], and a transport
/// duplicates it under the same lock only while the channel is open, so no number the
/// kernel has reused is ever touched.
pub struct Channel {
    token: usize,
    state: Mutex<ChanState>,
    shared: Arc<LoopShared>,
}

impl Channel {
    pub fn new(token: usize, shared: Arc<LoopShared>) -> Channel {
        Channel {
            token,
            state: Mutex::new(ChanState {
                high: DEFAULT_HIGH_WATER as f64,
                low: (DEFAULT_HIGH_WATER / 4) as f64,
                ..ChanState::default()
            }),
            shared,
        }
    }

    /// The state, attached (never blocks while attached: the lock rule).
    pub fn lock(&self, py: Python<'_>) -> MutexGuard<'_, ChanState> {
        lock(py, &self.state)
    }

    /// The state, from detached code, or attached where every holder keeps the lock
    /// only for a short section without a GIL crossing (a destructor's mark).
    pub fn lock_detached(&self) -> MutexGuard<'_, ChanState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Put the channel on the loop's list of work (once), waking the loop if called
    /// from another thread.
    fn mark_dirty(&self, st: &mut ChanState) {
        if st.queued || st.closed {
            return;
        }
        st.queued = true;
        self.shared
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.token);
        if !self.shared.on_loop_thread() {
            let _ = self.shared.wake();
        }
    }

    /// Queue `data` on a stream (what `write()` does); nothing once closing. True if
    /// something was queued (the caller then checks the high-water mark).
    pub fn queue_bytes(&self, py: Python<'_>, data: &[u8]) -> PyResult<bool> {
        let mut st = self.lock(py);
        if st.eof_requested {
            return Err(PyRuntimeError::new_err(
                "Cannot call write() after write_eof()",
            ));
        }
        if st.is_closing() || data.is_empty() {
            return Ok(false);
        }
        if st.out_pos > 0 && st.out_pos == st.out.len() {
            st.out.clear();
            st.out_pos = 0;
        }
        st.out.extend_from_slice(data);
        self.mark_dirty(&mut st);
        Ok(true)
    }

    /// Queue a datagram for `to`; ignored once the endpoint has ended. True if it was
    /// queued.
    pub fn queue_datagram(&self, py: Python<'_>, data: &[u8], to: RawAddr) -> bool {
        let mut st = self.lock(py);
        if st.closed {
            return false;
        }
        st.datagram_bytes += data.len();
        st.datagrams.push_back(QueuedDatagram {
            data: data.to_vec(),
            to,
        });
        self.mark_dirty(&mut st);
        true
    }

    /// `close()`: end once the queue is sent; reading stops at once.
    pub fn close(&self, py: Python<'_>) {
        let mut st = self.lock(py);
        if st.closing || st.closed {
            return;
        }
        st.closing = true;
        st.read_paused = true;
        self.mark_dirty(&mut st);
    }

    /// `abort()`: end now, dropping the queue.
    pub fn abort(&self, py: Python<'_>) {
        let mut st = self.lock(py);
        if st.closed {
            return;
        }
        st.aborting = true;
        self.mark_dirty(&mut st);
    }

    /// `write_eof()`: shut the write side down once the queue is sent.
    pub fn write_eof(&self, py: Python<'_>) {
        let mut st = self.lock(py);
        if st.closing || st.closed || st.eof_requested {
            return;
        }
        st.eof_requested = true;
        self.mark_dirty(&mut st);
    }

    /// `pause_reading()`: honoured at once (the loop reads no more).
    pub fn pause_reading(&self, py: Python<'_>) {
        let mut st = self.lock(py);
        if !st.closing && !st.closed {
            st.read_paused = true;
        }
    }

    /// `resume_reading()`: the loop reads again in its next round.
    pub fn resume_reading(&self, py: Python<'_>) {
        let mut st = self.lock(py);
        if st.read_paused && !st.closing && !st.closed {
            st.read_paused = false;
            st.read_resumed = true;
            self.mark_dirty(&mut st);
        }
    }

    /// `is_reading()`.
    pub fn is_reading(&self, py: Python<'_>) -> bool {
        let st = self.lock(py);
        !st.read_paused && !st.closing && !st.closed
    }
}
