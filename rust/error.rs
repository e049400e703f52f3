//! The engine's one error type and its one conversion to a Python exception.
//!
//! Everything below the Python boundary returns [`Error`]; the `From<Error> for PyErr`
//! impl is the only place where an OS error number becomes a Python exception. It builds
//! `OSError(errno, strerror)` so that CPython picks the subclass (`ConnectionResetError`,
//! `BrokenPipeError`, ...) exactly as the `socket` module does; PyO3's own `io::Error`
//! conversion would lose `errno`.

use pyo3::exceptions::{PyOSError, PyTimeoutError};
use pyo3::prelude::*;
use std::ffi::CStr;

pyo3::import_exception!(io, UnsupportedOperation);

/// `io.UnsupportedOperation(what)`: what a file object raises for an operation its
/// mode does not allow.
pub fn unsupported(what: &str) -> PyErr {
    UnsupportedOperation::new_err(what.to_owned())
}

#[derive(Debug)]
pub enum Error {
    /// A failed system call, with its `errno`.
    Os(i32),
    /// A socket timeout expired (`socket.timeout`, i.e. `TimeoutError('timed out')`).
    Timeout,
    /// A wait was interrupted by a signal (EINTR): the caller runs the Python signal
    /// handlers and retries. Never reaches Python.
    Interrupted,
    /// A buffer could not grow (`MemoryError`; Rust would otherwise abort).
    NoMemory,
    /// An exception already built by Python code.
    Py(PyErr),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The error of the last failed libc call; EINTR becomes [`Error::Interrupted`].
    pub fn last_os() -> Error {
        Error::from_errno(errno())
    }

    pub fn from_errno(code: i32) -> Error {
        if code == libc::EINTR {
            Error::Interrupted
        } else {
            Error::Os(code)
        }
    }
}

/// The calling thread's `errno`.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The C library's message for an error number, as `os.strerror` gives it.
pub fn strerror(code: i32) -> String {
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: the buffer is valid for its length; the XSI strerror_r NUL-terminates it.
    let rc = unsafe { libc::strerror_r(code, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return format!("Unknown error {code}");
    }
    // SAFETY: strerror_r succeeded, so the buffer holds a NUL-terminated string.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Os(code) => os_error(code),
            Error::Interrupted => os_error(libc::EINTR),
            Error::Timeout => PyTimeoutError::new_err("timed out"),
            Error::NoMemory => pyo3::exceptions::PyMemoryError::new_err(()),
            Error::Py(err) => err,
        }
    }
}

/// `OSError(errno, strerror)` built now, so that CPython's `OSError.__new__` picks the
/// subclass for `errno` (a lazily raised `OSError` would keep the base type). Errors are
/// converted where a `PyResult` is returned, always attached: this attach crosses nothing.
fn os_error(code: i32) -> PyErr {
    Python::attach(
        |py| match py.get_type::<PyOSError>().call1((code, strerror(code))) {
            Ok(exc) => PyErr::from_value(exc),
            Err(err) => err,
        },
    )
}

/// True for what the dispatch boundary sends to `handle_error`: an `Exception`, or a
/// Rust panic (PyO3's PanicException is a BaseException, which the stdlib's
/// `except Exception` would let through and stop the server).
pub fn is_handled(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<pyo3::exceptions::PyException>(py)
        || err.is_instance_of::<pyo3::panic::PanicException>(py)
}

/// Run a call into Python code. PyO3 turns a `PanicException` raised there (a Rust
/// panic that already crossed into Python once) into a resumed Rust panic when the
/// error comes back; this catches it and makes it the Python exception again, so the
/// dispatch boundary can send it to `handle_error` like any other failure of one
/// request.
pub fn catch_panic<T>(call: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic from Rust code".to_owned());
            Err(pyo3::panic::PanicException::new_err((message,)))
        }
    }
}

impl From<PyErr> for Error {
    fn from(err: PyErr) -> Error {
        Error::Py(err)
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Error {
        match err.raw_os_error() {
            Some(code) => Error::from_errno(code),
            None => Error::Os(libc::EIO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_matches_libc_text() {
        assert_eq!(strerror(libc::ECONNRESET), "Connection reset by peer");
        assert_eq!(strerror(libc::EPIPE), "Broken pipe");
    }

    #[test]
    fn eintr_is_interrupted() {
        assert!(matches!(Error::from_errno(libc::EINTR), Error::Interrupted));
        assert!(matches!(
            Error::from_errno(libc::EAGAIN),
            Error::Os(libc::EAGAIN)
        ));
    }

    #[test]
    fn os_error_becomes_the_errno_subclass() {
        pyo3::Python::attach(|py| {
            let err: PyErr = Error::Os(libc::ECONNRESET).into();
            assert!(err.is_instance_of::<pyo3::exceptions::PyConnectionResetError>(py));
            let errno: i32 = err.value(py).getattr("errno").unwrap().extract().unwrap();
            assert_eq!(errno, libc::ECONNRESET);
            let err: PyErr = Error::Timeout.into();
            assert!(err.is_instance_of::<pyo3::exceptions::PyTimeoutError>(py));
        });
    }
}

/// The Python exception a bad timeout raises, as `socket.settimeout` raises it.
impl From<crate::sys::syscall::BadTimeout> for PyErr {
    fn from(bad: crate::sys::syscall::BadTimeout) -> PyErr {
        use crate::sys::syscall::BadTimeout;
        match bad {
            BadTimeout::NaN => {
                pyo3::exceptions::PyValueError::new_err("Invalid value NaN (not a number)")
            }
            BadTimeout::TooLarge => {
                pyo3::exceptions::PyOverflowError::new_err("timeout value is too large")
            }
        }
    }
}

pyo3::import_exception!(ssl, SSLError);

/// The Python exception a bad TLS configuration raises: what
/// `ssl.SSLContext.load_cert_chain` (and `load_verify_locations`,
/// `set_alpn_protocols`) raise for the same mistake.
impl From<crate::tls::config::ConfigError> for PyErr {
    fn from(err: crate::tls::config::ConfigError) -> PyErr {
        use crate::tls::config::ConfigError;
        match err {
            ConfigError::Missing { .. } => os_error(libc::ENOENT),
            ConfigError::Unreadable { errno, .. } => os_error(errno),
            ConfigError::BadArgument(what) => pyo3::exceptions::PyValueError::new_err(what),
            other => SSLError::new_err(other.to_string()),
        }
    }
}
