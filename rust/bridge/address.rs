//! Socket addresses between the kernel's `sockaddr` and Python's address objects,
//! in the shapes the `socket` module uses: `(host, port)` for AF_INET,
//! `(host, port, flowinfo, scope_id)` for AF_INET6, a `str` path for AF_UNIX (bytes for
//! Linux's abstract namespace, `''` for an unnamed peer).

use crate::error::Error;
use crate::sys::syscall::RawAddr;
use pyo3::exceptions::{PyOverflowError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};
use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;

/// The kernel's address as the Python object `socket.accept()` would return.
pub fn to_python<'py>(py: Python<'py>, addr: &RawAddr) -> PyResult<Bound<'py, PyAny>> {
    if addr.len == 0 {
        return Ok(py.None().into_bound(py));
    }
    match addr.storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(addr.as_ptr() as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            (ip.to_string(), u16::from_be(sin.sin_port))
                .into_pyobject(py)
                .map(|t| t.into_any())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(addr.as_ptr() as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            (
                ipv6_text(&ip),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )
                .into_pyobject(py)
                .map(|t| t.into_any())
        }
        libc::AF_UNIX => {
            // SAFETY: the family says the storage holds a sockaddr_un.
            let sun = unsafe { &*(addr.as_ptr() as *const libc::sockaddr_un) };
            let offset = std::mem::size_of::<libc::sa_family_t>();
            let plen = (addr.len as usize)
                .saturating_sub(offset)
                .min(sun.sun_path.len());
            let path: Vec<u8> = sun.sun_path[..plen].iter().map(|&c| c as u8).collect();
            if !path.is_empty() && path[0] == 0 {
                return Ok(PyBytes::new(py, &path).into_any());
            }
            let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
            Ok(OsStr::from_bytes(&path[..end])
                .into_pyobject(py)?
                .into_any())
        }
        family => Ok((family, PyBytes::new(py, &[]))
            .into_pyobject(py)?
            .into_any()),
    }
}

extern "C" {
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut libc::c_char,
        size: libc::socklen_t,
    ) -> *const libc::c_char;
}

/// IPv6 text as `inet_ntop` writes it (which is what the socket module returns).
fn ipv6_text(ip: &Ipv6Addr) -> String {
    let mut buf = [0 as libc::c_char; 64];
    let octets = ip.octets();
    // SAFETY: the buffer is larger than INET6_ADDRSTRLEN.
    let p = unsafe {
        inet_ntop(
            libc::AF_INET6,
            octets.as_ptr().cast(),
            buf.as_mut_ptr(),
            buf.len() as libc::socklen_t,
        )
    };
    if p.is_null() {
        return ip.to_string();
    }
    // SAFETY: inet_ntop succeeded and NUL-terminated the buffer.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// A Python address object as a `sockaddr` of `family` (for `sendto`). Host names that
/// are not numeric are resolved through Python's own `socket.getaddrinfo`.
pub fn from_python(obj: &Bound<'_, PyAny>, family: libc::c_int) -> PyResult<RawAddr> {
    let mut raw = RawAddr::empty();
    match family {
        libc::AF_INET | libc::AF_INET6 => {
            let tuple = obj.cast::<PyTuple>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "{}(): AF_INET address must be tuple, not {}",
                    "sendto",
                    obj.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?;
            let host: String = tuple.get_item(0)?.extract()?;
            let port: i64 = tuple.get_item(1)?.extract()?;
            if !(0..=65535).contains(&port) {
                return Err(PyOverflowError::new_err("sendto(): port must be 0-65535."));
            }
            let ip = resolve(obj.py(), &host, family)?;
            if family == libc::AF_INET {
                let ip: Ipv4Addr = ip.parse().map_err(|_| Error::Os(libc::EINVAL))?;
                // SAFETY: sockaddr_storage is large enough for sockaddr_in.
                let sin = unsafe { &mut *(raw.as_mut_ptr() as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = (port as u16).to_be();
                sin.sin_addr.s_addr = u32::from(ip).to_be();
                raw.len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            } else {
                let ip: Ipv6Addr = ip.parse().map_err(|_| Error::Os(libc::EINVAL))?;
                let flowinfo: u32 = match tuple.len() > 2 {
                    true => tuple.get_item(2)?.extract()?,
                    false => 0,
                };
                let scope: u32 = match tuple.len() > 3 {
                    true => tuple.get_item(3)?.extract()?,
                    false => 0,
                };
                // SAFETY: sockaddr_storage is large enough for sockaddr_in6.
                let sin6 = unsafe { &mut *(raw.as_mut_ptr() as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = (port as u16).to_be();
                sin6.sin6_flowinfo = flowinfo.to_be();
                sin6.sin6_addr.s6_addr = ip.octets();
                sin6.sin6_scope_id = scope;
                raw.len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        libc::AF_UNIX => {
            let path: Vec<u8> = if let Ok(s) = obj.cast::<PyString>() {
                s.to_str()?.as_bytes().to_vec()
            } else {
                obj.extract::<Vec<u8>>()?
            };
            // SAFETY: sockaddr_storage is large enough for sockaddr_un.
            let sun = unsafe { &mut *(raw.as_mut_ptr() as *mut libc::sockaddr_un) };
            if path.len() >= sun.sun_path.len() {
                return Err(pyo3::exceptions::PyOSError::new_err(
                    "AF_UNIX path too long",
                ));
            }
            sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (dst, &src) in sun.sun_path.iter_mut().zip(path.iter()) {
                *dst = src as libc::c_char;
            }
            raw.len = (std::mem::size_of::<libc::sa_family_t>() + path.len()) as libc::socklen_t;
        }
        _ => return Err(Error::Os(libc::EAFNOSUPPORT).into()),
    }
    Ok(raw)
}

/// A numeric host as text; names go through `socket.getaddrinfo` like the stdlib does.
fn resolve(py: Python<'_>, host: &str, family: libc::c_int) -> PyResult<String> {
    let numeric = match family {
        libc::AF_INET => host.parse::<Ipv4Addr>().is_ok(),
        _ => host.parse::<Ipv6Addr>().is_ok(),
    };
    if numeric {
        return Ok(host.to_owned());
    }
    if host.is_empty() {
        return Ok(if family == libc::AF_INET {
            "0.0.0.0"
        } else {
            "::"
        }
        .to_owned());
    }
    let infos = py
        .import("socket")?
        .call_method1("getaddrinfo", (host, 0, family))?;
    let first = infos.get_item(0)?;
    first.get_item(4)?.get_item(0)?.extract()
}
