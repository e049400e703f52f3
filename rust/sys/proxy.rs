//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`), versions 1 and 2: the header
//! a load balancer sends first on a connection to say whom it is relaying for.
//!
//! - [`Parser`]: pure and incremental. Bytes are fed as they arrive; each feed says
//!   whether more are needed, that the header is complete (with how many of the fed
//!   bytes it took: the rest belong to the application), or that it is invalid. Strict:
//!   the version is configured, never guessed, and a connection that does not start
//!   with that version's signature is invalid at its first wrong byte.
//! - [`Policy`]: which peers may send a header (everyone else is refused before a
//!   byte is read), the version, the header timeout.
//! - [`Policy::read`]: reads one header from an accepted socket, taking from the kernel
//!   only the header's own bytes. Version 2 announces its length, so it is read
//!   exactly; a version 1 line is peeked (`MSG_PEEK`) and only the bytes up to its
//!   `\r\n` are then taken. Whatever the client sent after the header stays queued in
//!   the socket for the application's first read: nothing is buffered here, so
//!   nothing can be lost or served twice.
//!
//! No `Python` in any signature: the callers run [`Policy::read`] detached.

use crate::error::{Error, Result};
use crate::sys::syscall::{self, Mode, RawAddr};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The most a version 1 header may take, its `\r\n` included (the specification's bound).
pub const V1_MAX: usize = 107;
/// The fixed part of a version 2 header: signature, version and command, family and
/// protocol, length.
pub const V2_FIXED: usize = 16;
/// The most address and TLV bytes a version 2 header may announce here. The addresses
/// take at most 216 (two Unix paths); the rest is room for TLVs (TLS details, cloud
/// load balancers' endpoint ids). A longer header is refused rather than read.
pub const V2_MAX_BODY: usize = 4096;
/// The twelve bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The length of a Unix socket path in a version 2 address block.
const UNIX_PATH: usize = 108;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// An endpoint a header names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Inet(SocketAddrV4),
    Inet6(SocketAddrV6),
    /// A Unix socket path as sent (up to 108 bytes, the NUL padding removed; a leading
    /// NUL is Linux's abstract namespace).
    Unix(Vec<u8>),
}

/// A complete header. `source` is None when the connection's own addresses stand: a v2
/// `LOCAL` command (the proxy's own health check), a v2 `UNSPEC` family, a v1 `UNKNOWN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub source: Option<Endpoint>,
    pub destination: Option<Endpoint>,
}

impl Header {
    fn local() -> Header {
        Header {
            source: None,
            destination: None,
        }
    }
}

/// What one [`Parser::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Every byte fed belongs to the header, which is not complete yet.
    NeedMore,
    /// The header is complete; it took this many of the bytes just fed.
    Done(Header, usize),
    /// Not a valid header of the configured version.
    Invalid(&'static str),
}

/// An incremental parser for one header of one configured version.
pub struct Parser {
    version: Version,
    /// The header's bytes so far.
    seen: Vec<u8>,
    /// A step already reported as final (Done or Invalid): feeding more is a bug of the
    /// caller, answered with Invalid.
    finished: bool,
}

impl Parser {
    pub fn new(version: Version) -> Parser {
        Parser {
            version,
            seen: Vec::with_capacity(V1_MAX),
            finished: false,
        }
    }

    /// The most bytes the next feed can use: past them, bytes cannot be the header's.
    pub fn room(&self) -> usize {
        match self.version {
            Version::V1 => V1_MAX - self.seen.len(),
            Version::V2 => self.v2_total().unwrap_or(V2_FIXED) - self.seen.len(),
        }
    }

    /// True when every one of the next [`room`](Parser::room) bytes is the header's for
    /// sure (version 2 knows its length; a version 1 line ends wherever its `\r\n` is).
    pub fn exact(&self) -> bool {
        self.version == Version::V2
    }

    /// The whole length of a version 2 header, once its fixed part is in.
    fn v2_total(&self) -> Option<usize> {
        (self.seen.len() >= V2_FIXED)
            .then(|| V2_FIXED + u16::from_be_bytes([self.seen[14], self.seen[15]]) as usize)
    }

    /// Feed the bytes that arrived next.
    pub fn feed(&mut self, data: &[u8]) -> Step {
        if self.finished {
            return Step::Invalid("the header was already complete");
        }
        let step = match self.version {
            Version::V1 => self.feed_v1(data),
            Version::V2 => self.feed_v2(data),
        };
        if !matches!(step, Step::NeedMore) {
            self.finished = true;
        }
        step
    }

    fn feed_v1(&mut self, data: &[u8]) -> Step {
        for (i, &b) in data.iter().enumerate() {
            let at = self.seen.len();
            if at < V1_PREFIX.len() && b != V1_PREFIX[at] {
                return Step::Invalid("not a PROXY protocol v1 header");
            }
            if b == b'\n' {
                if self.seen.last() != Some(&b'\r') {
                    return Step::Invalid("a v1 header line must end with \\r\\n");
                }
                let line = &self.seen[V1_PREFIX.len()..at - 1];
                return match parse_v1(line) {
                    Ok(header) => Step::Done(header, i + 1),
                    Err(reason) => Step::Invalid(reason),
                };
            }
            if at + 1 >= V1_MAX {
                return Step::Invalid("a v1 header is longer than 107 bytes");
            }
            self.seen.push(b);
        }
        Step::NeedMore
    }

    fn feed_v2(&mut self, data: &[u8]) -> Step {
        let mut used = 0;
        while used < data.len() {
            let room = self.room();
            let take = room.min(data.len() - used);
            let before = self.seen.len();
            self.seen.extend_from_slice(&data[used..used + take]);
            used += take;
            // Check what the fixed part already shows, so that a client that sends
            // something else is refused at once instead of after the timeout.
            let fixed_end = self.seen.len().min(V2_FIXED);
            let fresh = self.seen.iter().enumerate().take(fixed_end).skip(before);
            for (at, &b) in fresh {
                match at {
                    0..=11 if b != V2_SIGNATURE[at] => {
                        return Step::Invalid("not a PROXY protocol v2 header")
                    }
                    12 if b >> 4 != 2 => return Step::Invalid("not version 2 of the protocol"),
                    12 if b & 0x0f > 1 => {
                        return Step::Invalid("a v2 command other than LOCAL or PROXY")
                    }
                    // LOCAL ignores the family; PROXY must name a known one.
                    13 if self.seen[12] & 0x0f == 1
                        && !matches!(b, 0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32) =>
                    {
                        return Step::Invalid("an unknown v2 address family or protocol")
                    }
                    15 => {
                        let body = u16::from_be_bytes([self.seen[14], b]) as usize;
                        if body > V2_MAX_BODY {
                            return Step::Invalid("a v2 header longer than this server accepts");
                        }
                    }
                    _ => {}
                }
            }
            if let Some(total) = self.v2_total() {
                if self.seen.len() == total {
                    return match parse_v2(&self.seen) {
                        Ok(header) => Step::Done(header, used),
                        Err(reason) => Step::Invalid(reason),
                    };
                }
            }
        }
        Step::NeedMore
    }
}

/// A decimal port: 1 to 5 digits, no leading zero (but "0" itself), at most 65535.
fn parse_port(field: &[u8]) -> Option<u16> {
    let ok = !field.is_empty()
        && field.len() <= 5
        && field.iter().all(u8::is_ascii_digit)
        && (field[0] != b'0' || field.len() == 1);
    if !ok {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// The line after "PROXY " and before "\r\n".
fn parse_v1(line: &[u8]) -> std::result::Result<Header, &'static str> {
    if line.starts_with(b"UNKNOWN") && matches!(line.get(7), None | Some(b' ')) {
        // The sender could not name the client (or did not want to): whatever follows
        // is to be ignored, and the connection's own addresses stand.
        return Ok(Header::local());
    }
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [family, src, dst, sport, dport] = fields[..] else {
        return Err("a v1 header must have five fields separated by single spaces");
    };
    let (Some(sport), Some(dport)) = (parse_port(sport), parse_port(dport)) else {
        return Err("a v1 port must be a decimal number from 0 to 65535");
    };
    let text = |f: &[u8]| std::str::from_utf8(f).ok().map(str::to_owned);
    let (Some(src), Some(dst)) = (text(src), text(dst)) else {
        return Err("a v1 address is not text");
    };
    match family {
        b"TCP4" => {
            let (Ok(s), Ok(d)) = (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) else {
                return Err("a TCP4 address that is not a dotted IPv4 address");
            };
            Ok(Header {
                source: Some(Endpoint::Inet(SocketAddrV4::new(s, sport))),
                destination: Some(Endpoint::Inet(SocketAddrV4::new(d, dport))),
            })
        }
        b"TCP6" => {
            let (Ok(s), Ok(d)) = (src.parse::<Ipv6Addr>(), dst.parse::<Ipv6Addr>()) else {
                return Err("a TCP6 address that is not an IPv6 address");
            };
            Ok(Header {
                source: Some(Endpoint::Inet6(SocketAddrV6::new(s, sport, 0, 0))),
                destination: Some(Endpoint::Inet6(SocketAddrV6::new(d, dport, 0, 0))),
            })
        }
        _ => Err("a v1 protocol other than TCP4, TCP6 or UNKNOWN"),
    }
}

/// A Unix path field: NUL padding removed (a leading NUL starts an abstract name,
/// whose trailing NULs are padding too).
fn unix_path(field: &[u8]) -> Vec<u8> {
    if field.first() == Some(&0) {
        let end = field.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        field[..end].to_vec()
    } else {
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        field[..end].to_vec()
    }
}

/// Every TLV must fit the header exactly: type, two length bytes, value.
fn check_tlvs(mut rest: &[u8]) -> std::result::Result<(), &'static str> {
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err("a v2 TLV cut short");
        }
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        if rest.len() < 3 + len {
            return Err("a v2 TLV longer than the header");
        }
        rest = &rest[3 + len..];
    }
    Ok(())
}

/// A complete version 2 header (its fixed part already checked).
fn parse_v2(header: &[u8]) -> std::result::Result<Header, &'static str> {
    let body = &header[V2_FIXED..];
    if header[12] & 0x0f == 0 {
        // LOCAL: the proxy speaking for itself; the block is to be discarded unread.
        return Ok(Header::local());
    }
    let (need, family) = match header[13] {
        0x00 => return Ok(Header::local()),
        0x11 => (12, 4),
        0x21 => (36, 6),
        0x31 => (2 * UNIX_PATH, 1),
        _ => return Err("v2 datagram addresses on a stream connection"),
    };
    if body.len() < need {
        return Err("a v2 address block shorter than its family needs");
    }
    check_tlvs(&body[need..])?;
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let (source, destination) = match family {
        4 => {
            let ip = |at: usize| Ipv4Addr::from(<[u8; 4]>::try_from(&body[at..at + 4]).unwrap());
            (
                Endpoint::Inet(SocketAddrV4::new(ip(0), port(8))),
                Endpoint::Inet(SocketAddrV4::new(ip(4), port(10))),
            )
        }
        6 => {
            let ip = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&body[at..at + 16]).unwrap());
            (
                Endpoint::Inet6(SocketAddrV6::new(ip(0), port(32), 0, 0)),
                Endpoint::Inet6(SocketAddrV6::new(ip(16), port(34), 0, 0)),
            )
        }
        _ => (
            Endpoint::Unix(unix_path(&body[..UNIX_PATH])),
            Endpoint::Unix(unix_path(&body[UNIX_PATH..2 * UNIX_PATH])),
        ),
    };
    Ok(Header {
        source: Some(source),
        destination: Some(destination),
    })
}

impl Endpoint {
    /// The address as the kernel would report it (what `address::to_python` converts).
    pub fn to_raw(&self) -> RawAddr {
        let mut raw = RawAddr::empty();
        match self {
            Endpoint::Inet(a) => {
                // SAFETY: sockaddr_storage has room for, and the alignment of, any sockaddr.
                let sin = unsafe { &mut *(raw.as_mut_ptr() as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                raw.len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            Endpoint::Inet6(a) => {
                // SAFETY: as above.
                let sin6 = unsafe { &mut *(raw.as_mut_ptr() as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                raw.len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
            Endpoint::Unix(path) => {
                // SAFETY: as above.
                let sun = unsafe { &mut *(raw.as_mut_ptr() as *mut libc::sockaddr_un) };
                sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
                let path = &path[..path.len().min(sun.sun_path.len())];
                for (dst, &src) in sun.sun_path.iter_mut().zip(path) {
                    *dst = src as libc::c_char;
                }
                let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
                // A path gets its NUL counted, as the kernel reports a bound name; an
                // abstract name is exactly its bytes.
                let nul = usize::from(!path.is_empty() && path[0] != 0 && path.len() < 108);
                raw.len = (base + path.len() + nul) as libc::socklen_t;
            }
        }
        raw
    }
}

/// An IP network a header may come from.
#[derive(Clone, Debug)]
pub struct Network {
    /// The address, IPv4 as an IPv4-mapped IPv6 address, so that one comparison covers
    /// both families (a dual-stack listener sees IPv4 peers mapped).
    addr: [u8; 16],
    /// Prefix length over the 128 bits.
    bits: u32,
}

impl Network {
    /// `addr` of 4 or 16 bytes with a prefix length for its family; None if malformed.
    pub fn new(addr: &[u8], prefix: u32) -> Option<Network> {
        match addr.len() {
            4 if prefix <= 32 => Some(Network {
                addr: Ipv4Addr::from(<[u8; 4]>::try_from(addr).ok()?)
                    .to_ipv6_mapped()
                    .octets(),
                bits: 96 + prefix,
            }),
            16 if prefix <= 128 => Some(Network {
                addr: addr.try_into().ok()?,
                bits: prefix,
            }),
            _ => None,
        }
    }

    fn contains(&self, ip: &[u8; 16]) -> bool {
        let a = u128::from_be_bytes(self.addr);
        let b = u128::from_be_bytes(*ip);
        let mask = if self.bits == 0 {
            0
        } else {
            u128::MAX << (128 - self.bits)
        };
        a & mask == b & mask
    }
}

/// Who may send headers, which version, and how long one may take.
#[derive(Clone, Debug)]
pub struct Policy {
    pub version: Version,
    pub trusted: Vec<Network>,
    pub timeout: Option<Duration>,
}

/// The outcome of reading a header.
pub enum Verdict {
    /// A valid header: the original client, or None to keep the connection's own peer.
    Admitted(Option<RawAddr>),
    /// The connection is to be closed: why.
    Refused(String),
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Admitted(None) => write!(f, "Admitted(own address)"),
            Verdict::Admitted(Some(a)) => write!(f, "Admitted(family {})", a.storage.ss_family),
            Verdict::Refused(why) => write!(f, "Refused({why:?})"),
        }
    }
}

impl Policy {
    /// True when `peer` may send a header: an IP address in a trusted network, or a
    /// Unix socket peer (whom the socket file's permissions already let in).
    pub fn trusts(&self, peer: &RawAddr) -> bool {
        let ip = match peer.storage.ss_family as libc::c_int {
            libc::AF_UNIX => return true,
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin = unsafe { &*(peer.as_ptr() as *const libc::sockaddr_in) };
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
                    .to_ipv6_mapped()
                    .octets()
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                unsafe { &*(peer.as_ptr() as *const libc::sockaddr_in6) }
                    .sin6_addr
                    .s6_addr
            }
            _ => return false,
        };
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// Check `peer`, then read its header from `fd` (meant to run detached), waiting
    /// for it until `deadline`. Only the header's bytes are taken from the socket.
    /// `Error::Interrupted` (a signal) may be returned: call again with the same
    /// `parser` and `deadline`, which keep the progress.
    pub fn read(
        &self,
        fd: RawFd,
        peer: &RawAddr,
        parser: &mut Parser,
        deadline: Option<Instant>,
    ) -> Result<Verdict> {
        if !self.trusts(peer) {
            return Ok(Verdict::Refused(UNTRUSTED.into()));
        }
        loop {
            if let Some(verdict) = read_available(fd, parser)? {
                return Ok(verdict);
            }
            match syscall::wait_fd(fd, libc::POLLIN, deadline) {
                Ok(()) => {}
                Err(Error::Timeout) => return Ok(Verdict::Refused(LATE.into())),
                Err(err) => return Err(err),
            }
        }
    }
}

/// Why a peer outside the trusted networks is refused.
pub const UNTRUSTED: &str = "a peer outside proxy_trusted";
/// Why a header that did not complete before its deadline is refused.
pub const LATE: &str = "no complete header in time";

/// Feed `parser` what `fd` has queued, without waiting: the verdict, or None when the
/// header is not complete and nothing more is queued (wait for readability, then call
/// again). Takes only the header's bytes off the socket.
pub fn read_available(fd: RawFd, parser: &mut Parser) -> Result<Option<Verdict>> {
    let mut buf = [0u8; V2_FIXED + V2_MAX_BODY];
    loop {
        let room = parser.room();
        let peek = !parser.exact();
        let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
        let n = match syscall::recv(fd, &mut buf[..room], flags, Mode::NonBlocking, None) {
            Ok(0) => {
                return Ok(Some(Verdict::Refused(
                    "closed before the header was complete".into(),
                )))
            }
            Ok(n) => n,
            Err(Error::Os(libc::EAGAIN)) => return Ok(None),
            Err(Error::Os(code)) => {
                return Ok(Some(Verdict::Refused(crate::error::strerror(code))))
            }
            Err(err) => return Err(err),
        };
        let (taken, verdict) = match parser.feed(&buf[..n]) {
            Step::NeedMore => (n, None),
            Step::Done(header, k) => (
                k,
                Some(Verdict::Admitted(
                    header.source.as_ref().map(Endpoint::to_raw),
                )),
            ),
            Step::Invalid(reason) => return Ok(Some(Verdict::Refused(reason.into()))),
        };
        if peek {
            discard(fd, &mut buf[..taken])?;
        }
        if verdict.is_some() {
            return Ok(verdict);
        }
    }
}

/// Take `buf.len()` bytes that a peek saw queued (so no wait is needed).
fn discard(fd: RawFd, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match syscall::recv(
            fd,
            &mut buf[done..],
            libc::MSG_DONTWAIT,
            Mode::NonBlocking,
            None,
        ) {
            Ok(0) => return Err(Error::Os(libc::ECONNRESET)),
            Ok(n) => done += n,
            Err(Error::Interrupted) => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], port: u16) -> Endpoint {
        Endpoint::Inet(SocketAddrV4::new(Ipv4Addr::from(a), port))
    }

    fn v6(s: &str, port: u16) -> Endpoint {
        Endpoint::Inet6(SocketAddrV6::new(s.parse().unwrap(), port, 0, 0))
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_inet(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&src);
        body.extend_from_slice(&dst);
        body.extend_from_slice(&sp.to_be_bytes());
        body.extend_from_slice(&dp.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    fn v2_inet6(src: &str, dst: &str, sp: u16, dp: u16) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&sp.to_be_bytes());
        body.extend_from_slice(&dp.to_be_bytes());
        v2(1, 0x21, &body)
    }

    fn v2_unix(src: &[u8], dst: &[u8]) -> Vec<u8> {
        let mut body = vec![0u8; 216];
        body[..src.len()].copy_from_slice(src);
        body[108..108 + dst.len()].copy_from_slice(dst);
        v2(1, 0x31, &body)
    }

    /// Parse `bytes` in one feed.
    fn parse(version: Version, bytes: &[u8]) -> Step {
        Parser::new(version).feed(bytes)
    }

    /// Every way of cutting `wire` (a header followed by application bytes) into two
    /// feeds, and one byte at a time: the same header, the same count of bytes taken.
    fn every_split(version: Version, wire: &[u8], header_len: usize, expect: &Header) {
        for cut in 0..=wire.len() {
            let mut p = Parser::new(version);
            let first = p.feed(&wire[..cut]);
            let (header, taken) = match first {
                Step::Done(h, k) => (h, k),
                Step::NeedMore => {
                    assert!(cut < header_len, "cut {cut}: NeedMore past the header");
                    match p.feed(&wire[cut..]) {
                        Step::Done(h, k) => (h, cut + k),
                        other => panic!("cut {cut}: {other:?}"),
                    }
                }
                other => panic!("cut {cut}: {other:?}"),
            };
            assert_eq!(&header, expect, "cut {cut}");
            assert_eq!(taken, header_len, "cut {cut}");
        }
        let mut p = Parser::new(version);
        for (i, b) in wire.iter().enumerate() {
            assert!(p.room() >= 1);
            match p.feed(std::slice::from_ref(b)) {
                Step::NeedMore => assert!(i + 1 < header_len),
                Step::Done(h, 1) => {
                    assert_eq!(i + 1, header_len);
                    assert_eq!(&h, expect);
                    return;
                }
                other => panic!("byte {i}: {other:?}"),
            }
        }
        panic!("never complete");
    }

    #[test]
    fn v1_tcp4_every_split() {
        let line = b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n";
        let mut wire = line.to_vec();
        wire.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
        let expect = Header {
            source: Some(v4([192, 168, 0, 1], 56324)),
            destination: Some(v4([10, 0, 0, 2], 443)),
        };
        every_split(Version::V1, &wire, line.len(), &expect);
    }

    #[test]
    fn v1_tcp6_every_split() {
        let line = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n";
        let mut wire = line.to_vec();
        wire.extend_from_slice(b"\r\nPROXY more");
        let expect = Header {
            source: Some(v6("2001:db8::1", 65535)),
            destination: Some(v6("::1", 0)),
        };
        every_split(Version::V1, &wire, line.len(), &expect);
    }

    #[test]
    fn v1_unknown_keeps_own_address() {
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n",
        ] {
            let mut wire = line.to_vec();
            wire.extend_from_slice(b"data");
            every_split(Version::V1, &wire, line.len(), &Header::local());
        }
        assert!(matches!(
            parse(Version::V1, b"PROXY UNKNOWNX\r\n"),
            Step::Invalid(_)
        ));
    }

    #[test]
    fn v1_longest_header_fits() {
        let line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(line.len(), V1_MAX - 3);
        let mut unknown = b"PROXY UNKNOWN ".to_vec();
        unknown.resize(V1_MAX - 2, b'x');
        unknown.extend_from_slice(b"\r\n");
        assert_eq!(unknown.len(), V1_MAX);
        assert_eq!(
            parse(Version::V1, &unknown),
            Step::Done(Header::local(), V1_MAX)
        );
        let mut longer = unknown[..V1_MAX - 2].to_vec();
        longer.extend_from_slice(b"x\r\n");
        assert!(matches!(parse(Version::V1, &longer), Step::Invalid(_)));
        // Without any line end, the 107th byte is where it gives up, also fed one by one.
        let mut p = Parser::new(Version::V1);
        let mut last = Step::NeedMore;
        for b in &longer[..V1_MAX] {
            last = p.feed(std::slice::from_ref(b));
            if !matches!(last, Step::NeedMore) {
                break;
            }
        }
        assert!(matches!(last, Step::Invalid(_)));
    }

    #[test]
    fn v1_invalid() {
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.0\r\n",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 ::g ::1 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.\xff 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY\r\n",
        ];
        for line in bad {
            assert!(
                matches!(parse(Version::V1, line), Step::Invalid(_)),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // A v2 header is not a v1 one: no guessing.
        let h = v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &[]);
        assert!(matches!(parse(Version::V1, &h), Step::Invalid(_)));
    }

    #[test]
    fn v1_wrong_prefix_fails_at_first_byte() {
        let mut p = Parser::new(Version::V1);
        assert_eq!(p.feed(b"PRO"), Step::NeedMore);
        assert!(matches!(p.feed(b"Z"), Step::Invalid(_)));
        assert!(matches!(
            Parser::new(Version::V1).feed(b"G"),
            Step::Invalid(_)
        ));
    }

    #[test]
    fn v1_truncated_needs_more() {
        let line = b"PROXY TCP4 192.168.0.1 10.0.0.2 56324 443\r\n";
        for cut in 0..line.len() {
            assert_eq!(
                parse(Version::V1, &line[..cut]),
                Step::NeedMore,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn v2_inet_every_split() {
        let tlvs = [0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00];
        for t in [&[][..], &tlvs[..]] {
            let h = v2_inet([203, 0, 113, 7], [10, 1, 2, 3], 40000, 8080, t);
            let mut wire = h.clone();
            wire.extend_from_slice(b"hello\n");
            let expect = Header {
                source: Some(v4([203, 0, 113, 7], 40000)),
                destination: Some(v4([10, 1, 2, 3], 8080)),
            };
            every_split(Version::V2, &wire, h.len(), &expect);
        }
    }

    #[test]
    fn v2_inet6_every_split() {
        let h = v2_inet6("2001:db8::7", "fe80::1", 1, 65535);
        let mut wire = h.clone();
        wire.extend_from_slice(&V2_SIGNATURE);
        let expect = Header {
            source: Some(v6("2001:db8::7", 1)),
            destination: Some(v6("fe80::1", 65535)),
        };
        every_split(Version::V2, &wire, h.len(), &expect);
    }

    #[test]
    fn v2_unix_paths() {
        let h = v2_unix(b"/run/client.sock", b"/run/server.sock");
        let mut wire = h.clone();
        wire.push(b'x');
        let expect = Header {
            source: Some(Endpoint::Unix(b"/run/client.sock".to_vec())),
            destination: Some(Endpoint::Unix(b"/run/server.sock".to_vec())),
        };
        every_split(Version::V2, &wire, h.len(), &expect);
        let abstract_ = v2_unix(b"\0name", b"");
        match parse(Version::V2, &abstract_) {
            Step::Done(h, _) => {
                assert_eq!(h.source, Some(Endpoint::Unix(b"\0name".to_vec())));
                assert_eq!(h.destination, Some(Endpoint::Unix(Vec::new())));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v2_local_and_unspec_keep_own_address() {
        // LOCAL: the block is discarded whatever it holds (the family is ignored).
        for (cmd, fam, body) in [
            (0u8, 0x00u8, &[][..]),
            (0, 0x11, &[1, 2, 3][..]),
            (0, 0x21, &[0xff; 40][..]),
            (0, 0xff, &[1][..]),
            (1, 0x00, &[9, 9, 9, 9][..]),
        ] {
            let h = v2(cmd, fam, body);
            let mut wire = h.clone();
            wire.extend_from_slice(b"after");
            every_split(Version::V2, &wire, h.len(), &Header::local());
        }
    }

    #[test]
    fn v2_invalid() {
        let good = v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &[]);
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for i in 0..12 {
            let mut h = good.clone();
            h[i] ^= 0x40;
            cases.push(h);
        }
        for ver_cmd in [0x10u8, 0x30, 0x22, 0x2f, 0x01] {
            let mut h = good.clone();
            h[12] = ver_cmd;
            cases.push(h);
        }
        for fam in [0x01u8, 0x10, 0x13, 0x41, 0x23, 0x33, 0xff] {
            let mut h = good.clone();
            h[13] = fam;
            cases.push(h);
        }
        // Datagram addresses on a stream connection.
        let mut h = good.clone();
        h[13] = 0x12;
        cases.push(h);
        // Address blocks too short for their family.
        cases.push(v2(1, 0x11, &[0; 11]));
        cases.push(v2(1, 0x21, &[0; 35]));
        cases.push(v2(1, 0x31, &[0; 215]));
        // TLVs cut short or longer than the header.
        cases.push(v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &[0x04]));
        cases.push(v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &[0x04, 0x00]));
        cases.push(v2_inet(
            [1, 2, 3, 4],
            [5, 6, 7, 8],
            1,
            2,
            &[0x04, 0x00, 0x02, 0x00],
        ));
        cases.push(v2_inet(
            [1, 2, 3, 4],
            [5, 6, 7, 8],
            1,
            2,
            &[0x04, 0x00, 0x00, 0x05],
        ));
        // A v1 line is not a v2 header.
        cases.push(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec());
        for case in &cases {
            assert!(
                matches!(parse(Version::V2, case), Step::Invalid(_)),
                "{case:?}"
            );
        }
    }

    #[test]
    fn v2_length_bound() {
        let mut h = v2(1, 0x00, &[]);
        h[14..16].copy_from_slice(&((V2_MAX_BODY + 1) as u16).to_be_bytes());
        // Refused as soon as the length is known, before the body is read.
        assert!(matches!(parse(Version::V2, &h), Step::Invalid(_)));
        let mut tlv = vec![0x20u8];
        tlv.extend_from_slice(&((V2_MAX_BODY - 12 - 3) as u16).to_be_bytes());
        tlv.resize(V2_MAX_BODY - 12, 7);
        let h = v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &tlv);
        assert_eq!(h.len(), V2_FIXED + V2_MAX_BODY);
        assert!(matches!(parse(Version::V2, &h), Step::Done(_, n) if n == h.len()));
    }

    #[test]
    fn v2_truncated_needs_more_and_room_is_exact() {
        let h = v2_inet([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &[0x04, 0x00, 0x01, 0x00]);
        for cut in 0..h.len() {
            let mut p = Parser::new(Version::V2);
            assert_eq!(p.feed(&h[..cut]), Step::NeedMore, "cut {cut}");
            let want = if cut < V2_FIXED {
                V2_FIXED - cut
            } else {
                h.len() - cut
            };
            assert_eq!(p.room(), want, "cut {cut}");
        }
    }

    #[test]
    fn v2_wrong_signature_fails_at_first_byte() {
        assert!(matches!(
            Parser::new(Version::V2).feed(b"G"),
            Step::Invalid(_)
        ));
        let mut p = Parser::new(Version::V2);
        assert_eq!(p.feed(&V2_SIGNATURE[..5]), Step::NeedMore);
        assert!(matches!(p.feed(b"x"), Step::Invalid(_)));
    }

    #[test]
    fn feeding_after_the_end_is_refused() {
        let mut p = Parser::new(Version::V1);
        assert!(matches!(p.feed(b"PROXY UNKNOWN\r\n"), Step::Done(..)));
        assert!(matches!(p.feed(b"more"), Step::Invalid(_)));
    }

    #[test]
    fn endpoints_to_raw_addresses() {
        let raw = v4([127, 0, 0, 9], 4242).to_raw();
        assert_eq!(raw.storage.ss_family as i32, libc::AF_INET);
        // SAFETY: AF_INET storage.
        let sin = unsafe { &*(raw.as_ptr() as *const libc::sockaddr_in) };
        assert_eq!(u16::from_be(sin.sin_port), 4242);
        assert_eq!(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            Ipv4Addr::new(127, 0, 0, 9)
        );
        let raw = v6("::1", 7).to_raw();
        assert_eq!(raw.storage.ss_family as i32, libc::AF_INET6);
        let raw = Endpoint::Unix(b"/tmp/x".to_vec()).to_raw();
        let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
        assert_eq!(raw.len as usize, base + 7);
        assert_eq!(Endpoint::Unix(Vec::new()).to_raw().len as usize, base);
    }

    #[test]
    fn trusted_networks() {
        let policy = Policy {
            version: Version::V1,
            trusted: vec![
                Network::new(&[127, 0, 0, 0], 8).unwrap(),
                Network::new(&Ipv6Addr::LOCALHOST.octets(), 128).unwrap(),
                Network::new(&[10, 1, 0, 0], 16).unwrap(),
            ],
            timeout: None,
        };
        assert!(policy.trusts(&v4([127, 3, 2, 1], 1).to_raw()));
        assert!(policy.trusts(&v4([10, 1, 255, 1], 1).to_raw()));
        assert!(!policy.trusts(&v4([10, 2, 0, 1], 1).to_raw()));
        assert!(policy.trusts(&v6("::1", 1).to_raw()));
        assert!(!policy.trusts(&v6("::2", 1).to_raw()));
        // IPv4 peers of a dual-stack listener arrive mapped.
        assert!(policy.trusts(&v6("::ffff:127.0.0.1", 1).to_raw()));
        assert!(!policy.trusts(&v6("::ffff:192.0.2.1", 1).to_raw()));
        assert!(policy.trusts(&Endpoint::Unix(Vec::new()).to_raw()));
        let all = Policy {
            trusted: vec![
                Network::new(&[0; 4], 0).unwrap(),
                Network::new(&[0; 16], 0).unwrap(),
            ],
            ..policy.clone()
        };
        assert!(all.trusts(&v4([192, 0, 2, 1], 1).to_raw()));
        assert!(all.trusts(&v6("2001:db8::1", 1).to_raw()));
        let none = Policy {
            trusted: vec![],
            ..policy
        };
        assert!(!none.trusts(&v4([127, 0, 0, 1], 1).to_raw()));
        assert!(Network::new(&[0; 4], 33).is_none());
        assert!(Network::new(&[0; 5], 1).is_none());
    }

    /// Over a real socket pair: only the header is taken, the rest stays for the
    /// application, however the bytes are cut.
    #[test]
    fn read_leaves_the_rest_queued() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        let policy = Policy {
            version: Version::V1,
            trusted: vec![],
            timeout: None,
        };
        let peer = Endpoint::Unix(Vec::new()).to_raw();
        for version in [Version::V1, Version::V2] {
            let header = match version {
                Version::V1 => b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80\r\n".to_vec(),
                Version::V2 => v2_inet([192, 0, 2, 1], [192, 0, 2, 2], 1000, 80, &[1, 0, 0]),
            };
            let policy = Policy {
                version,
                ..policy.clone()
            };
            for cut in [1, 5, header.len() - 1, header.len(), header.len() + 3] {
                let (mut a, mut b) = UnixStream::pair().unwrap();
                let mut wire = header.clone();
                wire.extend_from_slice(b"payload");
                let (first, second) = wire.split_at(cut);
                let second = second.to_vec();
                a.write_all(first).unwrap();
                let writer = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    a.write_all(&second).unwrap();
                    a
                });
                let deadline = Some(Instant::now() + Duration::from_secs(5));
                let mut parser = Parser::new(version);
                let verdict = policy
                    .read(b.as_raw_fd(), &peer, &mut parser, deadline)
                    .unwrap();
                assert!(
                    matches!(verdict, Verdict::Admitted(Some(_))),
                    "{version:?} {cut}: {verdict:?}"
                );
                drop(writer.join().unwrap());
                let mut rest = Vec::new();
                b.read_to_end(&mut rest).unwrap();
                assert_eq!(rest, b"payload", "{version:?} cut {cut}");
            }
        }
    }

    #[test]
    fn read_refuses_timeout_eof_garbage_and_strangers() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        let policy = Policy {
            version: Version::V2,
            trusted: vec![],
            timeout: None,
        };
        let unix = Endpoint::Unix(Vec::new()).to_raw();
        let soon = || Some(Instant::now() + Duration::from_millis(50));
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&V2_SIGNATURE[..4]).unwrap();
        let v = policy
            .read(b.as_raw_fd(), &unix, &mut Parser::new(Version::V2), soon())
            .unwrap();
        assert!(
            matches!(v, Verdict::Refused(ref r) if r.contains("in time")),
            "{v:?}"
        );
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&V2_SIGNATURE[..4]).unwrap();
        drop(a);
        let v = policy
            .read(b.as_raw_fd(), &unix, &mut Parser::new(Version::V2), soon())
            .unwrap();
        assert!(
            matches!(v, Verdict::Refused(ref r) if r.contains("closed")),
            "{v:?}"
        );
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let v = policy
            .read(b.as_raw_fd(), &unix, &mut Parser::new(Version::V2), soon())
            .unwrap();
        assert!(matches!(v, Verdict::Refused(_)), "{v:?}");
        let (_a, b) = UnixStream::pair().unwrap();
        let stranger = v4([192, 0, 2, 1], 1).to_raw();
        let v = policy
            .read(
                b.as_raw_fd(),
                &stranger,
                &mut Parser::new(Version::V2),
                soon(),
            )
            .unwrap();
        assert!(
            matches!(v, Verdict::Refused(ref r) if r.contains("trusted")),
            "{v:?}"
        );
    }
}
