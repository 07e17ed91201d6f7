//! The sampler on a GPU device: each step's draws in one launch (`draw_rows`, kernels/sample.cu)
//! over the logits where they are, and only the token, its log-probability and the entropy of
//! each sample (12 bytes) come back, in one download.
//!
//! Seeds: the uniform of each draw is a counter-based hash (Philox-4x32-10) of (seed, prompt
//! index, sample index, token index), so a sample's tokens depend neither on the batch size nor
//! on which prompts share its steps, and no generator state is carried between steps. These
//! streams are not the host sampler's ChaCha8 streams: the same seed draws other tokens with
//! `--host-sampler` (which matches the CPU).

use anyhow::{ensure, Result};

use crate::backend::{GpuBuffer, GpuDevice};
use crate::dtype::DType;
use crate::kernels::decode_step::{draw_rows, DrawIo, DrawParams};

use super::sampler::{Draw, SamplerParams};

/// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): ten
/// rounds of two 32×32→64 multiplies with key bumps, a bijection of the counter for each key.
pub fn philox4x32(key: [u32; 2], ctr: [u32; 4]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut k, mut c) = (key, ctr);
    for _ in 0..10 {
        let (p0, p1) = (M0 * c[0] as u64, M1 * c[2] as u64);
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// The uniform in [0, 1) of token `step` of sample `sample` of prompt `prompt` (24 random bits:
/// every f32 step of [0, 1) at that resolution is exact).
pub fn device_uniform(seed: u64, prompt: usize, sample: usize, step: usize) -> f32 {
    let x = philox4x32([seed as u32, (seed >> 32) as u32], [prompt as u32, sample as u32, step as u32, 0]);
    (x[0] >> 8) as f32 / (1u32 << 24) as f32
}

/// One draw: the sample's row of logits and its uniform.
#[derive(Clone, Copy, Debug)]
pub struct DrawJob {
    pub row: usize,
    pub u: f32,
}

/// Device buffers of the sampler, grown (allocated) only when a step has more samples than any
/// before: the jobs (rows, uniforms) and the results (tokens, log-probs, entropies).
pub struct DeviceSampler {
    dev: GpuDevice,
    cap: usize,
    jobs: GpuBuffer,
    out: GpuBuffer,
    host: Vec<u8>,
}

impl DeviceSampler {
    pub fn new(dev: &GpuDevice, cap: usize) -> Result<DeviceSampler> {
        let cap = cap.max(1);
        Ok(DeviceSampler {
            jobs: dev.alloc(8 * cap)?,
            out: dev.alloc(12 * cap)?,
            dev: dev.clone(),
            cap,
            host: Vec::new(),
        })
    }

    /// Draws every job from `logits` (`[rows, vocab]` of `dtype`, rows up to `rows`): one upload
    /// of the jobs, one launch, one download of 12 bytes per job.
    pub fn draw(
        &mut self,
        logits: &GpuBuffer,
        dtype: DType,
        rows: usize,
        vocab: usize,
        p: &SamplerParams,
        jobs: &[DrawJob],
    ) -> Result<Vec<Draw>> {
        let n = jobs.len();
        ensure!(
            logits.bytes() >= rows * vocab * dtype.size(),
            "device sampler: logits smaller than {rows} rows"
        );
        ensure!(jobs.iter().all(|j| j.row < rows), "device sampler: a job reads past row {rows}");
        if n > self.cap {
            *self = DeviceSampler::new(&self.dev, n.max(2 * self.cap))?;
        }
        self.host.clear();
        self.host.extend(jobs.iter().flat_map(|j| (j.row as i32).to_le_bytes()));
        self.host.extend(jobs.iter().flat_map(|j| j.u.to_le_bytes()));
        self.jobs.write_at(0, &self.host)?;
        let (j, o) = (self.jobs.ptr(), self.out.ptr());
        let io = DrawIo {
            rows: j,
            u: j + 4 * n as u64,
            tokens: o,
            logp: o + 4 * n as u64,
            entropy: o + 8 * n as u64,
            samples: n,
        };
        let dp = DrawParams { temperature: p.temperature, top_p: p.top_p, top_k: p.top_k };
        // SAFETY: the logits hold `rows` rows (checked), every job's row is below `rows`, and
        // the job and output buffers hold at least `n` entries of each section.
        unsafe { draw_rows(&self.dev, dtype, logits.ptr(), vocab, vocab, &dp, &io)? };
        let mut back = vec![0u8; 12 * n];
        // SAFETY: the first 12·n bytes of `out` (n ≤ cap).
        unsafe { self.dev.dtoh(o, &mut back)? };
        let word = |sec: usize, i: usize| {
            let at = 4 * (sec * n + i);
            [back[at], back[at + 1], back[at + 2], back[at + 3]]
        };
        Ok((0..n)
            .map(|i| Draw {
                token: i32::from_le_bytes(word(0, i)) as u32,
                logprob: f32::from_le_bytes(word(1, i)),
                entropy: f32::from_le_bytes(word(2, i)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Random123's kat_vectors for philox4x32_10.
    #[test]
    fn philox_matches_the_reference_vectors() {
        assert_eq!(philox4x32([0, 0], [0, 0, 0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32([0xffffffff; 2], [0xffffffff; 4]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32([0xa4093822, 0x299f31d0], [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniforms_are_in_range_and_differ_by_stream() {
        let us: Vec<f32> = (0..1000).map(|i| device_uniform(7, i % 10, i / 10, 3)).collect();
        assert!(us.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = us.iter().sum::<f32>() / us.len() as f32;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
        assert_ne!(device_uniform(7, 0, 0, 0), device_uniform(7, 0, 0, 1));
        assert_ne!(device_uniform(7, 0, 0, 0), device_uniform(8, 0, 0, 0));
    }
}
