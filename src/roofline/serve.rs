//! Projected `fcgpu serve` throughput and time to first token on a GPU, from the roofline of
//! the work and the host counts of the decode loop (as [`super::step`] projects GRPO steps).
//! Nothing here is measured on a GPU: each decode step takes the larger of its device time at
//! peak and its host time (launches, synchronisations, the logits' download, and the host
//! sampler, whose cost per vocabulary entry is measured on the cpu). Printed by
//! `fcgpu kernels roofline --serve`.
//!
//! The workload is `tools/bench_serve.py`'s: every request has the same long system prompt
//! (function schemas) and its own short question, streams `new` tokens, and `clients` clients
//! send requests back to back (a closed loop). At steady state every client has a request in
//! the batch: a decode step serves `clients` samples, and each request adds one prefill.

use super::step::{decode_step, forward, prompt_host_seconds, DecodeCounts, Gpu, Model, Work, SYNC_S};

/// The host sampler's cost per vocabulary entry and sample (a softmax over the logits at
/// T = 1 with the log-probability and entropy: 295 µs for 49,152 entries on this project's
/// 2-core cpu, `rollout::sampler::sample`).
pub const SAMPLE_S_PER_ENTRY: f64 = 6e-9;
/// Host cores the sampler spreads over when it runs in parallel (a 16-core GPU node).
pub const HOST_CORES: f64 = 16.0;

/// One serve workload.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Prompt tokens, of which `shared` start every prompt the same way.
    pub prompt: f64,
    pub shared: f64,
    pub new: f64,
}

impl Workload {
    /// `tools/bench_serve.py`'s requests: 1,064 prompt tokens, 1,030 of them the system prompt.
    pub fn bench() -> Workload {
        Workload { prompt: 1064.0, shared: 1030.0, new: 32.0 }
    }
}

/// How a server version runs: its decode loop's host counts, whether the host sampler runs in
/// parallel, and whether a prompt's shared start comes from a prefix cache.
#[derive(Clone, Copy, Debug)]
pub struct Server {
    pub name: &'static str,
    pub counts: DecodeCounts,
    pub parallel_sampling: bool,
    pub prefix_cache: bool,
}

impl Server {
    /// Before issue 30: the per-op decode loop, the host sampler one sample after another, every
    /// prompt prefilled whole.
    pub fn before() -> Server {
        Server {
            name: "per-op loop",
            counts: DecodeCounts::per_op(),
            parallel_sampling: false,
            prefix_cache: false,
        }
    }

    /// Now: the batched decode step with the logits downloaded (bf16) for the requests' own
    /// samplers, sampling in parallel, and the prefix cache.
    pub fn now() -> Server {
        let counts = DecodeCounts {
            name: "batched, host sampler",
            d2h_per_seq_vocab: 2.0,
            d2h_per_seq: 0.0,
            ..DecodeCounts::batched()
        };
        Server { name: "batched step + prefix cache", counts, parallel_sampling: true, prefix_cache: true }
    }
}

/// Projected figures at one concurrency.
#[derive(Clone, Copy, Debug)]
pub struct ServeProjection {
    pub requests_per_s: f64,
    pub ttft_s: f64,
    pub step_s: f64,
    /// The decode step's host time exceeds its device time.
    pub host_bound: bool,
}

fn sampling_seconds(m: &Model, s: &Server, batch: f64) -> f64 {
    let cores = if s.parallel_sampling { HOST_CORES.min(batch) } else { 1.0 };
    batch * m.vocab * SAMPLE_S_PER_ENTRY / cores
}

/// One request's prefill: the tokens after the cached start, each attending to the whole prompt.
fn prefill_seconds(m: &Model, g: &Gpu, s: &Server, w: &Workload) -> f64 {
    let (cached, tokens) = if s.prefix_cache { (w.shared, w.prompt - w.shared) } else { (0.0, w.prompt) };
    let f = forward(m, 1.0, tokens, 1.0);
    // Reading the cached keys and values once per new token (the paged kernel's entry per token).
    let kv = Work { bytes: tokens * cached * m.kv_bytes_per_token(), flops: 0.0 };
    (f.seconds(g) + kv.seconds(g)).max(prompt_host_seconds(m) + SYNC_S)
}

/// Serve at `clients` concurrent clients.
pub fn project(m: &Model, g: &Gpu, s: &Server, w: &Workload, clients: f64) -> ServeProjection {
    let ctx = w.prompt + w.new / 2.0;
    let dev = decode_step(m, clients, ctx).seconds(g);
    let host = s.counts.host_seconds(m, clients) + sampling_seconds(m, s, clients);
    let step = dev.max(host);
    let prefill = prefill_seconds(m, g, s, w);
    // Per cycle every client's request decodes `new` tokens and is prefilled once.
    let cycle = w.new * step + clients * prefill;
    ServeProjection {
        requests_per_s: clients / cycle,
        ttft_s: prefill + step,
        step_s: step,
        host_bound: host > dev,
    }
}

fn ms(x: f64) -> String {
    if x >= 1.0 {
        format!("{x:.2} s")
    } else if x >= 0.01 {
        format!("{:.0} ms", x * 1e3)
    } else {
        format!("{:.2} ms", x * 1e3)
    }
}

/// The Markdown table printed by `fcgpu kernels roofline --serve`.
pub fn markdown(g: &Gpu) -> String {
    let (m, w) = (Model::smollm2_135m(), Workload::bench());
    let mut out = format!(
        "# Projected `fcgpu serve` on an {}\n\nGenerated by `fcgpu kernels roofline --serve`; projected, not measured. {}, bf16; \
         every request {} prompt tokens ({} of them a shared system prompt) and {} new tokens, clients sending back to back. \
         A decode step takes the larger of its device time at peak and its host time (launches, synchronisations, the bf16 \
         logits' download, the host sampler at {:.0} ns per vocabulary entry and sample, measured on the cpu, over {} cores \
         when parallel); each request adds one prefill.\n\n",
        g.name, m.name, w.prompt, w.shared, w.new, SAMPLE_S_PER_ENTRY * 1e9, HOST_CORES
    );
    out.push_str("| server | clients | requests/s | time to first token | decode step | bound |\n|---|---:|---:|---:|---:|---|\n");
    for s in [Server::before(), Server::now()] {
        for c in [1.0, 8.0, 64.0] {
            let p = project(&m, g, &s, &w, c);
            out.push_str(&format!(
                "| {} | {c} | {:.1} | {} | {} | {} |\n",
                s.name,
                p.requests_per_s,
                ms(p.ttft_s),
                ms(p.step_s),
                if p.host_bound { "host" } else { "device" }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roofline::step::H100;

    #[test]
    fn the_batched_step_and_prefix_cache_project_faster() {
        let (m, w) = (Model::smollm2_135m(), Workload::bench());
        for c in [1.0, 8.0, 64.0] {
            let (a, b) =
                (project(&m, &H100, &Server::before(), &w, c), project(&m, &H100, &Server::now(), &w, c));
            assert!(b.requests_per_s > a.requests_per_s && b.ttft_s < a.ttft_s, "{c}: {a:?} vs {b:?}");
        }
        // More clients share each step: more requests per second.
        let s = Server::now();
        assert!(
            project(&m, &H100, &s, &w, 64.0).requests_per_s > project(&m, &H100, &s, &w, 8.0).requests_per_s
        );
    }
}
