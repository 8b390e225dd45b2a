//! A process that keeps using a mount the way a long-running program does while the test
//! upgrades the plugin under it: its working directory is inside the mount, it holds a
//! file open for reading and writing and a shared memory map of another, and it checks
//! every answer against its own copy of what it wrote.
//!
//! Usage: workload DIR [MAP_BYTES]   (runs until its stdin closes, then prints
//! `ops=N errors=M` and the errors, if any, one per line; the map is 64 KiB unless given;
//! the file `ready` appears in DIR when the loop begins)

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const FILE_SIZE: usize = 1 << 20;
const CHUNK: usize = 4096;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: workload DIR [MAP_BYTES]");
    let map_size: usize = std::env::args()
        .nth(2)
        .map_or(64 << 10, |n| n.parse().expect("MAP_BYTES is a number"));
    std::env::set_current_dir(&dir).expect("chdir into the mount");
    let here = std::fs::metadata(".").expect("stat .");
    let open = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(name)
            .expect("create a work file")
    };
    let file = open("rw.dat");
    file.set_len(FILE_SIZE as u64).unwrap();
    let mapped = open("map.dat");
    mapped.set_len(map_size as u64).unwrap();
    let file_ino = file.metadata().unwrap().ino();
    // SAFETY: a fresh shared mapping of a file this process created and nobody else
    // touches; the slice below is only used while the mapping lives.
    let map = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            map_size,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &mapped,
            0,
        )
    }
    .expect("mmap");
    // SAFETY: as above; `map_size` bytes mapped read-write.
    let map = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), map_size) };

    let stop = Arc::new(AtomicBool::new(false));
    let stopper = Arc::clone(&stop);
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        stopper.store(true, Ordering::SeqCst);
    });

    let mut shadow = vec![0u8; FILE_SIZE];
    let mut map_shadow = vec![0u8; map_size];
    // Every page of a large map is written once before the loop, so that the whole map
    // is the plugin's to keep (and to hand over) from the start.
    for page in (0..map_size).step_by(4096) {
        map[page] = (page / 4096) as u8 | 1;
        map_shadow[page] = map[page];
    }
    // Tells the test the loop begins.
    File::create("ready").expect("create ready");
    let mut errors: Vec<String> = Vec::new();
    let mut ops = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    while !stop.load(Ordering::SeqCst) && errors.len() < 20 {
        let value = next();
        let at = (value as usize % (FILE_SIZE / CHUNK)) * CHUNK;
        let chunk = vec![value as u8; CHUNK];
        match file.write_at(&chunk, at as u64) {
            Ok(n) if n == CHUNK => shadow[at..at + CHUNK].copy_from_slice(&chunk),
            other => errors.push(format!("write at {at}: {other:?}")),
        }
        let mut back = vec![0u8; CHUNK];
        match file.read_at(&mut back, at as u64) {
            Ok(n) if n == CHUNK && back == shadow[at..at + CHUNK] => {}
            other => errors.push(format!("read at {at}: {other:?}, content differs")),
        }
        let m = value as usize % map_size;
        map[m] = (value >> 8) as u8;
        map_shadow[m] = map[m];
        // A small map is compared whole each time, a large one at 64 places.
        let changed = if map_size <= 64 << 10 {
            map != map_shadow.as_slice()
        } else {
            (0..64).any(|_| {
                let i = next() as usize % map_size;
                map[i] != map_shadow[i]
            })
        };
        if changed {
            errors.push("the memory map changed under us".into());
        }
        match (std::fs::metadata("."), std::fs::metadata("rw.dat")) {
            (Ok(d), Ok(f)) if d.ino() == here.ino() && f.ino() == file_ino => {}
            other => errors.push(format!("stat: {other:?}")),
        }
        if std::fs::read_dir(".").map(|d| d.count()).unwrap_or(0) < 2 {
            errors.push("readdir lost entries".into());
        }
        ops += 1;
    }
    // At the end: the whole file and the map, as the kernel and the plugin have them.
    // SAFETY: the range is exactly the mapping made above.
    let _ = unsafe {
        rustix::mm::msync(
            map.as_mut_ptr().cast(),
            map_size,
            rustix::mm::MsyncFlags::SYNC,
        )
    };
    let mut whole = vec![0u8; FILE_SIZE];
    if file.read_exact_at(&mut whole, 0).is_err() || whole != shadow {
        errors.push("rw.dat differs from what was written".into());
    }
    if map != map_shadow.as_slice() {
        errors.push("the memory map differs from what was stored through it".into());
    }
    let mut on_disk = vec![0u8; map_size];
    let mut reopened = File::open("map.dat").unwrap();
    if reopened.read_exact(&mut on_disk).is_err() || on_disk != map_shadow {
        errors.push("map.dat differs from what was stored through the map".into());
    }
    println!("ops={ops} errors={}", errors.len());
    for error in errors {
        println!("{error}");
    }
}
