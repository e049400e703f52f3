//! `loadgen`: the closed-loop load generator of the fastsocketserver benchmark.
//!
//! Modes (all over loopback, one JSON line on stdout at the end):
//!
//! * `tcp`: `--conns` persistent connections; every request is a message of `--size` bytes
//!   ending in `\n`, and each connection waits for the whole echo before its next request.
//! * `tcp-connect`: `--conns` concurrent clients, each doing connect, one request, close.
//! * `udp`: `--conns` clients, one socket each, one datagram at a time; a reply that does not
//!   arrive within `--timeout-ms` counts as lost (the datagram carries a sequence number, so a
//!   late reply is never mistaken for the next one).
//! * `unix`: like `tcp`, to a Unix stream socket path.
//!
//! `tcp`, `unix` and `udp` run all their clients on one thread with epoll (see `evented.rs`);
//! `--threads` runs a thread per client instead (blocking sockets), as `tcp-connect` does.
//! * `idle`: open `--conns` connections (at most `--concurrency` handshakes in flight, on one
//!   thread with `poll(2)`), each sends one line and reads its echo, and then all stay open for
//!   `--hold` seconds; reports how many were served and how many the server closed meanwhile.
//!
//! Latencies go into a log-linear histogram (64 sub-buckets per power of two, < 1.6 % error),
//! never into a sorted array. The load generator's own CPU time over the measured window comes
//! from `getrusage(RUSAGE_SELF)`, so a reader can see whether the load, not the server, was the
//! limit.
//!
//! With `--sync`, the window is coordinated with the caller (benches/run.py): after the warmup
//! the program prints `# start` and waits for a line on stdin before it starts counting; at the
//! end it prints `# stop` and waits for another line before it reports (the caller snapshots the
//! server's kernel counters at both marks, with the load still applied / the connections open).

mod evented;

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixStream;
use std::process;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Histogram

/// Log-linear latency histogram in nanoseconds: values below 128 have their own bucket, above
/// that each power of two is split into 64 buckets.
struct Hist {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Hist {
    fn new() -> Self {
        Hist { counts: vec![0; 64 * 66], total: 0, sum_ns: 0, max_ns: 0 }
    }

    fn index(v: u64) -> usize {
        if v < 128 {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - 6;
        ((shift as usize + 1) << 6) + ((v >> shift) as usize - 64)
    }

    /// Midpoint of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < 128 {
            return i as u64;
        }
        let shift = (i >> 6) - 1;
        let top = ((i & 63) + 64) as u64;
        (top << shift) + ((1u64 << shift) >> 1)
    }

    fn record(&mut self, d: Duration) {
        let v = d.as_nanos().min(u64::MAX as u128) as u64;
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.sum_ns += v as u128;
        self.max_ns = self.max_ns.max(v);
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += *b;
        }
        self.total += o.total;
        self.sum_ns += o.sum_ns;
        self.max_ns = self.max_ns.max(o.max_ns);
    }

    fn percentile_us(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let target = ((q * self.total as f64).ceil() as u64).max(1);
        let mut cum = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c;
            if cum >= target {
                return (Self::value(i).min(self.max_ns)) as f64 / 1000.0;
            }
        }
        self.max_ns as f64 / 1000.0
    }

    fn mean_us(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.total as f64 / 1000.0
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Clone)]
struct Cfg {
    mode: String,
    addr: String,
    conns: usize,
    size: usize,
    duration: f64,
    warmup: f64,
    timeout_ms: u64,
    io_timeout_ms: u64,
    hold: f64,
    concurrency: usize,
    idle_timeout: f64,
    sync: bool,
    /// A thread per client instead of one epoll thread (tcp, unix, udp).
    threads: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen --mode tcp|tcp-connect|udp|unix|idle --addr HOST:PORT|PATH [--conns N] \
         [--size BYTES] [--duration S] [--warmup S] [--timeout-ms MS] [--io-timeout-ms MS] \
         [--hold S] [--concurrency N] [--idle-timeout S] [--sync] [--threads]"
    );
    process::exit(2)
}

fn parse_args() -> Cfg {
    let mut c = Cfg {
        mode: String::new(),
        addr: String::new(),
        conns: 1,
        size: 64,
        duration: 5.0,
        warmup: 1.0,
        timeout_ms: 200,
        io_timeout_ms: 5000,
        hold: 1.0,
        concurrency: 8,
        idle_timeout: 60.0,
        sync: false,
        threads: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--sync" || a == "--threads" {
            if a == "--sync" {
                c.sync = true;
            } else {
                c.threads = true;
            }
            i += 1;
            continue;
        }
        if a == "-h" || a == "--help" {
            usage();
        }
        let v = match args.get(i + 1) {
            Some(v) => v.clone(),
            None => usage(),
        };
        let num = |v: &str| -> f64 { v.parse::<f64>().unwrap_or_else(|_| usage()) };
        match a {
            "--mode" => c.mode = v,
            "--addr" => c.addr = v,
            "--conns" => c.conns = num(&v) as usize,
            "--size" => c.size = num(&v) as usize,
            "--duration" => c.duration = num(&v),
            "--warmup" => c.warmup = num(&v),
            "--timeout-ms" => c.timeout_ms = num(&v) as u64,
            "--io-timeout-ms" => c.io_timeout_ms = num(&v) as u64,
            "--hold" => c.hold = num(&v),
            "--concurrency" => c.concurrency = (num(&v) as usize).max(1),
            "--idle-timeout" => c.idle_timeout = num(&v),
            _ => usage(),
        }
        i += 2;
    }
    if c.mode.is_empty() || c.addr.is_empty() || c.conns == 0 || c.size < 2 {
        usage();
    }
    if c.mode == "udp" && c.size < 18 {
        eprintln!("loadgen: udp needs --size >= 18 (the datagram carries a sequence number)");
        process::exit(2);
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Shared state and helpers

struct Shared {
    phase: AtomicU8,
    connected: AtomicUsize,
    errors: AtomicU64,
    errors_total: AtomicU64,
    lost: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Client threads still running; each finishes its request in flight and closes its
    /// socket after STOP, so servers see an orderly end of the stream, not a reset.
    alive: AtomicUsize,
}

impl Shared {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    fn error(&self, what: String) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        if self.phase() == MEASURE {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            *f = Some(what);
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Usage {
    user: f64,
    sys: f64,
}

fn rusage_self() -> Usage {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage { user: tv(ru.ru_utime), sys: tv(ru.ru_stime) }
}

fn raise_nofile() {
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// With `--sync`: print a mark and wait for the caller's acknowledgement on stdin.
fn mark(cfg: &Cfg, what: &str) {
    if !cfg.sync {
        return;
    }
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "# {what}");
    let _ = out.flush();
    drop(out);
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
}

fn message(size: usize) -> Vec<u8> {
    let mut m = vec![b'x'; size];
    m[size - 1] = b'\n';
    m
}

fn resolve(addr: &str) -> SocketAddr {
    match addr.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(a) => a,
        None => {
            eprintln!("loadgen: cannot resolve {addr:?}");
            process::exit(2)
        }
    }
}

fn sleep_s(s: f64) {
    if s > 0.0 {
        thread::sleep(Duration::from_secs_f64(s));
    }
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

// ---------------------------------------------------------------------------------------------
// Closed-loop workers

/// One persistent stream connection (TCP or Unix), reconnecting after an error.
fn stream_worker<S: Read + Write>(
    connect: impl Fn() -> io::Result<S>,
    sh: &Shared,
    hist: &Mutex<Hist>,
    msg: &[u8],
) {
    let mut buf = vec![0u8; msg.len()];
    let mut counted = false;
    'outer: loop {
        if sh.phase() == STOP {
            break;
        }
        let res = connect();
        if !counted {
            sh.connected.fetch_add(1, Ordering::AcqRel);
            counted = true;
        }
        let mut s = match res {
            Ok(s) => s,
            Err(e) => {
                sh.error(format!("connect: {e}"));
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        loop {
            if sh.phase() == STOP {
                break 'outer;
            }
            let t0 = Instant::now();
            if let Err(e) = s.write_all(msg).and_then(|_| s.read_exact(&mut buf)) {
                if sh.phase() != STOP {
                    sh.error(format!("echo: {e}"));
                }
                thread::sleep(Duration::from_millis(1));
                continue 'outer;
            }
            let dt = t0.elapsed();
            if buf != msg {
                sh.error("echo: reply differs from the request".into());
                continue 'outer;
            }
            if sh.phase() == MEASURE {
                hist.lock().unwrap().record(dt);
            }
        }
    }
}

/// Connect from the loopback source address `src` (any 127.x.y.z is local on Linux), letting
/// the kernel pick the port at connect time (`IP_BIND_ADDRESS_NO_PORT`), so the port is unique
/// per 4-tuple rather than per address.
fn connect_from(src: std::net::Ipv4Addr, dst: std::net::SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    s.set_write_timeout(Some(timeout))?; // bounds the blocking connect as well
    let one: libc::c_int = 1;
    let (ss, len) = sockaddr_for(&SocketAddr::new(src.into(), 0));
    let (ds, dlen) = sockaddr_for(&SocketAddr::V4(dst));
    unsafe {
        libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &one as *const _ as *const libc::c_void, 4);
        if libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            if libc::connect(fd, &ds as *const _ as *const libc::sockaddr, dlen) == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(s)
}

/// One client doing connect, one request, close, over and over.
///
/// Closing first, the client keeps each connection in TIME_WAIT for a minute; tens of thousands
/// of them to one destination make the kernel's search for a free ephemeral port (inside
/// `connect`) cost more CPU than the server's work. On IPv4 loopback the clients therefore
/// connect from a rotating set of 200 source addresses (127.0.0.2 ...), each with its own
/// port space.
fn connect_worker(worker: usize, addr: SocketAddr, io_timeout: Duration, sh: &Shared, hist: &Mutex<Hist>, msg: &[u8]) {
    let spread = match addr {
        SocketAddr::V4(a) if a.ip().is_loopback() => Some(a),
        _ => None,
    };
    let mut k = worker * 37;
    let mut buf = vec![0u8; msg.len()];
    sh.connected.fetch_add(1, Ordering::AcqRel);
    while sh.phase() != STOP {
        let t0 = Instant::now();
        k += 1;
        let r = (|| -> io::Result<()> {
            let mut s = match spread {
                Some(dst) => connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2 + (k % 200) as u8), dst, io_timeout)?,
                None => TcpStream::connect_timeout(&addr, io_timeout)?,
            };
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(io_timeout))?;
            s.set_write_timeout(Some(io_timeout))?;
            s.write_all(msg)?;
            s.read_exact(&mut buf)?;
            Ok(())
        })();
        let dt = t0.elapsed();
        match r {
            Ok(()) if buf == msg => {
                if sh.phase() == MEASURE {
                    hist.lock().unwrap().record(dt);
                }
            }
            Ok(()) => sh.error("echo: reply differs from the request".into()),
            Err(e) => {
                sh.error(format!("connect-request: {e}"));
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// One UDP client: a datagram out, wait for its reply or the timeout.
fn udp_worker(addr: SocketAddr, timeout: Duration, sh: &Shared, hist: &Mutex<Hist>, size: usize) {
    let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = match UdpSocket::bind(bind).and_then(|s| s.connect(addr).map(|_| s)) {
        Ok(s) => s,
        Err(e) => {
            sh.connected.fetch_add(1, Ordering::AcqRel);
            sh.error(format!("udp socket: {e}"));
            return;
        }
    };
    let _ = sock.set_read_timeout(Some(timeout));
    sh.connected.fetch_add(1, Ordering::AcqRel);
    let mut msg = message(size);
    let mut buf = vec![0u8; size + 64];
    let mut seq: u64 = 0;
    while sh.phase() != STOP {
        seq += 1;
        let tag = format!("{seq:016x}");
        msg[..16].copy_from_slice(tag.as_bytes());
        let t0 = Instant::now();
        if let Err(e) = sock.send(&msg) {
            sh.error(format!("udp send: {e}"));
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        let deadline = t0 + timeout;
        let mut stale = false;
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if n == size && buf[..size] == msg[..] => {
                    let dt = t0.elapsed();
                    if sh.phase() == MEASURE {
                        hist.lock().unwrap().record(dt);
                    }
                    break;
                }
                Ok(_) => {
                    // A late reply to an earlier, already counted-as-lost datagram.
                    let now = Instant::now();
                    if now >= deadline {
                        if sh.phase() == MEASURE {
                            sh.lost.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                    stale = true;
                    let _ = sock.set_read_timeout(Some(deadline - now));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                    if sh.phase() == MEASURE {
                        sh.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    sh.error(format!("udp recv: {e}"));
                    thread::sleep(Duration::from_millis(1));
                    break;
                }
            }
        }
        if stale {
            let _ = sock.set_read_timeout(Some(timeout));
        }
    }
}

fn run_closed_loop(cfg: &Cfg) {
    let sh = Arc::new(Shared {
        phase: AtomicU8::new(WARMUP),
        connected: AtomicUsize::new(0),
        errors: AtomicU64::new(0),
        errors_total: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        first_error: Mutex::new(None),
        alive: AtomicUsize::new(cfg.conns),
    });
    let msg = Arc::new(message(cfg.size));
    let io_timeout = Duration::from_millis(cfg.io_timeout_ms.max(1));
    let mut hists = Vec::new();
    let evented = !cfg.threads && matches!(cfg.mode.as_str(), "tcp" | "unix" | "udp");
    if evented {
        sh.alive.store(1, Ordering::Release);
        let h = Arc::new(Mutex::new(Hist::new()));
        hists.push(h.clone());
        let (sh, msg, cfg) = (sh.clone(), msg.clone(), cfg.clone());
        let reply_timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        thread::spawn(move || {
            let target = match cfg.mode.as_str() {
                "tcp" => evented::Target::Tcp(resolve(&cfg.addr)),
                "unix" => evented::Target::Unix(cfg.addr.clone()),
                _ => evented::Target::Udp(resolve(&cfg.addr)),
            };
            evented::run(target, cfg.conns, msg.to_vec(), io_timeout, reply_timeout, &sh, &h);
            sh.alive.fetch_sub(1, Ordering::AcqRel);
        });
    }
    for worker in (0..cfg.conns).filter(|_| !evented) {
        let h = Arc::new(Mutex::new(Hist::new()));
        hists.push(h.clone());
        let (sh, msg, cfg) = (sh.clone(), msg.clone(), cfg.clone());
        let spawned = thread::Builder::new().stack_size(256 * 1024).spawn(move || {
            match cfg.mode.as_str() {
            "tcp" => {
                let addr = resolve(&cfg.addr);
                stream_worker(
                    || {
                        let s = TcpStream::connect_timeout(&addr, io_timeout)?;
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(io_timeout))?;
                        s.set_write_timeout(Some(io_timeout))?;
                        Ok(s)
                    },
                    &sh,
                    &h,
                    &msg,
                )
            }
            "unix" => stream_worker(
                || {
                    let s = UnixStream::connect(&cfg.addr)?;
                    s.set_read_timeout(Some(io_timeout))?;
                    s.set_write_timeout(Some(io_timeout))?;
                    Ok(s)
                },
                &sh,
                &h,
                &msg,
            ),
            "tcp-connect" => connect_worker(worker, resolve(&cfg.addr), io_timeout, &sh, &h, &msg),
            "udp" => udp_worker(resolve(&cfg.addr), Duration::from_millis(cfg.timeout_ms.max(1)), &sh, &h, cfg.size),
            _ => unreachable!(),
            }
            sh.alive.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            eprintln!("loadgen: cannot start a client thread: {e}");
            process::exit(1);
        }
    }
    // All clients connected (or failed to) before the clock starts.
    let t_conn = Instant::now();
    while sh.connected.load(Ordering::Acquire) < cfg.conns && t_conn.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(2));
    }
    sleep_s(cfg.warmup);
    mark(cfg, "start");
    let ru0 = rusage_self();
    let t0 = Instant::now();
    sh.phase.store(MEASURE, Ordering::Release);
    sleep_s(cfg.duration);
    sh.phase.store(STOP, Ordering::Release);
    let elapsed = t0.elapsed().as_secs_f64();
    let ru1 = rusage_self();
    let mut total = Hist::new();
    for h in &hists {
        total.merge(&h.lock().unwrap());
    }
    mark(cfg, "stop");
    let cpu = (ru1.user - ru0.user) + (ru1.sys - ru0.sys);
    let first = sh.first_error.lock().unwrap().clone().unwrap_or_default();
    println!(
        "{{\"mode\":{},\"conns\":{},\"size\":{},\"duration_s\":{:.4},\"requests\":{},\"rps\":{:.1},\
\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1},\"errors\":{},\
\"errors_total\":{},\"lost\":{},\"loadgen_cpu_s\":{:.4},\"loadgen_user_s\":{:.4},\"loadgen_sys_s\":{:.4},\
\"loadgen_cpu_pct\":{:.1},\"first_error\":{}}}",
        json_str(&cfg.mode),
        cfg.conns,
        cfg.size,
        elapsed,
        total.total,
        total.total as f64 / elapsed,
        total.percentile_us(0.50),
        total.percentile_us(0.90),
        total.percentile_us(0.99),
        total.max_ns as f64 / 1000.0,
        total.mean_us(),
        sh.errors.load(Ordering::Relaxed),
        sh.errors_total.load(Ordering::Relaxed),
        sh.lost.load(Ordering::Relaxed),
        cpu,
        ru1.user - ru0.user,
        ru1.sys - ru0.sys,
        100.0 * cpu / elapsed,
        json_str(&first),
    );
    let _ = io::stdout().flush();
    // Let the clients close their sockets in order; one may still sit in a read the server
    // never answers, so do not wait for long.
    let t_end = Instant::now();
    while sh.alive.load(Ordering::Acquire) > 0 && t_end.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(2));
    }
    process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// Idle connections: one thread, poll(2), non-blocking sockets

#[derive(PartialEq, Clone, Copy)]
enum St {
    Connecting,
    Reading,
    Done,
    Failed,
}

struct IdleConn {
    fd: i32,
    st: St,
    t0: Instant,
    got: usize,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn sockaddr_for(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn run_idle(cfg: &Cfg) {
    raise_nofile();
    let addr = resolve(&cfg.addr);
    let (ss, sslen) = sockaddr_for(&addr);
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let msg = message(cfg.size);
    let mut buf = vec![0u8; cfg.size];
    let mut conns: Vec<IdleConn> = Vec::with_capacity(cfg.conns);
    let mut inflight: Vec<usize> = Vec::new();
    let mut hist = Hist::new();
    let mut errors = 0u64;
    let mut first_error = String::new();
    fn fail(c: &mut IdleConn, what: String, errors: &mut u64, first_error: &mut String) {
        unsafe { libc::close(c.fd) };
        c.st = St::Failed;
        *errors += 1;
        if first_error.is_empty() {
            *first_error = what;
        }
    }

    mark(cfg, "start");
    let ru0 = rusage_self();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(cfg.idle_timeout);
    let mut next = 0usize;
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    while (next < cfg.conns || !inflight.is_empty()) && Instant::now() < deadline {
        while inflight.len() < cfg.concurrency && next < cfg.conns {
            let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
            let mut c = IdleConn { fd, st: St::Connecting, t0: Instant::now(), got: 0 };
            if fd < 0 {
                c.st = St::Failed;
                errors += 1;
                if first_error.is_empty() {
                    first_error = format!("socket: {}", io::Error::last_os_error());
                }
            } else {
                let one: libc::c_int = 1;
                unsafe {
                    libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one as *const _ as *const libc::c_void, 4);
                }
                let r = unsafe { libc::connect(fd, &ss as *const _ as *const libc::sockaddr, sslen) };
                if r < 0 && errno() != libc::EINPROGRESS {
                    let e = io::Error::last_os_error();
                    fail(&mut c, format!("connect: {e}"), &mut errors, &mut first_error);
                } else {
                    inflight.push(conns.len());
                }
            }
            conns.push(c);
            next += 1;
        }
        pfds.clear();
        for &i in &inflight {
            let ev = if conns[i].st == St::Connecting { libc::POLLOUT } else { libc::POLLIN };
            pfds.push(libc::pollfd { fd: conns[i].fd, events: ev, revents: 0 });
        }
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            eprintln!("loadgen: poll: {}", io::Error::last_os_error());
            process::exit(1);
        }
        for (k, p) in pfds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            let c = &mut conns[inflight[k]];
            if c.st == St::Connecting {
                let mut err: libc::c_int = 0;
                let mut len = 4 as libc::socklen_t;
                unsafe {
                    libc::getsockopt(c.fd, libc::SOL_SOCKET, libc::SO_ERROR, &mut err as *mut _ as *mut libc::c_void, &mut len)
                };
                if err != 0 {
                    fail(c, format!("connect: {}", io::Error::from_raw_os_error(err)), &mut errors, &mut first_error);
                    continue;
                }
                let w = unsafe { libc::write(c.fd, msg.as_ptr() as *const libc::c_void, msg.len()) };
                if w != msg.len() as isize {
                    fail(c, format!("write: {}", io::Error::last_os_error()), &mut errors, &mut first_error);
                    continue;
                }
                c.st = St::Reading;
            } else if c.st == St::Reading {
                let want = cfg.size - c.got;
                let r = unsafe { libc::read(c.fd, buf.as_mut_ptr() as *mut libc::c_void, want) };
                if r > 0 {
                    c.got += r as usize;
                    if c.got == cfg.size {
                        c.st = St::Done;
                        hist.record(c.t0.elapsed());
                    }
                } else if r == 0 {
                    fail(c, "read: closed by the server before the echo".into(), &mut errors, &mut first_error);
                } else if errno() != libc::EAGAIN && errno() != libc::EINTR {
                    fail(c, format!("read: {}", io::Error::last_os_error()), &mut errors, &mut first_error);
                }
            }
        }
        inflight.retain(|&i| conns[i].st == St::Connecting || conns[i].st == St::Reading);
    }
    let ramp = t0.elapsed().as_secs_f64();
    let served = conns.iter().filter(|c| c.st == St::Done).count();
    let unserved = cfg.conns - served;
    sleep_s(cfg.hold);
    // Which of the served connections did the server close while they sat idle?
    let mut closed = 0usize;
    let mut all: Vec<libc::pollfd> = conns
        .iter()
        .filter(|c| c.st == St::Done)
        .map(|c| libc::pollfd { fd: c.fd, events: libc::POLLIN, revents: 0 })
        .collect();
    unsafe { libc::poll(all.as_mut_ptr(), all.len() as libc::nfds_t, 0) };
    for p in &all {
        if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            closed += 1;
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let ru1 = rusage_self();
    mark(cfg, "stop");
    let cpu = (ru1.user - ru0.user) + (ru1.sys - ru0.sys);
    println!(
        "{{\"mode\":\"idle\",\"conns\":{},\"size\":{},\"duration_s\":{:.4},\"ramp_s\":{:.4},\"requests\":{},\
\"rps\":{:.1},\"served\":{},\"unserved\":{},\"closed_while_idle\":{},\"p50_us\":{:.1},\"p90_us\":{:.1},\
\"p99_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1},\"errors\":{},\"errors_total\":{},\"lost\":0,\
\"loadgen_cpu_s\":{:.4},\"loadgen_user_s\":{:.4},\"loadgen_sys_s\":{:.4},\"loadgen_cpu_pct\":{:.1},\"first_error\":{}}}",
        cfg.conns,
        cfg.size,
        elapsed,
        ramp,
        served,
        served as f64 / ramp.max(1e-9),
        served,
        unserved,
        closed,
        hist.percentile_us(0.50),
        hist.percentile_us(0.90),
        hist.percentile_us(0.99),
        hist.max_ns as f64 / 1000.0,
        hist.mean_us(),
        unserved,
        errors,
        cpu,
        ru1.user - ru0.user,
        ru1.sys - ru0.sys,
        100.0 * cpu / elapsed,
        json_str(&first_error),
    );
    let _ = io::stdout().flush();
    process::exit(0);
}

fn main() {
    let cfg = parse_args();
    match cfg.mode.as_str() {
        "tcp" | "tcp-connect" | "udp" | "unix" => {
            if cfg.conns > 1000 {
                raise_nofile();
            }
            run_closed_loop(&cfg)
        }
        "idle" => run_idle(&cfg),
        _ => usage(),
    }
}

#[cfg(test)]
mod tests {
    use super::Hist;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 127, 128, 129, 1000, 65_432, 1 << 20, 123_456_789, 1 << 40] {
            let i = Hist::index(v);
            assert!(i >= last);
            last = i;
            let mid = Hist::value(i) as f64;
            assert!((mid - v as f64).abs() <= (v as f64) / 64.0 + 1.0, "{v} -> {mid}");
        }
    }

    #[test]
    fn percentiles() {
        let mut h = Hist::new();
        for us in 1..=1000u64 {
            h.record(std::time::Duration::from_micros(us));
        }
        assert!((h.percentile_us(0.5) - 500.0).abs() < 10.0);
        assert!((h.percentile_us(0.99) - 990.0).abs() < 20.0);
    }
}
