//! Running a taken request through the library's own dispatch hooks, in the engine.
//!
//! When none of a server's dispatch hooks (`verify_request`, `process_request`,
//! `finish_request`, `shutdown_request`, `close_request`, and for `ThreadingMixIn`
//! `process_request_thread`) is overridden, the engine runs what their library versions
//! do without calling them (ARCHITECTURE.md, Fast path, compatible path): instantiate `server.RequestHandlerClass(request,
//! client_address, server)`, send a handler exception to `handle_error` (through the
//! server's `report(request, address, exc)`, which raises it inside an `except` block),
//! and shut the connection down and close it. Nothing a handler can observe differs;
//! only the Python calls are saved.
//!
//! A [`Taken`] request is plain Rust data (an owned descriptor or a datagram's bytes,
//! and the peer's address), so the server's thread can take it and hand it to a worker
//! without attaching to the interpreter: the worker builds the Python objects.

use crate::blocking::connection::Connection;
use crate::bridge::address;
use crate::bridge::proxy::ProxyPolicy;
use crate::bridge::wait::detached;
use crate::error::{catch_panic, is_handled};
use crate::sys::syscall::RawAddr;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};

/// A request taken from the listening socket, not yet seen by Python. Dropping it
/// unhandled closes an accepted connection.
pub enum Taken {
    Stream(OwnedFd, RawAddr),
    Datagram(Vec<u8>, RawAddr),
}

/// What a request is dispatched with: the server and how it reports errors.
pub struct Dispatch {
    server: Py<PyAny>,
    report: Py<PyAny>,
    /// The server's socket: the second item of a datagram request `(data, socket)`.
    sock: Py<PyAny>,
    family: i32,
    proto: i32,
    /// The server's PROXY protocol settings: a stream request's header is read (and the
    /// connection closed if it is refused) before the handler runs, on whichever
    /// thread runs the request.
    proxy: Option<Py<ProxyPolicy>>,
}

/// The Python side of one request: `request`, `client_address`, and the connection
/// to shut down and close afterwards (none for a datagram).
pub struct Request<'py> {
    pub request: Bound<'py, PyAny>,
    pub address: Bound<'py, PyAny>,
    pub conn: Option<Bound<'py, Connection>>,
}

impl Taken {
    /// The request as `get_request()` returns it: a `Connection` of the listening
    /// socket's `family`/`proto`, or `(data, sock)` for a datagram.
    pub fn into_python<'py>(
        self,
        py: Python<'py>,
        family: i32,
        proto: i32,
        sock: &Bound<'py, PyAny>,
    ) -> PyResult<Request<'py>> {
        Ok(match self {
            Taken::Stream(fd, addr) => {
                let conn = Connection::new(fd.into_raw_fd(), family, libc::SOCK_STREAM, proto);
                let conn = Bound::new(py, conn)?;
                Request {
                    request: conn.clone().into_any(),
                    address: address::to_python(py, &addr)?,
                    conn: Some(conn),
                }
            }
            Taken::Datagram(data, addr) => Request {
                request: (PyBytes::new(py, &data), sock)
                    .into_pyobject(py)?
                    .into_any(),
                address: address::to_python(py, &addr)?,
                conn: None,
            },
        })
    }
}

impl Dispatch {
    pub fn new(
        server: &Bound<'_, PyAny>,
        report: &Bound<'_, PyAny>,
        sock: Option<&Bound<'_, PyAny>>,
        family: i32,
        proto: i32,
        proxy: Option<&Bound<'_, ProxyPolicy>>,
    ) -> Dispatch {
        let py = server.py();
        Dispatch {
            server: server.clone().unbind(),
            report: report.clone().unbind(),
            sock: sock.map_or_else(|| py.None(), |s| s.clone().unbind()),
            family,
            proto,
            proxy: proxy.map(|p| p.clone().unbind()),
        }
    }

    /// The request with its PROXY protocol header read (its client address the
    /// original client's), or None when the header was refused and the connection
    /// closed. Without a policy, or for a datagram, the request as it is.
    fn admit(&self, py: Python<'_>, taken: Taken) -> PyResult<Option<Taken>> {
        let (Some(proxy), Taken::Stream(fd, peer)) = (&self.proxy, &taken) else {
            return Ok(Some(taken));
        };
        match proxy.get().admit(py, fd.as_raw_fd(), peer) {
            Ok(Some(client)) => match taken {
                Taken::Stream(fd, _) => Ok(Some(Taken::Stream(fd, client))),
                Taken::Datagram(..) => unreachable!("a stream request"),
            },
            // Refused, or a signal handler raised: the connection is closed detached
            // (closing a TCP socket runs the peer's receive path on loopback).
            outcome => {
                detached(py, move || drop(taken));
                outcome.map(|_| None)
            }
        }
    }

    fn to_python<'py>(&self, py: Python<'py>, taken: Taken) -> PyResult<Request<'py>> {
        taken.into_python(py, self.family, self.proto, self.sock.bind(py))
    }

    /// `RequestHandlerClass(request, address, server)`; a handled exception goes to
    /// `handle_error`.
    fn handle(&self, py: Python<'_>, req: &Request<'_>) -> Result<(), Failure> {
        let server = self.server.bind(py);
        let finish_request = || {
            server.getattr(intern!(py, "RequestHandlerClass"))?.call1((
                &req.request,
                &req.address,
                server,
            ))
        };
        match catch_panic(finish_request) {
            Ok(_) => Ok(()),
            Err(err) if is_handled(py, &err) => self
                .report
                .call1(py, (&req.request, &req.address, err.value(py)))
                .map(drop)
                .map_err(Failure::Reporting),
            Err(err) => Err(Failure::Escaped(err)),
        }
    }

    /// `BaseServer._handle_accepted` + `process_request` on the server's own thread:
    /// the request is shut down after the handler, also when `SystemExit` or
    /// `KeyboardInterrupt` escapes it (then re-raised), but not when `handle_error`
    /// itself raised (the stdlib leaves it to be collected).
    pub fn run_inline(&self, py: Python<'_>, taken: Taken) -> PyResult<()> {
        let Some(taken) = self.admit(py, taken)? else {
            return Ok(());
        };
        let req = self.to_python(py, taken)?;
        let outcome = match self.handle(py, &req) {
            Ok(()) => Ok(()),
            Err(Failure::Escaped(err)) => Err(err),
            Err(Failure::Reporting(err)) => return Err(err),
        };
        if let Some(conn) = &req.conn {
            conn.get().shutdown_and_close(py);
        }
        outcome
    }

    /// `ThreadingMixIn.process_request_thread` on a worker: the connection is shut down
    /// and closed whatever happened (its `finally`), and what escapes is returned for
    /// `threading.excepthook`.
    pub fn run_threaded(&self, py: Python<'_>, taken: Taken) -> PyResult<()> {
        let Some(taken) = self.admit(py, taken)? else {
            return Ok(());
        };
        let req = self.to_python(py, taken)?;
        let outcome = self.handle(py, &req);
        if let Some(conn) = &req.conn {
            conn.get().shutdown_and_close(py);
        }
        outcome.map_err(|(Failure::Escaped(err) | Failure::Reporting(err))| err)
    }
}

/// How a request's handling failed.
enum Failure {
    /// Not an exception `handle_error` takes (`SystemExit`, `KeyboardInterrupt`).
    Escaped(PyErr),
    /// `handle_error` raised.
    Reporting(PyErr),
}
