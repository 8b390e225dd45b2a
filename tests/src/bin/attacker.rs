//! An unprivileged user attacking fshostd, for the security tests (run as uid 65534).
//!
//! `attacker race SOCKET SECS A B OP PATH VICTIM` swaps `A` and `B` (a directory and a
//! symlink) with `renameat2(RENAME_EXCHANGE)` as fast as it can for SECS seconds while it
//! asks the daemon, again and again, to mount memfs on PATH and unmount it again. It counts
//! a win each time mountinfo shows a change on VICTIM (a directory of root's) after the mount
//! (`OP` = `mount`) or after the mount or the unmount (`OP` = `unmount`): memfs mounted over
//! it, or root's own mount there gone. Prints `swaps=N requests=N mounts=N wins=N`
//! (`mounts`: how many mounts the daemon made) and exits 0.
//!
//! `attacker hold SOCKET N` opens N connections, prints how many the daemon accepted,
//! then keeps them open until stdin closes.
//!
//! `attacker idle SOCKET` connects, sends nothing, and prints what the daemon says until it
//! closes the connection.
//!
//! `attacker flood SOCKET SECS` writes `list` requests as fast as the socket takes them
//! for SECS seconds without reading an answer; prints the bytes written.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn fail(what: String) -> ! {
    eprintln!("attacker: {what}");
    std::process::exit(2);
}

/// The mount points in this process's view of the kernel's mounts.
fn mounted(path: &str) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|line| line.split(' ').nth(4) == Some(path))
        .count()
}

fn ask(stream: &mut BufReader<UnixStream>, request: &serde_json::Value) -> bool {
    let mut line = request.to_string();
    line.push('\n');
    if stream.get_mut().write_all(line.as_bytes()).is_err() {
        fail("the daemon closed the connection".into());
    }
    let mut answer = String::new();
    if stream.read_line(&mut answer).is_err() || answer.is_empty() {
        fail("no answer from the daemon".into());
    }
    answer.contains("\"ok\":true")
}

fn race(args: &[String]) {
    let [socket, secs, a, b, op, path, victim] = args else {
        fail("usage: race SOCKET SECS A B OP PATH VICTIM".into());
    };
    let secs: u64 = secs.parse().unwrap_or_else(|_| fail("bad SECS".into()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let stop = AtomicBool::new(false);
    let swaps = AtomicU64::new(0);
    let (mut requests, mut mounts, mut wins) = (0u64, 0u64, 0u64);
    let victim_mounts = mounted(victim);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let swapped = rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    Path::new(a),
                    rustix::fs::CWD,
                    Path::new(b),
                    rustix::fs::RenameFlags::EXCHANGE,
                );
                if swapped.is_ok() {
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| fail(format!("{e}")));
        let mut stream = BufReader::new(stream);
        let mount = serde_json::json!({"op": "mount", "plugin": "memfs", "mountpoint": path});
        let unmount = serde_json::json!({"op": "unmount", "mountpoint": path, "lazy": true});
        // A win is any change of what is mounted on VICTIM, seen after any answer: memfs
        // mounted over it, or its own mount gone.
        let changed = || u64::from(mounted(victim) != victim_mounts);
        while Instant::now() < deadline {
            requests += 1;
            let made = ask(&mut stream, &mount);
            wins += changed();
            if made {
                mounts += 1;
                requests += 1;
                ask(&mut stream, &unmount);
                if op == "unmount" {
                    wins += changed();
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    println!(
        "swaps={} requests={requests} mounts={mounts} wins={wins}",
        swaps.load(Ordering::Relaxed)
    );
}

fn hold(args: &[String]) {
    let [socket, n] = args else {
        fail("usage: hold SOCKET N".into());
    };
    let n: usize = n.parse().unwrap_or_else(|_| fail("bad N".into()));
    let streams: Vec<UnixStream> = (0..n)
        .filter_map(|_| UnixStream::connect(socket).ok())
        .collect();
    // A refused connection gets one answer line and is closed; an accepted one
    // waits. Give the daemon time to answer them all (also on a loaded machine),
    // then look once at each.
    std::thread::sleep(Duration::from_millis(500));
    let held: Vec<UnixStream> = streams
        .into_iter()
        .filter(|stream| {
            stream.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            matches!((&*stream).read(&mut byte), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .collect();
    let accepted = held.len();
    println!("accepted={accepted}");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn idle(args: &[String]) {
    let [socket] = args else {
        fail("usage: idle SOCKET".into());
    };
    let mut stream = UnixStream::connect(socket).unwrap_or_else(|e| fail(format!("{e}")));
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    print!("{answer}");
}

fn flood(args: &[String]) {
    let [socket, secs] = args else {
        fail("usage: flood SOCKET SECS".into());
    };
    let secs: u64 = secs.parse().unwrap_or_else(|_| fail("bad SECS".into()));
    let mut stream = UnixStream::connect(socket).unwrap_or_else(|e| fail(format!("{e}")));
    stream
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let chunk = "{\"op\":\"list\"}\n".repeat(1024);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut written = 0u64;
    while Instant::now() < deadline {
        match stream.write(chunk.as_bytes()) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    println!("written={written}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("race") => race(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("flood") => flood(&args[1..]),
        Some("idle") => idle(&args[1..]),
        _ => fail("usage: attacker race|hold|flood|idle ...".into()),
    }
}
