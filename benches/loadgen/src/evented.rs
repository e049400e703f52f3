//! The closed loop of the `tcp`, `unix` and `udp` modes on one thread: every client socket
//! non-blocking, one epoll, each client with one request in flight.
//!
//! A thread per client costs the load generator a context switch per request (32 client
//! threads sleeping in `read`): on a 2-core machine that is CPU the server under test does
//! not get, and with `--pin` it made the load generator's core the limit (99 % of it at
//! ~125k req/s). Here a request costs a `send`, a `recv` and a share of one `epoll_wait`.

use crate::{Hist, Shared, MEASURE, STOP};
use std::io;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub enum Target {
    Tcp(SocketAddr),
    Unix(String),
    Udp(SocketAddr),
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
    Udp(UdpSocket),
}

impl Sock {
    fn fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Udp(s) => s.as_raw_fd(),
        }
    }
}

struct Client {
    sock: Option<Sock>,
    /// Bytes of the request sent, bytes of the reply received.
    sent: usize,
    got: usize,
    t0: Instant,
    /// When the reply is overdue (a stream error; a lost datagram).
    deadline: Instant,
    /// UDP: the sequence number carried by the datagram in flight.
    seq: u64,
    /// Waiting for EPOLLOUT.
    want_out: bool,
    /// No socket (closed after STOP, or waiting to reconnect).
    retry_at: Option<Instant>,
    done: bool,
}

struct Loop<'a> {
    target: Target,
    ep: RawFd,
    msg: Vec<u8>,
    buf: Vec<u8>,
    io_timeout: Duration,
    reply_timeout: Duration,
    sh: &'a Shared,
    hist: &'a Mutex<Hist>,
}

/// `format!("{:016x}", v)` without allocating (this runs twice per request).
fn hex16(v: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((v >> (60 - 4 * i)) & 15) as usize];
    }
    out
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Loop<'_> {
    fn connect(&self) -> io::Result<Sock> {
        let sock = match &self.target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, self.io_timeout)?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Sock::Tcp(s)
            }
            Target::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_nonblocking(true)?;
                Sock::Unix(s)
            }
            Target::Udp(addr) => {
                let bind = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(bind)?;
                s.connect(addr)?;
                s.set_nonblocking(true)?;
                Sock::Udp(s)
            }
        };
        Ok(sock)
    }

    fn ctl(&self, op: i32, fd: RawFd, token: usize, out: bool) {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | if out { libc::EPOLLOUT } else { 0 }) as u32,
            u64: token as u64,
        };
        unsafe { libc::epoll_ctl(self.ep, op, fd, &mut ev) };
    }

    fn udp(&self) -> bool {
        matches!(self.target, Target::Udp(_))
    }

    /// Open (or reopen) client `i` and start its first request.
    fn open(&mut self, c: &mut Client, i: usize) {
        match self.connect() {
            Ok(sock) => {
                self.ctl(libc::EPOLL_CTL_ADD, sock.fd(), i, false);
                c.sock = Some(sock);
                c.retry_at = None;
                c.want_out = false;
                self.start(c, i);
            }
            Err(e) => {
                self.sh.error(format!("connect: {e}"));
                c.retry_at = Some(Instant::now() + Duration::from_millis(10));
            }
        }
    }

    fn close(&self, c: &mut Client) {
        // Closing the descriptor removes it from the epoll set.
        c.sock = None;
    }

    /// A failed request: count it (unless stopping), drop the connection, reconnect soon.
    fn fail(&mut self, c: &mut Client, what: String) {
        if self.sh.phase() != STOP {
            self.sh.error(what);
        }
        self.close(c);
        c.retry_at = Some(Instant::now() + Duration::from_millis(1));
    }

    /// Send the next request of client `i`, or close it once the run is over.
    fn start(&mut self, c: &mut Client, i: usize) {
        if self.sh.phase() == STOP {
            self.close(c);
            c.done = true;
            return;
        }
        if self.udp() {
            c.seq += 1;
        }
        c.sent = 0;
        c.got = 0;
        c.t0 = Instant::now();
        c.deadline = c.t0
            + if self.udp() {
                self.reply_timeout
            } else {
                self.io_timeout
            };
        self.send(c, i);
    }

    fn send(&mut self, c: &mut Client, i: usize) {
        let Some(fd) = c.sock.as_ref().map(Sock::fd) else {
            return;
        };
        if self.udp() {
            // The request buffer is shared: put this client's sequence number in it.
            self.msg[..16].copy_from_slice(&hex16(c.seq));
        }
        while c.sent < self.msg.len() {
            let rest = &self.msg[c.sent..];
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                c.sent += n as usize;
                continue;
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => {
                    if !c.want_out {
                        c.want_out = true;
                        self.ctl(libc::EPOLL_CTL_MOD, fd, i, true);
                    }
                    return;
                }
                code => {
                    let e = io::Error::from_raw_os_error(code);
                    if self.udp() {
                        // An ICMP error from an earlier datagram; the request stays in flight
                        // and times out as lost if nothing answers.
                        self.sh.error(format!("udp send: {e}"));
                        return;
                    }
                    return self.fail(c, format!("echo: {e}"));
                }
            }
        }
        if c.want_out {
            c.want_out = false;
            self.ctl(libc::EPOLL_CTL_MOD, fd, i, false);
        }
    }

    fn readable(&mut self, c: &mut Client, i: usize) {
        let Some(fd) = c.sock.as_ref().map(Sock::fd) else {
            return;
        };
        let size = self.msg.len();
        loop {
            let (at, room) = if self.udp() {
                (0, self.buf.len())
            } else {
                (c.got, size - c.got)
            };
            let n = unsafe {
                libc::recv(
                    fd,
                    self.buf[at..].as_mut_ptr().cast(),
                    room,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                match errno() {
                    libc::EINTR => continue,
                    libc::EAGAIN => return,
                    code if self.udp() => {
                        self.sh
                            .error(format!("udp recv: {}", io::Error::from_raw_os_error(code)));
                        return;
                    }
                    code => {
                        return self
                            .fail(c, format!("echo: {}", io::Error::from_raw_os_error(code)))
                    }
                }
            }
            let n = n as usize;
            if self.udp() {
                // The reply must carry this client's own sequence number.
                if n == size
                    && self.buf[..16] == hex16(c.seq)
                    && self.buf[16..size] == self.msg[16..]
                {
                    self.complete(c, i);
                    return;
                }
                // A late reply to a datagram already counted as lost: keep reading.
                continue;
            }
            if n == 0 {
                return self.fail(c, "echo: connection closed by the server".into());
            }
            c.got += n;
            if c.got == size {
                if self.buf[..size] != self.msg[..] {
                    return self.fail(c, "echo: reply differs from the request".into());
                }
                self.complete(c, i);
                return;
            }
        }
    }

    fn complete(&mut self, c: &mut Client, i: usize) {
        if self.sh.phase() == MEASURE {
            self.hist.lock().unwrap().record(c.t0.elapsed());
        }
        self.start(c, i);
    }

    /// Overdue replies (stream: an error and a new connection; UDP: a lost datagram) and
    /// clients waiting to reconnect.
    fn sweep(&mut self, clients: &mut [Client]) {
        let now = Instant::now();
        for (i, c) in clients.iter_mut().enumerate() {
            if c.done {
                continue;
            }
            if let Some(at) = c.retry_at {
                if self.sh.phase() == STOP {
                    c.done = true;
                } else if at <= now {
                    self.open(c, i);
                }
                continue;
            }
            if c.deadline <= now {
                if self.udp() {
                    if self.sh.phase() == MEASURE {
                        self.sh.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    self.start(c, i);
                } else {
                    self.fail(c, "echo: timed out".into());
                }
            }
        }
    }
}

/// Run `conns` clients against `target` until the run stops; their latencies go to `hist`.
pub fn run(
    target: Target,
    conns: usize,
    msg: Vec<u8>,
    io_timeout: Duration,
    reply_timeout: Duration,
    sh: &Shared,
    hist: &Mutex<Hist>,
) {
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        eprintln!("loadgen: epoll_create1: {}", io::Error::last_os_error());
        std::process::exit(1);
    }
    let size = msg.len();
    let mut lp = Loop {
        target,
        ep,
        msg,
        buf: vec![0u8; size + 64],
        io_timeout,
        reply_timeout,
        sh,
        hist,
    };
    let now = Instant::now();
    let mut clients: Vec<Client> = (0..conns).map(|_| new_client(now, false)).collect();
    for i in 0..conns {
        let mut c = std::mem::replace(&mut clients[i], new_client(now, true));
        lp.open(&mut c, i);
        clients[i] = c;
    }
    sh.connected.fetch_add(conns, Ordering::AcqRel);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut last_sweep = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    loop {
        if sh.phase() == STOP {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if clients.iter().all(|c| c.done) || at.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 5) };
        if n < 0 && errno() != libc::EINTR {
            eprintln!("loadgen: epoll_wait: {}", io::Error::last_os_error());
            std::process::exit(1);
        }
        for ev in &events[..n.max(0) as usize] {
            let i = ev.u64 as usize;
            let mut c = std::mem::replace(&mut clients[i], new_client(now, true));
            if c.sock.is_some() && ev.events & libc::EPOLLOUT as u32 != 0 {
                lp.send(&mut c, i);
            }
            if c.sock.is_some()
                && ev.events & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0
            {
                lp.readable(&mut c, i);
            }
            clients[i] = c;
        }
        if n <= 0 || last_sweep.elapsed() >= Duration::from_millis(5) {
            lp.sweep(&mut clients);
            last_sweep = Instant::now();
        }
        if sh.phase() == STOP {
            // Close idle clients (waiting to reconnect) at once; busy ones after their reply.
            for c in clients.iter_mut().filter(|c| c.sock.is_none()) {
                c.done = true;
            }
        }
    }
    drop(clients);
    unsafe { libc::close(ep) };
}

/// A client without a socket; `done` ones are placeholders while a client is borrowed.
fn new_client(now: Instant, done: bool) -> Client {
    Client {
        sock: None,
        sent: 0,
        got: 0,
        t0: now,
        deadline: now,
        seq: 0,
        want_out: false,
        retry_at: None,
        done,
    }
}
