//! Python bytes-like arguments, held as the C API's `Py_buffer` (what `y*`/`w*` give the
//! `socket` module), so any buffer exporter is accepted and its memory stays pinned
//! while a detached system call reads or writes it.
//!
//! A [`RawBuffer`] lives inside the attachment it was made in (its `'py`) and is neither
//! `Send` nor `Sync`: it cannot be moved into, or borrowed by, a detached closure or
//! another thread. Only its address ([`SendPtr`]) or a slice of its bytes goes into a
//! detached system call. So it is always dropped by the thread that made it, attached,
//! and its destructor releases the export directly, with no `Python::attach`.

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

pub struct RawBuffer<'py> {
    view: Box<ffi::Py_buffer>,
    /// Ties the buffer to the attachment it was exported in (and makes it `!Send`).
    _attached: PhantomData<Python<'py>>,
}

/// A buffer's address, movable into a detached closure: the exporter is pinned by the
/// `RawBuffer` that outlives the closure.
#[derive(Clone, Copy)]
pub struct SendPtr(*mut u8);
// SAFETY: the pointer is only dereferenced while its `RawBuffer` keeps the memory alive.
unsafe impl Send for SendPtr {}

impl SendPtr {
    pub fn get(self) -> *mut u8 {
        self.0
    }
}

impl<'py> RawBuffer<'py> {
    /// Export `obj`'s buffer, contiguous, writable if asked. Read-only, the errors are
    /// the exporter's own (a `TypeError` for an object with no buffer, a `BufferError`
    /// for a non-contiguous one), as CPython's `y*` arguments report them; writable,
    /// see [`RawBuffer::writable`].
    pub fn get(obj: &Bound<'py, PyAny>, writable: bool) -> PyResult<RawBuffer<'py>> {
        match writable {
            true => Self::writable(obj, "argument"),
            false => Self::export(obj, ffi::PyBUF_SIMPLE),
        }
    }

    /// A writable contiguous buffer for the argument `what` names (say
    /// `"readinto() argument"` or `"recv_into() argument 1"`); anything else (a
    /// `bytes`, a read-only or non-contiguous view) is the `TypeError` CPython's `w*`
    /// arguments give, never a `BufferError`.
    pub fn writable(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<RawBuffer<'py>> {
        Self::export(obj, ffi::PyBUF_WRITABLE).map_err(|_| {
            let shown = match obj.is_none() {
                true => "None".to_owned(),
                false => type_name(obj),
            };
            PyTypeError::new_err(format!(
                "{what} must be read-write bytes-like object, not {shown}"
            ))
        })
    }

    fn export(obj: &Bound<'py, PyAny>, flags: std::ffi::c_int) -> PyResult<RawBuffer<'py>> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: obj is a live object; view is writable storage for a Py_buffer.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), flags) };
        if rc == -1 {
            return Err(PyErr::fetch(obj.py()));
        }
        // SAFETY: PyObject_GetBuffer succeeded and filled the view.
        let view = unsafe { Box::from_raw(Box::into_raw(view).cast::<ffi::Py_buffer>()) };
        Ok(RawBuffer {
            view,
            _attached: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.view.len as usize
    }

    pub fn ptr(&self) -> SendPtr {
        SendPtr(self.view.buf.cast())
    }

    pub fn as_slice(&self) -> &[u8] {
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: the exporter guarantees `len` readable bytes at `buf` while exported.
        unsafe { std::slice::from_raw_parts(self.view.buf.cast(), self.len()) }
    }
}

impl Drop for RawBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: the view was filled by PyObject_GetBuffer and is released once, with
        // the GIL held: the buffer never leaves the attachment `'py` of the thread that
        // exported it (see the module doc).
        unsafe { ffi::PyBuffer_Release(&mut *self.view) }
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}
