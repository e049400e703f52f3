//! `echo-server`: the native ceiling of the fastsocketserver benchmark.
//!
//! The same line echo as the Python handlers (`for line in self.rfile: self.wfile.write(line)`),
//! written in Rust with a thread per connection (64 KiB stacks) and blocking I/O, so the
//! benchmark shows what the Python handler call costs on top of the same I/O pattern.
//!
//! `echo-server tcp HOST:PORT | unix PATH | udp HOST:PORT` prints `LISTENING <address>` once it
//! listens (port 0 picks a free port) and serves until killed. On `SIGUSR1` it prints one line
//! `RUSAGE {...}` with its own `getrusage` totals (all threads, dead ones included), the same
//! line the Python servers of benches/servers.py print.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::process;
use std::thread;

fn rusage_line() -> String {
    let get = |who| {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        ru
    };
    let (s, c) = (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN));
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    format!(
        "RUSAGE {{\"utime\":{:.6},\"stime\":{:.6},\"nvcsw\":{},\"nivcsw\":{},\"maxrss_kb\":{},\
\"c_utime\":{:.6},\"c_stime\":{:.6},\"c_nvcsw\":{},\"c_nivcsw\":{}}}",
        tv(s.ru_utime),
        tv(s.ru_stime),
        s.ru_nvcsw,
        s.ru_nivcsw,
        s.ru_maxrss,
        tv(c.ru_utime),
        tv(c.ru_stime),
        c.ru_nvcsw,
        c.ru_nivcsw
    )
}

/// Block SIGUSR1 in every thread (the mask is inherited) and answer it from one thread.
fn start_rusage_reporter() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        thread::spawn(move || loop {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) == 0 {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", rusage_line());
                let _ = out.flush();
            }
        });
    }
}

fn echo_lines<S: Read + Write>(s: S) {
    let mut r = BufReader::with_capacity(8192, s);
    let mut line = Vec::with_capacity(8192);
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if r.get_mut().write_all(&line).is_err() {
                    return;
                }
            }
        }
    }
}

fn spawn_conn<S: Read + Write + Send + 'static>(s: S) {
    let r = thread::Builder::new().stack_size(64 * 1024).spawn(move || echo_lines(s));
    if let Err(e) = r {
        eprintln!("echo-server: cannot start a thread: {e}");
    }
}

fn announce(addr: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "LISTENING {addr}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: echo-server tcp HOST:PORT | unix PATH | udp HOST:PORT");
        process::exit(2);
    }
    start_rusage_reporter();
    let fail = |e: std::io::Error| -> ! {
        eprintln!("echo-server: {e}");
        process::exit(1)
    };
    match args[0].as_str() {
        "tcp" => {
            let l = TcpListener::bind(&args[1]).unwrap_or_else(|e| fail(e));
            announce(l.local_addr().unwrap().to_string());
            for s in l.incoming() {
                match s {
                    Ok(s) => spawn_conn(s),
                    Err(e) => eprintln!("echo-server: accept: {e}"),
                }
            }
        }
        "unix" => {
            let _ = std::fs::remove_file(&args[1]);
            let l = UnixListener::bind(&args[1]).unwrap_or_else(|e| fail(e));
            announce(args[1].clone());
            for s in l.incoming() {
                match s {
                    Ok(s) => spawn_conn(s),
                    Err(e) => eprintln!("echo-server: accept: {e}"),
                }
            }
        }
        "udp" => {
            let s = UdpSocket::bind(&args[1]).unwrap_or_else(|e| fail(e));
            announce(s.local_addr().unwrap().to_string());
            let mut buf = vec![0u8; 65536];
            loop {
                match s.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        let _ = s.send_to(&buf[..n], peer);
                    }
                    Err(e) => eprintln!("echo-server: recv: {e}"),
                }
            }
        }
        _ => {
            eprintln!("usage: echo-server tcp HOST:PORT | unix PATH | udp HOST:PORT");
            process::exit(2);
        }
    }
}
