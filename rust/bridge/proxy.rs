//! `ProxyPolicy`: a server's PROXY protocol settings, as the engine applies them.
//!
//! The Python side builds one from the server's `proxy_protocol`, `proxy_trusted` and
//! `proxy_header_timeout` and hands it to whatever takes connections. [`ProxyPolicy::admit`]
//! reads one accepted connection's header (see [`crate::sys::proxy`]) inside one GIL
//! release, re-attaching only for a signal: the address the handler should see, or
//! None when the connection is to be closed (a stranger, no header in time, a
//! malformed one). A refusal is told to the server's `report(client_address, reason)`
//! (a log line), never to `handle_error`: a bad header is the peer's problem, not a
//! failure of the handler.

use crate::bridge::address;
use crate::bridge::wait::blocking;
use crate::error::{strerror, Error};
use crate::sys::proxy::{Network, Parser, Policy, Verdict, Version};
use crate::sys::syscall::{self, RawAddr};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

#[pyclass(module = "fastsocketserver._core", frozen)]
pub struct ProxyPolicy {
    policy: Policy,
    report: Option<Py<PyAny>>,
}

impl ProxyPolicy {
    /// Read the header of the connection on `fd` (accepted from `peer`): the client
    /// address to use, or None when the connection must be closed. An exception is one
    /// a signal handler raised.
    pub fn admit(&self, py: Python<'_>, fd: RawFd, peer: &RawAddr) -> PyResult<Option<RawAddr>> {
        let deadline = self.policy.timeout.map(|t| Instant::now() + t);
        let mut parser = Parser::new(self.policy.version);
        let verdict = blocking(py, || {
            match self.policy.read(fd, peer, &mut parser, deadline) {
                Err(Error::Os(code)) => Ok(Verdict::Refused(strerror(code))),
                other => other,
            }
        })?;
        match verdict {
            Verdict::Admitted(client) => Ok(Some(client.unwrap_or(*peer))),
            Verdict::Refused(reason) => {
                self.refused(py, peer, &reason);
                Ok(None)
            }
        }
    }

    /// The settings, for a caller that reads headers itself (the event loop).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Tell the server that the connection from `peer` was refused, and why (an
    /// exception from its report goes to `sys.unraisablehook`).
    pub fn refused(&self, py: Python<'_>, peer: &RawAddr, reason: &str) {
        if let Some(report) = &self.report {
            let report = report.bind(py);
            let told = address::to_python(py, peer).and_then(|addr| report.call1((addr, reason)));
            if let Err(err) = told {
                err.write_unraisable(py, Some(report));
            }
        }
    }
}

#[pymethods]
impl ProxyPolicy {
    /// `version` is "v1" or "v2"; `trusted` the networks headers may come from, as
    /// `(packed address, prefix length)` pairs (4 or 16 bytes); `timeout` the seconds a
    /// header may take (None: no limit); `report(client_address, reason)` is called for
    /// every connection refused.
    #[new]
    #[pyo3(signature = (version, trusted, timeout, report = None))]
    fn new(
        py: Python<'_>,
        version: &str,
        trusted: Vec<(Vec<u8>, u32)>,
        timeout: Option<f64>,
        report: Option<Py<PyAny>>,
    ) -> PyResult<ProxyPolicy> {
        let version = match version {
            "v1" => Version::V1,
            "v2" => Version::V2,
            other => {
                return Err(PyValueError::new_err(format!(
                    "proxy_protocol must be None, 'v1' or 'v2', not {other:?}"
                )))
            }
        };
        let trusted = trusted
            .iter()
            .map(|(addr, prefix)| {
                Network::new(addr, *prefix).ok_or_else(|| {
                    PyValueError::new_err(format!("not a network: {addr:?}/{prefix}"))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let timeout = match timeout {
            None => None,
            Some(t) if t.is_nan() || t <= 0.0 => {
                return Err(PyValueError::new_err(
                    "proxy_header_timeout must be a positive number of seconds or None",
                ))
            }
            Some(t) => Some(Duration::from_nanos(
                syscall::secs_to_nanos(t).map_err(PyErr::from)? as u64,
            )),
        };
        if report.as_ref().is_some_and(|r| !r.bind(py).is_callable()) {
            return Err(PyTypeError::new_err("report must be callable"));
        }
        Ok(ProxyPolicy {
            policy: Policy {
                version,
                trusted,
                timeout,
            },
            report,
        })
    }

    /// "v1" or "v2".
    #[getter]
    fn version(&self) -> &'static str {
        match self.policy.version {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}
