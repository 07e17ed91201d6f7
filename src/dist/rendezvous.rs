//! The start of a multi-rank run: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every other rank
//! connects and says who it is and which configuration it runs (a hash); once all have come,
//! rank 0 checks that the configurations agree and sends each rank the same payload (the NCCL
//! unique id) or the error that stops the run. Nothing here waits past the deadline: a rank
//! that never comes, a master that cannot be reached, a port in use are errors naming it.
//!
//! Wire format (little-endian): a rank sends `FCGPU-RDV1`, its rank and world size (u32 each)
//! and its 32-byte config hash; rank 0 answers one byte (0 ok, 1 error), a u32 length and that
//! many bytes (the payload, or the error's text).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::world::World;

const MAGIC: &[u8; 10] = b"FCGPU-RDV1";
/// Longest payload or error text accepted (a NCCL unique id is 128 bytes).
const MAX_REPLY: usize = 1 << 16;

/// Runs the rendezvous for `world` (more than one rank): rank 0 passes the `payload` every rank
/// gets back; the others pass an empty one. Every rank must give the same `config` hash.
pub fn rendezvous(world: &World, config: [u8; 32], payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let Some((host, port)) = &world.master else { return Ok(payload.to_vec()) };
    let deadline = Instant::now() + timeout;
    if world.is_root() {
        serve(host, *port, world.size, config, payload, deadline, timeout)
    } else {
        join(host, *port, world, config, deadline, timeout)
    }
}

fn serve(
    host: &str,
    port: u16,
    size: usize,
    config: [u8; 32],
    payload: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let listener = TcpListener::bind((host, port)).with_context(|| {
        format!("rank 0 cannot listen on MASTER_ADDR:MASTER_PORT {host}:{port} (in use, or not an address of this host)")
    })?;
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    let mut problem: Option<String> = None;
    while peers.iter().skip(1).any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(remaining(deadline)))?;
                match read_hello(&mut s) {
                    Ok((rank, _, _)) if rank == 0 || rank >= size || peers[rank].is_some() => {
                        let msg = format!(
                            "a second rank {rank} (or a rank out of 1..{size}) connected from {from}"
                        );
                        let _ = reply(&mut s, Err(&msg));
                        problem.get_or_insert(msg);
                    }
                    Ok((rank, world, hash)) => {
                        if world != size {
                            problem.get_or_insert(format!(
                                "rank {rank} ({from}) was started with a world size of {world}, rank 0 with {size}"
                            ));
                        } else if hash != config {
                            problem.get_or_insert(format!(
                                "rank {rank} runs a different configuration than rank 0 (config hashes differ): start every rank with the same command and files"
                            ));
                        }
                        peers[rank] = Some(s);
                    }
                    // Not one of ours (a port scan, another program): ignored.
                    Err(_) => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> =
                        (1..size).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                    let msg = format!(
                        "ranks {} did not reach rank 0 at {host}:{port} within {} s (--dist-timeout)",
                        missing.join(", "),
                        timeout.as_secs()
                    );
                    for s in peers.iter_mut().flatten() {
                        let _ = reply(s, Err(&msg));
                    }
                    bail!(msg);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("rendezvous: accepting a rank's connection"),
        }
    }
    let answer = match &problem {
        Some(msg) => Err(msg.as_str()),
        None => Ok(payload),
    };
    for s in peers.iter_mut().flatten() {
        reply(s, answer).context("rendezvous: answering a rank")?;
    }
    match problem {
        Some(msg) => bail!(msg),
        None => Ok(payload.to_vec()),
    }
}

fn join(
    host: &str,
    port: u16,
    world: &World,
    config: [u8; 32],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let mut last = String::from("no address");
    let mut s = loop {
        let addrs: Vec<_> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last = format!("cannot resolve {host}: {e}");
                Vec::new()
            }
        };
        let hit = addrs.iter().find_map(|a| {
            match TcpStream::connect_timeout(a, remaining(deadline).min(Duration::from_secs(2))) {
                Ok(s) => Some(s),
                Err(e) => {
                    last = e.to_string();
                    None
                }
            }
        });
        if let Some(s) = hit {
            break s;
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {} cannot reach rank 0 at MASTER_ADDR:MASTER_PORT {host}:{port} within {} s (--dist-timeout): {last}",
                world.rank,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut hello = Vec::with_capacity(50);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(world.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world.size as u32).to_le_bytes());
    hello.extend_from_slice(&config);
    s.write_all(&hello).context("rendezvous: sending this rank's hello")?;
    s.set_read_timeout(Some(remaining(deadline).max(Duration::from_millis(1))))?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).with_context(|| {
        format!("rank {}: rank 0 did not answer within {} s (--dist-timeout)", world.rank, timeout.as_secs())
    })?;
    let len = u32::from_le_bytes(head[1..5].try_into().unwrap()) as usize;
    if len > MAX_REPLY {
        bail!("rendezvous: rank 0 answered {len} bytes, more than {MAX_REPLY}");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).context("rendezvous: reading rank 0's answer")?;
    match head[0] {
        0 => Ok(body),
        _ => bail!("rank 0 stopped the run: {}", String::from_utf8_lossy(&body)),
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

/// A rank's hello: (rank, world size, config hash).
fn read_hello(s: &mut TcpStream) -> Result<(usize, usize, [u8; 32])> {
    let mut b = [0u8; 10 + 8 + 32];
    s.read_exact(&mut b)?;
    if &b[..10] != MAGIC {
        bail!("not an fcgpu rank");
    }
    let rank = u32::from_le_bytes(b[10..14].try_into().unwrap()) as usize;
    let size = u32::from_le_bytes(b[14..18].try_into().unwrap()) as usize;
    Ok((rank, size, b[18..50].try_into().unwrap()))
}

fn reply(s: &mut TcpStream, answer: std::result::Result<&[u8], &str>) -> std::io::Result<()> {
    let (code, body) = match answer {
        Ok(p) => (0u8, p),
        Err(m) => (1u8, m.as_bytes()),
    };
    let mut out = vec![code];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    s.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn world(rank: usize, size: usize, port: u16) -> World {
        World { rank, size, local_rank: rank, master: Some(("127.0.0.1".into(), port)) }
    }

    /// Runs a rendezvous of `size` ranks on threads; each rank's config hash from `hash(rank)`.
    fn run(size: usize, hash: impl Fn(usize) -> [u8; 32] + Sync, timeout: Duration) -> Vec<Result<Vec<u8>>> {
        let port = free_port();
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..size)
                .map(|r| {
                    let h = hash(r);
                    sc.spawn(move || {
                        let payload: &[u8] = if r == 0 { b"unique-id" } else { b"" };
                        rendezvous(&world(r, size, port), h, payload, timeout)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_rank_zeros_payload() {
        for r in run(4, |_| [7; 32], Duration::from_secs(20)) {
            assert_eq!(r.unwrap(), b"unique-id");
        }
    }

    #[test]
    fn a_different_config_stops_every_rank() {
        let out = run(3, |r| [if r == 2 { 1 } else { 0 }; 32], Duration::from_secs(20));
        for r in out {
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("rank 2 runs a different configuration"), "{e}");
        }
    }

    #[test]
    fn a_missing_rank_or_master_times_out_with_a_clear_error() {
        let port = free_port();
        // Rank 0 of 2 alone.
        let e = rendezvous(&world(0, 2, port), [0; 32], b"x", Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("ranks 1 did not reach rank 0"), "{e:#}");
        // Rank 1 with no rank 0.
        let e = rendezvous(&world(1, 2, port), [0; 32], b"", Duration::from_millis(300)).unwrap_err();
        assert!(format!("{e:#}").contains("cannot reach rank 0"), "{e:#}");
    }

    #[test]
    fn a_port_in_use_is_named() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let e = rendezvous(&world(0, 2, port), [0; 32], b"x", Duration::from_secs(1)).unwrap_err();
        assert!(format!("{e:#}").contains(&format!("127.0.0.1:{port}")), "{e:#}");
    }
}
