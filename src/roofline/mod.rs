//! Roofline model of every kernel at Qwen2.5-7B shapes: bytes moved and FLOPs per call, and the
//! time they imply at H100 SXM peak (3.35 TB/s HBM3, 989 dense bf16 TFLOP/s). Printed by
//! `fcgpu kernels roofline` (that output is `kernels/ROOFLINE.md`) and used by the benchmarks to
//! report the fraction of peak a measured time reaches. [`step`] projects whole GRPO steps.

pub mod serve;
pub mod step;

/// H100 SXM peak memory bandwidth, bytes/s.
pub const H100_BW: f64 = 3.35e12;
/// H100 SXM peak dense bf16 tensor-core throughput, FLOP/s.
pub const H100_FLOPS: f64 = 989e12;

/// Qwen2.5-7B shapes and the token budget of one call.
#[derive(Clone, Copy, Debug)]
pub struct Shapes {
    pub hidden: f64,
    pub heads: f64,
    pub kv_heads: f64,
    pub head_dim: f64,
    pub intermediate: f64,
    pub vocab: f64,
    pub params: f64,
    /// Packed tokens per forward/backward call.
    pub tokens: f64,
    /// Sequences they are packed from (attention cost grows with length²).
    pub seqs: f64,
    /// Decode: batch of sequences and cached context length.
    pub decode_batch: f64,
    pub decode_ctx: f64,
}

impl Shapes {
    pub fn qwen25_7b() -> Shapes {
        Shapes {
            hidden: 3584.0,
            heads: 28.0,
            kv_heads: 4.0,
            head_dim: 128.0,
            intermediate: 18944.0,
            vocab: 152064.0,
            params: 7.62e9,
            tokens: 4096.0,
            seqs: 4.0,
            decode_batch: 64.0,
            decode_ctx: 1024.0,
        }
    }
}

/// One kernel call: what it moves and computes.
#[derive(Clone, Debug)]
pub struct Row {
    pub kernel: &'static str,
    pub call: String,
    pub bytes: f64,
    pub flops: f64,
}

impl Row {
    /// Seconds at peak: the larger of the memory and compute times.
    pub fn time_at_peak(&self) -> f64 {
        (self.bytes / H100_BW).max(self.flops / H100_FLOPS)
    }
    pub fn bound(&self) -> &'static str {
        if self.bytes / H100_BW >= self.flops / H100_FLOPS {
            "memory"
        } else {
            "compute"
        }
    }
}

/// The table (bf16 storage: 2 bytes an element; f32 where the kernel keeps f32).
pub fn table(s: &Shapes) -> Vec<Row> {
    let (t, h, i, v) = (s.tokens, s.hidden, s.intermediate, s.vocab);
    let (hq, hkv, d) = (s.heads, s.kv_heads, s.head_dim);
    let l = t / s.seqs;
    let attn_fwd_flops = s.seqs * hq * 2.0 * l * l * d; // QKᵀ and PV, causal half each
    let qkv_bytes = (2.0 * hq + 2.0 * hkv) * t * d * 2.0; // q, o, k, v
    let n_rope = t * (hq + hkv) * d;
    let p = s.params;
    let row = |kernel: &'static str, call: String, bytes: f64, flops: f64| Row { kernel, call, bytes, flops };
    vec![
        row("embedding_fwd_bf16", format!("{t} tokens x {h}"), 4.0 * t * h + 4.0 * t, 0.0),
        row("embedding_bwd_bf16", format!("{t} tokens x {h}, f32 atomics"), 2.0 * t * h + 8.0 * t * h, t * h),
        row("rmsnorm_fwd_bf16", format!("{t} x {h}"), 4.0 * t * h + 2.0 * h + 4.0 * t, 4.0 * t * h),
        row("rmsnorm_bwd_dx + dw", format!("{t} x {h}"), 10.0 * t * h + 8.0 * t, 8.0 * t * h),
        row(
            "rope_bf16 (q and k)",
            format!("{t} x ({hq}+{hkv}) x {d}"),
            4.0 * n_rope + 4.0 * t * d,
            3.0 * n_rope,
        ),
        row(
            "fa_fwd_d128",
            format!("{} seqs x {l} tokens, {hq}/{hkv} heads", s.seqs),
            qkv_bytes + 4.0 * t * hq,
            attn_fwd_flops,
        ),
        row(
            "fa_bwd_d128 (+ dot, dq cast)",
            format!("{} seqs x {l} tokens", s.seqs),
            qkv_bytes
                + 2.0 * t * hq * d * 2.0
                + 2.0 * hkv * t * d * 2.0
                + 3.0 * t * hq * d * 4.0
                + 8.0 * t * hq,
            2.5 * attn_fwd_flops,
        ),
        row(
            "cuBLAS linear: q,k,v,o + gate,up,down",
            format!("{t} tokens, one layer"),
            2.0 * (4.0 * t * h + 2.0 * h * h + 2.0 * h * hkv * d + 3.0 * t * i + 3.0 * h * i),
            2.0 * t * (2.0 * h * h + 2.0 * h * hkv * d + 3.0 * h * i),
        ),
        row("ew_add_bf16 (residual)", format!("{t} x {h}"), 6.0 * t * h, t * h),
        row("swiglu_fwd_bf16", format!("{t} x {i}"), 6.0 * t * i, 6.0 * t * i),
        row("swiglu_bwd_bf16", format!("{t} x {i}"), 10.0 * t * i, 12.0 * t * i),
        row(
            "cuBLAS LM head (context)",
            format!("{t} x {h} x {v}"),
            2.0 * (t * h + v * h + t * v),
            2.0 * t * h * v,
        ),
        row("lpe_fwd_bf16", format!("{t} rows x {v} vocab"), 2.0 * t * v + 16.0 * t, 5.0 * t * v),
        row("lpe_bwd_bf16", format!("{t} rows x {v} vocab"), 4.0 * t * v + 24.0 * t, 8.0 * t * v),
        row(
            "sample_rows_bf16 (top_p < 1)",
            format!("batch {} x {v} vocab", s.decode_batch),
            43.0 * 2.0 * s.decode_batch * v,
            3.0 * 43.0 * s.decode_batch * v,
        ),
        row(
            "decode_attn_bf16",
            format!("batch {} x {} cached", s.decode_batch, s.decode_ctx),
            2.0 * s.decode_batch * s.decode_ctx * hkv * d * 2.0 + 4.0 * s.decode_batch * hq * d,
            4.0 * s.decode_batch * s.decode_ctx * hq * d,
        ),
        row("grpo_advantage", "512 groups x G=8".to_string(), 5.0 * 4096.0 * 4.0, 20.0 * 4096.0),
        row("pl_fwd + pl_finalize", format!("{t} tokens"), 20.0 * t, 22.0 * t),
        row("pl_bwd", format!("{t} tokens"), 28.0 * t, 22.0 * t),
        row("adamw_bf16grad", format!("{:.2e} params, bf16 copy", p), 26.0 * p, 15.0 * p),
        row("cast_f32_bf16", format!("{:.2e} params", p), 6.0 * p, 0.0),
        row("sumsq_partial_bf16 (grad norm)", format!("{:.2e} params", p), 2.0 * p, 2.0 * p),
    ]
}

fn human(x: f64, unit: &str) -> String {
    let (v, p) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.2} {p}{unit}")
}

fn secs(x: f64) -> String {
    if x >= 1e-3 {
        format!("{:.3} ms", x * 1e3)
    } else {
        format!("{:.2} µs", x * 1e6)
    }
}

/// The Markdown table of `kernels/ROOFLINE.md`.
pub fn markdown(s: &Shapes) -> String {
    let mut out = String::new();
    out.push_str("# Kernel roofline at Qwen2.5-7B shapes\n\n");
    out.push_str(&format!(
        "Generated by `fcgpu kernels roofline`. Shapes: hidden {}, {} heads / {} KV heads, head dim {}, \
         intermediate {}, vocab {}, {:.2e} parameters; {} packed tokens ({} sequences of {}); decode batch {} \
         with {} cached tokens. Per call (one layer where the op is per layer), bf16 storage, f32 \
         accumulation. Time at peak = max(bytes / 3.35 TB/s, FLOPs / 989 TFLOP/s) on an H100 SXM.\n\n",
        s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab, s.params, s.tokens, s.seqs, s.tokens / s.seqs,
        s.decode_batch, s.decode_ctx
    ));
    out.push_str("| kernel | call | bytes | FLOPs | FLOP/byte | bound | time at peak |\n|---|---|---:|---:|---:|---|---:|\n");
    for r in table(s) {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {:.1} | {} | {} |\n",
            r.kernel,
            r.call,
            human(r.bytes, "B"),
            human(r.flops, "FLOP"),
            if r.bytes > 0.0 { r.flops / r.bytes } else { 0.0 },
            r.bound(),
            secs(r.time_at_peak())
        ));
    }
    out.push_str("\nRidge point of the H100 SXM: 989e12 / 3.35e12 ≈ 295 FLOP/byte; everything but the attention forward and \
                  the LM-head GEMM is memory bound (the attention backward sits just under the ridge because of its \
                  f32 dQ accumulation), so those kernels are judged by GB/s (`cargo bench --bench kernels` \
                  prints the fraction of 3.35 TB/s or 989 TFLOP/s reached).\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_roofline_is_current() {
        let want = markdown(&Shapes::qwen25_7b());
        let have = include_str!("../../kernels/ROOFLINE.md");
        assert_eq!(
            have, want,
            "kernels/ROOFLINE.md is stale: regenerate with `fcgpu kernels roofline > kernels/ROOFLINE.md`"
        );
    }

    #[test]
    fn attention_is_compute_bound_and_norms_memory_bound() {
        let t = table(&Shapes::qwen25_7b());
        let get = |k: &str| t.iter().find(|r| r.kernel.starts_with(k)).unwrap().clone();
        assert_eq!(get("fa_fwd_d128").bound(), "compute");
        assert_eq!(get("rmsnorm_fwd").bound(), "memory");
        // 4 x 1024² x 128 x 2 x 28 causal FLOPs
        assert_eq!(get("fa_fwd_d128").flops, 4.0 * 2.0 * 1024.0 * 1024.0 * 128.0 * 28.0);
    }
}
