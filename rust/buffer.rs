//! Python bytes-like arguments, held as the C API's `Py_buffer` (what `y*`/`w*` give the
//! `socket` module), so any buffer exporter is accepted and its memory stays pinned
//! while a detached system call reads or writes it.

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::mem::MaybeUninit;

pub struct RawBuffer {
    view: Box<ffi::Py_buffer>,
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

impl RawBuffer {
    /// Export `obj`'s buffer, contiguous, writable if asked. Read-only, the errors are
    /// the exporter's own (a `TypeError` for an object with no buffer, a `BufferError`
    /// for a non-contiguous one), as CPython's `y*` arguments report them; writable,
    /// see [`RawBuffer::writable`].
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<RawBuffer> {
        match writable {
            true => Self::writable(obj, "argument"),
            false => Self::export(obj, ffi::PyBUF_SIMPLE),
        }
    }

    /// A writable contiguous buffer for the argument `what` names (say
    /// `"readinto() argument"` or `"recv_into() argument 1"`); anything else (a
    /// `bytes`, a read-only or non-contiguous view) is the `TypeError` CPython's `w*`
    /// arguments give, never a `BufferError`.
    pub fn writable(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<RawBuffer> {
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

    fn export(obj: &Bound<'_, PyAny>, flags: std::ffi::c_int) -> PyResult<RawBuffer> {
        let mut view: Box<MaybeUninit<ffi::Py_buffer>> = Box::new(MaybeUninit::zeroed());
        // SAFETY: obj is a live object; view is writable storage for a Py_buffer.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), flags) };
        if rc == -1 {
            return Err(PyErr::fetch(obj.py()));
        }
        // SAFETY: PyObject_GetBuffer succeeded and filled the view.
        let view = unsafe { Box::from_raw(Box::into_raw(view).cast::<ffi::Py_buffer>()) };
        Ok(RawBuffer { view })
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

// SAFETY: a Py_buffer is plain data; it is released with the GIL (see Drop).
unsafe impl Send for RawBuffer {}
unsafe impl Sync for RawBuffer {}

impl Drop for RawBuffer {
    fn drop(&mut self) {
        Python::attach(|_| {
            // SAFETY: the view was filled by PyObject_GetBuffer and is released once.
            unsafe { ffi::PyBuffer_Release(&mut *self.view) }
        });
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}
