//! `shoal bench tcp-ceiling`: the plain loopback TCP rate of a ring, the reference a ring
//! all-reduce's busbw is held against (every member sends and receives busbw bytes per
//! second).

use crate::failure::{usage, Failure};
use anyhow::anyhow;
use clap::Args;
use std::time::Instant;

/// `shoal bench tcp-ceiling` arguments.
#[derive(Args)]
pub struct TcpCeilingArgs {
    /// Members of the ring (1: one stream). Default: 1.
    #[arg(long, default_value_t = 1)]
    ring: usize,
    /// MiB each member streams. Default: 1024.
    #[arg(long, default_value_t = 1024)]
    mib: usize,
}

/// RING members (one thread each, non-blocking sockets under poll), each streaming MIB
/// MiB in 1 MiB writes to the next while receiving from the previous, all at once, with
/// no reduction and no framing. Prints `{"ring","per_member_gbps","aggregate_gbps"}`
/// (per member: the slowest).
pub fn run(a: TcpCeilingArgs) -> Result<(), Failure> {
    const CHUNK: usize = 1 << 20;
    let (ring, mib) = (a.ring, a.mib);
    if !(1..=16).contains(&ring) {
        return Err(usage(anyhow!("--ring must be 1..=16")));
    }
    if !(1..=1 << 20).contains(&mib) {
        return Err(usage(anyhow!("--mib must be 1..=1048576")));
    }
    let total = mib << 20;
    // Member i listens; member i-1 (mod ring) connects to it: every member has one
    // outgoing and one incoming stream (a single member streams to itself).
    let listeners = (0..ring)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(anyhow::Error::from)?;
    let mut outgoing = Vec::with_capacity(ring);
    let mut incoming = Vec::with_capacity(ring);
    for i in 0..ring {
        let next = &listeners[(i + 1) % ring];
        let s = std::net::TcpStream::connect(next.local_addr().map_err(anyhow::Error::from)?)
            .map_err(anyhow::Error::from)?;
        s.set_nodelay(true).map_err(anyhow::Error::from)?;
        outgoing.push(s);
        incoming.push(next.accept().map_err(anyhow::Error::from)?.0);
    }
    // incoming[i] flows into member (i + 1) % ring; rotated, it flows into member i. Each
    // member is one thread that sends and receives at once through poll(2) on
    // non-blocking sockets (the shape of gloo's and shoal's transports): no reduction, no
    // framing, only the bytes.
    incoming.rotate_right(1);
    let start = std::sync::Arc::new(std::sync::Barrier::new(ring + 1));
    let members: Vec<_> = outgoing
        .into_iter()
        .zip(incoming)
        .map(|(out, inp)| {
            let start = start.clone();
            std::thread::spawn(move || ring_member(out, inp, total, CHUNK, &start))
        })
        .collect();
    start.wait();
    let mut rates = Vec::with_capacity(ring);
    for m in members {
        rates.push(
            m.join()
                .map_err(|_| anyhow!("ring member thread panicked"))?
                .map_err(anyhow::Error::from)?,
        );
    }
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{}",
        serde_json::json!({
            "ring": ring,
            "per_member_gbps": slowest / 1e9,
            "aggregate_gbps": rates.iter().sum::<f64>() / 1e9,
        })
    );
    Ok(())
}

/// One member of the loopback ring: streams `total` bytes out while reading `total` in,
/// both non-blocking under poll(2). Returns the rate it received at, bytes/s.
fn ring_member(
    mut out: std::net::TcpStream,
    mut inp: std::net::TcpStream,
    total: usize,
    chunk: usize,
    start: &std::sync::Barrier,
) -> std::io::Result<f64> {
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::AsRawFd;
    out.set_nonblocking(true)?;
    inp.set_nonblocking(true)?;
    let tx = vec![1u8; chunk];
    let mut rx = vec![0u8; chunk];
    let (mut sent, mut got) = (0usize, 0usize);
    start.wait();
    let t = Instant::now();
    while sent < total || got < total {
        let mut fds = [
            libc::pollfd {
                fd: out.as_raw_fd(),
                events: if sent < total { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: inp.as_raw_fd(),
                events: if got < total { libc::POLLIN } else { 0 },
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 10_000) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if sent < total {
            match out.write(&tx[..chunk.min(total - sent)]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if got < total {
            match inp.read(&mut rx) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(k) => got += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(got as f64 / t.elapsed().as_secs_f64())
}
