//! The event loop's connections still sending their PROXY protocol header.
//!
//! With a `ProxyPolicy`, an accepted connection is registered with the poller as usual
//! but kept here, not given a protocol, until its header is complete: each readable
//! event feeds what is queued to its parser without waiting ([`read_available`]), so a
//! slow client costs no round anything. A complete header releases the connection with
//! the original client as its peer address (what `get_extra_info('peername')` then
//! reports) and `connection_made` runs as for any connection; a refused one (a stranger,
//! a malformed header, one not complete by its deadline) is closed without a protocol.
//!
//! Only the header's bytes are taken off the socket; what the client sent after it is
//! still queued, and no new edge will announce it, so the loop reads the connection
//! once it has its protocol. All of this runs in the detached phase: no `Python` here.

use crate::sys::proxy::{read_available, Parser, Policy, Verdict, LATE, UNTRUSTED};
use crate::sys::syscall::RawAddr;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

struct Entry {
    sock: OwnedFd,
    peer: RawAddr,
    local: RawAddr,
    parser: Parser,
    deadline: Option<Instant>,
}

/// What became of a connection whose header was being read.
pub enum Outcome {
    /// The header is complete: the socket, the client address to report, the local one.
    Ready(OwnedFd, RawAddr, RawAddr),
    /// Refused: the socket (to deregister and close), the peer, why.
    Refused(OwnedFd, RawAddr, String),
}

/// Connections (by token) whose header is not complete yet.
#[derive(Default)]
pub struct Awaiting {
    entries: HashMap<usize, Entry>,
}

impl Awaiting {
    /// A newly accepted connection, already registered under `token`: refused at once
    /// if `peer` is not trusted, otherwise kept until its header is read (the
    /// registration's first readable event starts it).
    pub fn start(
        &mut self,
        policy: &Policy,
        token: usize,
        sock: OwnedFd,
        peer: RawAddr,
        local: RawAddr,
        now: Instant,
    ) -> Option<Outcome> {
        if !policy.trusts(&peer) {
            return Some(Outcome::Refused(sock, peer, UNTRUSTED.into()));
        }
        let entry = Entry {
            sock,
            peer,
            local,
            parser: Parser::new(policy.version),
            deadline: policy.timeout.map(|t| now + t),
        };
        self.entries.insert(token, entry);
        None
    }

    pub fn contains(&self, token: usize) -> bool {
        self.entries.contains_key(&token)
    }

    /// Feed what the connection has queued: its outcome once the header is complete
    /// or refused, None while it is not.
    pub fn readable(&mut self, token: usize) -> Option<Outcome> {
        let entry = self.entries.get_mut(&token)?;
        let verdict = loop {
            match read_available(entry.sock.as_raw_fd(), &mut entry.parser) {
                Ok(None) => return None,
                Ok(Some(verdict)) => break verdict,
                Err(crate::error::Error::Interrupted) => continue,
                Err(err) => break Verdict::Refused(format!("{err:?}")),
            }
        };
        let entry = self.entries.remove(&token)?;
        Some(match verdict {
            Verdict::Admitted(client) => {
                Outcome::Ready(entry.sock, client.unwrap_or(entry.peer), entry.local)
            }
            Verdict::Refused(why) => Outcome::Refused(entry.sock, entry.peer, why),
        })
    }

    /// The connections whose deadline has passed, refused (with their tokens).
    pub fn expired(&mut self, now: Instant) -> Vec<(usize, Outcome)> {
        let late: Vec<usize> = self
            .entries
            .iter()
            .filter(|(_, e)| e.deadline.is_some_and(|d| d <= now))
            .map(|(&t, _)| t)
            .collect();
        late.into_iter()
            .filter_map(|t| {
                let e = self.entries.remove(&t)?;
                Some((t, Outcome::Refused(e.sock, e.peer, LATE.into())))
            })
            .collect()
    }

    /// When the next deadline passes.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.deadline).min()
    }

    /// Every socket still waiting (the loop is closing).
    pub fn drain(&mut self) -> Vec<OwnedFd> {
        self.entries.drain().map(|(_, e)| e.sock).collect()
    }
}
