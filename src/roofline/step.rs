//! Projected time of one whole GRPO step (rollout, reference pass, update) on a GPU, from the
//! roofline of the work and the host-side counts of the decode loop. Nothing here is measured:
//! each phase takes the larger of its device time at peak (bytes / bandwidth, FLOPs / tensor
//! throughput) and the host time its driver calls need (launches, synchronisations, device→host
//! copies), because a decode step whose launches take longer than its kernels leaves the GPU
//! idle. The host counts are emu's (`--counters`): the per-op decode loop (the code before the
//! batched step), and the batched decode step with the device sampler that `generate` and `train` use. Printed by `fcgpu kernels roofline --grpo`.

use anyhow::{Context, Result};

/// A GPU's peaks and the host costs of driving it.
#[derive(Clone, Copy, Debug)]
pub struct Gpu {
    pub name: &'static str,
    /// HBM bandwidth, bytes/s.
    pub bw: f64,
    /// Dense bf16 tensor-core throughput, FLOP/s.
    pub flops: f64,
    /// Device memory, bytes.
    pub mem: f64,
}

/// H100 SXM: 3.35 TB/s HBM3, 989 dense bf16 TFLOP/s, 80 GB.
pub const H100: Gpu = Gpu { name: "H100 SXM", bw: 3.35e12, flops: 989e12, mem: 80e9 };
/// H200: 4.8 TB/s HBM3e, the H100's tensor cores, 141 GB.
pub const H200: Gpu = Gpu { name: "H200", bw: 4.8e12, flops: 989e12, mem: 141e9 };

/// Host cost of one kernel launch (a cuLaunchKernel call on the host, outside a CUDA graph).
pub const LAUNCH_S: f64 = 4e-6;
/// Host cost of one stream synchronisation (the round trip, with the GPU idle until the host
/// launches again).
pub const SYNC_S: f64 = 10e-6;
/// Effective device→host bandwidth for small pageable copies over PCIe 5, bytes/s.
pub const D2H_BW: f64 = 20e9;

/// The decoder shapes that set bytes and FLOPs.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub name: &'static str,
    pub layers: f64,
    pub hidden: f64,
    pub heads: f64,
    pub kv_heads: f64,
    pub head_dim: f64,
    pub intermediate: f64,
    pub vocab: f64,
    pub params: f64,
    /// The LM head is the embedding matrix (read once per forward, not twice).
    pub tied: bool,
    /// The model's config.json (configs/models/): the memory column is its `fcgpu plan`.
    pub config: &'static str,
}

impl Model {
    pub fn qwen25_1_5b() -> Model {
        Model {
            name: "Qwen2.5-1.5B",
            layers: 28.0,
            hidden: 1536.0,
            heads: 12.0,
            kv_heads: 2.0,
            head_dim: 128.0,
            intermediate: 8960.0,
            vocab: 151936.0,
            params: 1.54e9,
            tied: true,
            config: include_str!("../../configs/models/qwen2.5-1.5b.json"),
        }
    }

    pub fn smollm2_135m() -> Model {
        Model {
            name: "SmolLM2-135M",
            layers: 30.0,
            hidden: 576.0,
            heads: 9.0,
            kv_heads: 3.0,
            head_dim: 64.0,
            intermediate: 1536.0,
            vocab: 49152.0,
            params: 1.34515e8,
            tied: true,
            config: include_str!("../../configs/models/smollm2-135m.json"),
        }
    }

    pub fn qwen25_7b() -> Model {
        Model {
            name: "Qwen2.5-7B",
            layers: 28.0,
            hidden: 3584.0,
            heads: 28.0,
            kv_heads: 4.0,
            head_dim: 128.0,
            intermediate: 18944.0,
            vocab: 152064.0,
            params: 7.62e9,
            tied: false,
            config: include_str!("../../configs/models/qwen2.5-7b.json"),
        }
    }

    /// Parameters a token's forward multiplies with: all but an untied embedding table, which
    /// is only gathered from.
    fn matmul_params(&self) -> f64 {
        self.body_params() + self.vocab * self.hidden
    }

    /// Parameters of the layers and the final norm: all but the embedding and LM-head matrices.
    fn body_params(&self) -> f64 {
        self.params - if self.tied { 1.0 } else { 2.0 } * self.vocab * self.hidden
    }

    /// K and V bytes (bf16) of one cached token over all layers.
    pub(crate) fn kv_bytes_per_token(&self) -> f64 {
        self.layers * 2.0 * self.kv_heads * self.head_dim * 2.0
    }
}

/// One GRPO step's shape.
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    pub prompts: f64,
    pub group: f64,
    pub prompt_len: f64,
    pub completion_len: f64,
    pub ppo_epochs: f64,
    /// A frozen reference model for the KL term (`beta` > 0).
    pub reference: bool,
}

impl Recipe {
    /// A FunRL-sized step: 32 prompts × 8 samples, 512-token prompts, 256 new tokens.
    pub fn funrl() -> Recipe {
        Recipe {
            prompts: 32.0,
            group: 8.0,
            prompt_len: 512.0,
            completion_len: 256.0,
            ppo_epochs: 1.0,
            reference: true,
        }
    }

    fn seqs(&self) -> f64 {
        self.prompts * self.group
    }
}

/// What one decode step asks of the host, as a function of layers and batch.
#[derive(Clone, Copy, Debug)]
pub struct DecodeCounts {
    pub name: &'static str,
    pub launches_per_layer: f64,
    pub launches_per_layer_per_seq: f64,
    pub launches_fixed: f64,
    pub syncs: f64,
    /// Device→host bytes per sequence and vocabulary entry (the logits, when the host samples).
    pub d2h_per_seq_vocab: f64,
    pub d2h_per_seq: f64,
}

impl DecodeCounts {
    /// The per-op decode loop (the code before the batched step), fitted
    /// to the emu counters of `fcgpu generate --counters` on 2- and 4-layer models at batch 1, 4
    /// and 8 (exact fit): launches = layers × (18 + 3 × batch) + 4 (two KV copies and
    /// one attention launch per sequence and layer), 6 synchronisations, and the bf16 logits
    /// downloaded for host sampling.
    pub fn per_op() -> DecodeCounts {
        DecodeCounts {
            name: "per-op",
            launches_per_layer: 18.0,
            launches_per_layer_per_seq: 3.0,
            launches_fixed: 4.0,
            syncs: 6.0,
            d2h_per_seq_vocab: 2.0,
            d2h_per_seq: 0.0,
        }
    }

    /// The batched decode step with the device sampler, counted on emu on 2- and 4-layer models
    /// at batch 4 and 32 (a steady step): 12 launches per layer + 4 whatever the batch, one
    /// synchronisation, 12 bytes per sequence back (id, log-prob, entropy). Issue 14's budget
    /// (≤ 12 per layer + 16, ≤ 16 bytes) holds with room.
    pub fn batched() -> DecodeCounts {
        DecodeCounts {
            name: "batched",
            launches_per_layer: 12.0,
            launches_per_layer_per_seq: 0.0,
            launches_fixed: 4.0,
            syncs: 1.0,
            d2h_per_seq_vocab: 0.0,
            d2h_per_seq: 12.0,
        }
    }

    pub(crate) fn host_seconds(&self, m: &Model, batch: f64) -> f64 {
        let launches = m.layers * (self.launches_per_layer + self.launches_per_layer_per_seq * batch)
            + self.launches_fixed;
        let d2h = batch * (self.d2h_per_seq_vocab * m.vocab + self.d2h_per_seq);
        launches * LAUNCH_S + self.syncs * SYNC_S + d2h / D2H_BW
    }
}

/// Bytes and FLOPs of some work.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Work {
    pub(crate) bytes: f64,
    pub(crate) flops: f64,
}

impl Work {
    pub(crate) fn seconds(&self, g: &Gpu) -> f64 {
        (self.bytes / g.bw).max(self.flops / g.flops)
    }
}

/// A teacher-forced forward over `seqs` sequences of `len` tokens, with the LM head (and the
/// fused log-softmax) on `head_rows` of them.
pub(crate) fn forward(m: &Model, seqs: f64, len: f64, head_rows: f64) -> Work {
    let t = seqs * len;
    let body = m.body_params();
    let attn = m.layers * seqs * m.heads * 2.0 * len * len * m.head_dim;
    // Activations each layer reads and writes (norms, q/k/v/o, MLP, residuals), bf16.
    let act = t * m.layers * (12.0 * m.hidden + 4.0 * m.intermediate) * 2.0;
    let head = Work {
        bytes: 2.0 * m.vocab * m.hidden + 2.0 * head_rows * m.vocab,
        flops: 2.0 * head_rows * m.vocab * m.hidden,
    };
    Work { bytes: 2.0 * body + act + head.bytes, flops: 2.0 * body * t + attn + head.flops }
}

/// One decode step at `batch` sequences with `ctx` cached tokens each.
pub(crate) fn decode_step(m: &Model, batch: f64, ctx: f64) -> Work {
    let weights = 2.0 * m.matmul_params();
    let kv = batch * ctx * m.kv_bytes_per_token();
    let attn = 4.0 * batch * ctx * m.heads * m.head_dim * m.layers;
    // The sampler reads the logits a few times (max, sum, the top-p cut).
    let sample = 8.0 * batch * m.vocab;
    Work { bytes: weights + kv + sample, flops: 2.0 * batch * m.matmul_params() + attn }
}

/// AdamW over f32 master weights and moments with bf16 gradients, the bf16 copy of the new
/// weights, and the gradient norm (the roofline's adamw, cast and sum-of-squares rows).
fn optimizer(m: &Model) -> Work {
    Work { bytes: 34.0 * m.params, flops: 17.0 * m.params }
}

/// Projected seconds of each phase of one step.
#[derive(Clone, Copy, Debug)]
pub struct Projection {
    pub prefill: f64,
    pub decode: f64,
    /// Of `decode`, the part that is host-bound (launch and copy time above device time).
    pub decode_host_excess: f64,
    pub reference: f64,
    pub update: f64,
}

impl Projection {
    pub fn total(&self) -> f64 {
        self.prefill + self.decode + self.reference + self.update
    }
}

/// Update micro-batch of the memory column (the trainer's default).
const PLAN_MICRO_BATCH: usize = 8;

/// Peak device bytes of one full-training GRPO step of `r` for `m`: the memory plan
/// (`fcgpu plan`, run on the meta device), with `fcgpu train`'s default micro-batch, no
/// checkpointing, and with a reference copy when `r` has one.
pub fn plan_peak(m: &Model, r: &Recipe) -> Result<u64> {
    use crate::plan::{measure, Source, Spec};
    let raw = serde_json::from_str(m.config).with_context(|| format!("{}'s config", m.name))?;
    let config = crate::model::ModelConfig::from_json(raw, std::path::Path::new("config.json"))?;
    let spec = Spec {
        config,
        checkpoint: false,
        lora: None,
        sft_batch: 1,
        sft_len: 2,
        grad_accum: 1,
        prompts: r.prompts as usize,
        group: r.group as usize,
        prompt_len: r.prompt_len as usize,
        new_tokens: r.completion_len as usize,
        micro_batch: PLAN_MICRO_BATCH,
        ppo_epochs: r.ppo_epochs as usize,
        beta: if r.reference { 0.04 } else { 0.0 },
    };
    Ok(measure(&spec, crate::tensor::Device::Meta, Source::Meta)?.grpo().total())
}

/// Whether `bytes` fit `g` with the plan's allowance for the CUDA context.
pub fn fits(bytes: u64, g: &Gpu) -> bool {
    bytes <= crate::plan::cli::usable(g.mem as u64)
}

/// Host time of the prefill, which runs op by op once per prompt (emu: 22 launches per layer + 7
/// and one synchronisation for a prompt, on 2- and 4-layer models), and of the first decode
/// step's copies of each prompt's cache to its samples (2 launches per layer + 2 a sample).
fn prefill_host_seconds(m: &Model, r: &Recipe) -> f64 {
    let per_prompt = prompt_host_seconds(m);
    r.prompts * per_prompt + r.seqs() * (2.0 * m.layers + 2.0) * LAUNCH_S
}

/// Host time of one prompt's op-by-op prefill.
pub(crate) fn prompt_host_seconds(m: &Model) -> f64 {
    (22.0 * m.layers + 7.0) * LAUNCH_S + SYNC_S
}

/// Project one GRPO step of `r` for `m` on `g` with the decode loop's host counts `c`.
pub fn project(m: &Model, g: &Gpu, r: &Recipe, c: &DecodeCounts) -> Projection {
    let b = r.seqs();
    let prefill = forward(m, b, r.prompt_len, b).seconds(g).max(prefill_host_seconds(m, r));
    let (mut decode, mut excess) = (0.0, 0.0);
    for i in 0..r.completion_len as usize {
        let dev = decode_step(m, b, r.prompt_len + i as f64).seconds(g);
        let host = c.host_seconds(m, b);
        decode += dev.max(host);
        excess += (host - dev).max(0.0);
    }
    let len = r.prompt_len + r.completion_len;
    let fwd = forward(m, b, len, b * r.completion_len);
    let reference = if r.reference { fwd.seconds(g) } else { 0.0 };
    // Backward: twice the forward's FLOPs, and the activations read back with gradients written.
    let fwd_bwd = Work { bytes: 3.0 * fwd.bytes + 2.0 * m.params, flops: 3.0 * fwd.flops };
    let update = r.ppo_epochs * (fwd_bwd.seconds(g) + optimizer(m).seconds(g));
    Projection { prefill, decode, decode_host_excess: excess, reference, update }
}

fn ms(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.1} s")
    } else if x >= 1.0 {
        format!("{x:.2} s")
    } else {
        format!("{:.0} ms", x * 1e3)
    }
}

/// The Markdown table printed by `fcgpu kernels roofline --grpo`.
pub fn markdown() -> Result<String> {
    let r = Recipe::funrl();
    let mut out = String::from("# Projected GRPO step time\n\n");
    out.push_str(&format!(
        "Generated by `fcgpu kernels roofline --grpo`; projected, not measured. One step: {} prompts × {} samples, \
         {}-token prompts, {} new tokens, {} PPO epoch, a frozen reference model. Each phase at the roofline \
         (bytes at peak HBM bandwidth, FLOPs at 989 dense bf16 TFLOP/s); each decode step takes the larger of \
         that and its host time: {:.0} µs per launch, {:.0} µs per synchronisation, device→host copies at \
         {:.0} GB/s. `per-op` is the per-op decode loop's count on emu (layers × (18 + 3 × batch) + 4 launches, \
         6 synchronisations, the bf16 logits downloaded); `batched` is the batched decode step with the device \
         sampler (12 launches per layer + 4, 1 synchronisation, 12 bytes per sequence). Memory is the step's peak by \
         the memory plan (`fcgpu plan`: full training, micro-batch {PLAN_MICRO_BATCH}, no checkpointing); it fits when \
         it is within the GPU's memory less {} GB for the CUDA context.\n\n",
        r.prompts,
        r.group,
        r.prompt_len,
        r.completion_len,
        r.ppo_epochs,
        LAUNCH_S * 1e6,
        SYNC_S * 1e6,
        D2H_BW / 1e9,
        crate::plan::cli::CONTEXT_ALLOWANCE / crate::plan::GB
    ));
    out.push_str(
        "| model | GPU | decode loop | prefill | decode (host-bound part) | reference | update | step | memory (plan) | fits |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for m in [Model::qwen25_1_5b(), Model::qwen25_7b()] {
        let peak = plan_peak(&m, &r)?;
        for g in [H100, H200] {
            for c in [DecodeCounts::per_op(), DecodeCounts::batched()] {
                let p = project(&m, &g, &r, &c);
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {:.1} GB | {} |\n",
                    m.name,
                    g.name,
                    c.name,
                    ms(p.prefill),
                    ms(p.decode),
                    ms(p.decode_host_excess),
                    ms(p.reference),
                    ms(p.update),
                    ms(p.total()),
                    peak as f64 / 1e9,
                    if fits(peak, &g) { "yes" } else { "no" }
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_op_loop_is_host_bound_and_the_batched_step_is_not() {
        let (m, r) = (Model::qwen25_7b(), Recipe::funrl());
        let per_op = project(&m, &H200, &r, &DecodeCounts::per_op());
        let batched = project(&m, &H200, &r, &DecodeCounts::batched());
        // 28 × (18 + 3 × 256) + 4 launches at 4 µs ≈ 88 ms a step against a few ms of HBM time.
        assert!(per_op.decode_host_excess > 0.5 * per_op.decode, "{per_op:?}");
        assert!(batched.decode_host_excess < 0.05 * batched.decode, "{batched:?}");
        assert!(batched.decode < per_op.decode / 5.0);
    }

    #[test]
    fn decode_step_reads_every_weight_once_and_the_kv_cache() {
        let m = Model::qwen25_7b();
        let w = decode_step(&m, 1.0, 0.0);
        assert!((w.bytes - 2.0 * (m.params - m.vocab * m.hidden) - 8.0 * m.vocab).abs() < 1.0);
        let kv = decode_step(&m, 2.0, 100.0).bytes - decode_step(&m, 2.0, 0.0).bytes;
        assert_eq!(kv, 2.0 * 100.0 * 28.0 * 2.0 * 4.0 * 128.0 * 2.0);
    }

    #[test]
    fn seven_b_full_training_does_not_fit_an_h100() {
        let r = Recipe::funrl();
        let (big, small) =
            (plan_peak(&Model::qwen25_7b(), &r).unwrap(), plan_peak(&Model::qwen25_1_5b(), &r).unwrap());
        assert!(!fits(big, &H100) && !fits(big, &H200));
        assert!(fits(small, &H100));
        // Above the lower bound the roofline used to print: the weights, master weights,
        // moments, gradients and reference alone (18 bytes a parameter).
        assert!(big as f64 > 18.0 * Model::qwen25_7b().params);
    }

    #[test]
    fn readme_has_the_current_table() {
        // The table lives in docs/devices.md (the README links to it).
        let readme = include_str!("../../docs/devices.md");
        for line in markdown().unwrap().lines().filter(|l| l.starts_with('|')) {
            assert!(
                readme.contains(line),
                "docs/devices.md lacks `{line}`: paste `fcgpu kernels roofline --grpo`'s table"
            );
        }
    }

    #[test]
    fn faster_memory_never_makes_a_step_slower() {
        for m in [Model::qwen25_1_5b(), Model::qwen25_7b()] {
            for c in [DecodeCounts::per_op(), DecodeCounts::batched()] {
                let r = Recipe::funrl();
                assert!(project(&m, &H200, &r, &c).total() <= project(&m, &H100, &r, &c).total());
            }
        }
    }
}
