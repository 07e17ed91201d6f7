//! Collectives between ranks, with NCCL's semantics: all-reduce (sum), reduce-scatter (sum),
//! all-gather and broadcast over f32 buffers, every rank calling the same collectives in the same
//! order. [`Collective`] is what the trainer calls; [`ThreadGroup`] implements it for ranks that
//! are threads of one process (the emulated ranks CI runs), reducing in rank order, so a sum is
//! the same bits on every rank and in every run. Nothing waits past the group's timeout: a rank
//! that died or took another path makes the others fail with an error naming the ranks missing.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};

/// Collectives among the ranks of a run.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `buf` becomes the sum of every rank's `buf`.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_sum`] in f64 (gradient sums: exact for a few f32 terms, so the
    /// order of the ranks does not show in the result).
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()>;
    /// `out` becomes this rank's chunk (`out.len()` elements from `rank × out.len()`) of the sum
    /// of every rank's `input` (`size × out.len()` elements).
    fn reduce_scatter_sum(&mut self, input: &[f32], out: &mut [f32]) -> Result<()>;
    /// `out` (`size × input.len()` elements) becomes every rank's `input`, in rank order.
    fn all_gather(&mut self, input: &[f32], out: &mut [f32]) -> Result<()>;
    /// `buf` becomes rank `root`'s `buf`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce,
    AllReduce64,
    ReduceScatter,
    AllGather,
    Broadcast(usize),
}

/// The collective being gathered, and the results of finished ones not yet read by every rank.
struct Shared {
    size: usize,
    timeout: Duration,
    /// Collectives started so far (the one gathering is number `started`).
    started: u64,
    op: Option<(Op, usize)>,
    inputs: Vec<Option<Vec<f64>>>,
    /// Result of collective `n` and how many ranks still have to read it.
    results: HashMap<u64, (Outcome, usize)>,
}

/// One rank of a group of threads (see the module).
pub struct ThreadGroup {
    rank: usize,
    /// Collectives this rank has called.
    calls: u64,
    shared: Arc<(Mutex<Shared>, Condvar)>,
}

impl ThreadGroup {
    /// `size` ranks; each waits at most `timeout` for the others at a collective.
    pub fn new(size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new((
            Mutex::new(Shared {
                size,
                timeout,
                started: 0,
                op: None,
                inputs: (0..size).map(|_| None).collect(),
                results: HashMap::new(),
            }),
            Condvar::new(),
        ));
        (0..size).map(|rank| ThreadGroup { rank, calls: 0, shared: shared.clone() }).collect()
    }

    /// Adds this rank's `input` to collective number `self.calls`; the last rank to arrive
    /// computes it. Returns its result (the whole reduced, gathered or broadcast buffer).
    fn exchange(&mut self, op: Op, input: Vec<f64>) -> Result<Outcome> {
        let (n, rank) = (self.calls, self.rank);
        self.calls += 1;
        let (lock, cv) = &*self.shared;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + s.timeout;
        // The previous collective must have gathered every rank before this one starts.
        while s.started < n {
            s = wait(cv, s, deadline, rank)?;
        }
        if s.started == n {
            let error = match s.op {
                None => {
                    s.op = Some((op, input.len()));
                    None
                }
                Some(o) if o != (op, input.len()) => Some(format!(
                    "collective {n}: rank {rank} called {op:?} of {} elements where another rank called {:?} of {} (ranks must call the same collectives in the same order)",
                    input.len(),
                    o.0,
                    o.1
                )),
                Some(_) => None,
            };
            s.inputs[rank] = Some(input);
            complete(&mut s, error);
            cv.notify_all();
        }
        loop {
            if let Some(r) = read_result(&mut s, n) {
                return Ok(r);
            }
            s = wait(cv, s, deadline, rank)?;
        }
    }
}

/// A collective's result, shared by the ranks until each has read it.
type Outcome = Arc<Result<Vec<f64>, String>>;

/// Computes the gathering collective once every rank's input is in, or fails it at once with
/// `error` (every rank, including those still to come, reads the error).
fn complete(s: &mut Shared, error: Option<String>) {
    if error.is_none() && s.inputs.iter().any(Option::is_none) {
        return;
    }
    let (op, _) = s.op.take().expect("a gathering collective");
    let inputs: Vec<Option<Vec<f64>>> = s.inputs.iter_mut().map(Option::take).collect();
    let out = match error {
        Some(e) => Err(e),
        None => {
            let inputs: Vec<Vec<f64>> = inputs.into_iter().map(Option::unwrap).collect();
            Ok(match op {
                // Rank order, one rank at a time: the same bits on every rank and every run; f32
                // collectives add in f32 (values travel as f64, which holds every f32 exactly).
                Op::AllReduce | Op::ReduceScatter => {
                    let mut acc: Vec<f32> = inputs[0].iter().map(|&x| x as f32).collect();
                    for x in &inputs[1..] {
                        acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b as f32);
                    }
                    acc.into_iter().map(f64::from).collect()
                }
                Op::AllReduce64 => {
                    let mut acc = inputs[0].clone();
                    for x in &inputs[1..] {
                        acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
                    }
                    acc
                }
                Op::AllGather => inputs.concat(),
                Op::Broadcast(root) => inputs[root].clone(),
            })
        }
    };
    s.results.insert(s.started, (Arc::new(out), s.size));
    s.started += 1;
}

/// Collective `n`'s result, if done (the last of the ranks to read it drops it).
fn read_result(s: &mut Shared, n: u64) -> Option<Outcome> {
    let (r, left) = s.results.get_mut(&n)?;
    let r = r.clone();
    *left -= 1;
    if *left == 0 {
        s.results.remove(&n);
    }
    Some(r)
}

/// Waits for the group to move on, or fails at the deadline naming the ranks that have not
/// reached the collective being gathered.
fn wait<'a>(
    cv: &Condvar,
    s: MutexGuard<'a, Shared>,
    deadline: Instant,
    rank: usize,
) -> Result<MutexGuard<'a, Shared>> {
    let now = Instant::now();
    if now >= deadline {
        let missing: Vec<usize> = (0..s.size).filter(|&i| s.inputs[i].is_none()).collect();
        bail!(
            "collective {}: rank {rank} waited {:.0} s for ranks {missing:?} (a rank died, or called other collectives)",
            s.started,
            s.timeout.as_secs_f64()
        );
    }
    Ok(cv.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0)
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).size
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let r = self.exchange(Op::AllReduce, wide(buf))?;
        narrow(result(&r)?, buf);
        Ok(())
    }

    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        let r = self.exchange(Op::AllReduce64, buf.to_vec())?;
        buf.copy_from_slice(result(&r)?);
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], out: &mut [f32]) -> Result<()> {
        ensure!(
            input.len() == self.size() * out.len(),
            "reduce-scatter of {} elements into {} × {}",
            input.len(),
            self.size(),
            out.len()
        );
        let r = self.exchange(Op::ReduceScatter, wide(input))?;
        let k = out.len();
        narrow(&result(&r)?[self.rank * k..(self.rank + 1) * k], out);
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == self.size() * input.len(),
            "all-gather of {} elements into {}",
            input.len(),
            out.len()
        );
        let r = self.exchange(Op::AllGather, wide(input))?;
        narrow(result(&r)?, out);
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root < self.size(), "broadcast from rank {root} of {}", self.size());
        let r = self.exchange(Op::Broadcast(root), wide(buf))?;
        narrow(result(&r)?, buf);
        Ok(())
    }
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// f64 values that are f32s (an f32 collective's result) back into `out`.
fn narrow(x: &[f64], out: &mut [f32]) {
    out.iter_mut().zip(x).for_each(|(o, &v)| *o = v as f32);
}

fn result(r: &Outcome) -> Result<&[f64]> {
    let r: &Result<Vec<f64>, String> = r;
    match r {
        Ok(v) => Ok(v),
        Err(e) => bail!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a group of `size` threads; the ranks' results in rank order.
    fn on_ranks<T: Send>(size: usize, timeout_ms: u64, f: impl Fn(ThreadGroup) -> T + Sync) -> Vec<T> {
        let group = ThreadGroup::new(size, Duration::from_millis(timeout_ms));
        std::thread::scope(|sc| {
            let hs: Vec<_> = group.into_iter().map(|g| sc.spawn(|| f(g))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_have_nccls_semantics() {
        let out = on_ranks(4, 10_000, |mut g| {
            let r = g.rank() as f32;
            let mut a = vec![r, 10.0 * r, 0.5];
            g.all_reduce_sum(&mut a).unwrap();
            let input: Vec<f32> = (0..8).map(|i| r + i as f32).collect();
            let mut chunk = vec![0.0; 2];
            g.reduce_scatter_sum(&input, &mut chunk).unwrap();
            let mut all = vec![0.0; 8];
            g.all_gather(&[r, -r], &mut all).unwrap();
            let mut b = vec![r; 3];
            g.broadcast(&mut b, 2).unwrap();
            (a, chunk, all, b)
        });
        for (rank, (a, chunk, all, b)) in out.into_iter().enumerate() {
            assert_eq!(a, vec![6.0, 60.0, 2.0]);
            // Element i of the sum is Σ_r (r + i) = 6 + 4i; rank k holds elements 2k, 2k + 1.
            let k = rank as f32;
            assert_eq!(chunk, vec![6.0 + 8.0 * k, 10.0 + 8.0 * k]);
            assert_eq!(all, vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]);
            assert_eq!(b, vec![2.0; 3]);
        }
    }

    #[test]
    fn sums_are_the_same_bits_on_every_rank_and_in_rank_order() {
        let vals = [1e8f32, 1.0, -1e8, 1.0];
        let out = on_ranks(4, 10_000, |mut g| {
            let mut x = vec![vals[g.rank()]];
            g.all_reduce_sum(&mut x).unwrap();
            x[0]
        });
        let want = ((vals[0] + vals[1]) + vals[2]) + vals[3];
        assert!(out.iter().all(|&x| x.to_bits() == want.to_bits()), "{out:?} vs {want}");
        // In f64 the same four values sum exactly: 2.
        let out = on_ranks(4, 10_000, |mut g| {
            let mut x = vec![vals[g.rank()] as f64];
            g.all_reduce_sum_f64(&mut x).unwrap();
            x[0]
        });
        assert!(out.iter().all(|&x| x == 2.0), "{out:?}");
    }

    #[test]
    fn a_missing_rank_is_a_timeout_naming_it() {
        let out = on_ranks(3, 300, |mut g| {
            if g.rank() == 1 {
                return Ok(());
            }
            g.all_reduce_sum(&mut [1.0]).map(|_| ())
        });
        for r in [&out[0], &out[2]] {
            let e = format!("{:#}", r.as_ref().unwrap_err());
            assert!(e.contains("ranks [1]"), "{e}");
        }
    }

    #[test]
    fn different_collectives_fail_on_every_rank() {
        let out = on_ranks(2, 10_000, |mut g| {
            if g.rank() == 0 {
                g.all_reduce_sum(&mut [1.0, 2.0])
            } else {
                g.all_reduce_sum(&mut [1.0])
            }
        });
        for r in out {
            assert!(format!("{:#}", r.unwrap_err()).contains("must call the same collectives"));
        }
    }
}
