//! `fcgpu convert`: GGUF files written here (a tiny llama in every supported tensor type, and
//! hostile variants of it), and, when it is cached, the real SmolLM2 against transformers'
//! references (tests/fixtures/real/smollm2, made by tools/make_gguf_reference.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};

#[path = "common/real_model.rs"]
mod real_model;
use real_model::real_model_dir;

// ---- a GGUF writer and a tiny llama ----

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q5_0: u32 = 6;
const Q5_1: u32 = 7;
const Q8_0: u32 = 8;
const BF16: u32 = 30;

#[derive(Clone)]
enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    /// A value type id and its raw bytes, for lies.
    Raw(u32, Vec<u8>),
}

#[derive(Clone)]
struct T {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    offset: Option<u64>,
}

#[derive(Clone)]
struct Gguf {
    version: u32,
    kv: Vec<(String, Kv)>,
    tensors: Vec<T>,
    n_tensors: Option<u64>,
    n_kv: Option<u64>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

impl Gguf {
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend(self.n_tensors.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.unwrap_or(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            let (ty, body): (u32, Vec<u8>) = match v {
                Kv::U32(x) => (4, x.to_le_bytes().to_vec()),
                Kv::F32(x) => (6, x.to_le_bytes().to_vec()),
                Kv::Bool(x) => (7, vec![*x as u8]),
                Kv::Str(s) => {
                    let mut o = vec![];
                    put_str(&mut o, s);
                    (8, o)
                }
                Kv::Strs(v) => {
                    let mut o = 8u32.to_le_bytes().to_vec();
                    o.extend((v.len() as u64).to_le_bytes());
                    v.iter().for_each(|s| put_str(&mut o, s));
                    (9, o)
                }
                Kv::I32s(v) => {
                    let mut o = 5u32.to_le_bytes().to_vec();
                    o.extend((v.len() as u64).to_le_bytes());
                    v.iter().for_each(|x| o.extend(x.to_le_bytes()));
                    (9, o)
                }
                Kv::Raw(ty, bytes) => (*ty, bytes.clone()),
            };
            b.extend(ty.to_le_bytes());
            b.extend(body);
        }
        let mut offsets = vec![];
        let mut next = 0u64;
        for t in &self.tensors {
            offsets.push(t.offset.unwrap_or(next));
            next = (next + t.data.len() as u64).div_ceil(32) * 32;
        }
        for (t, off) in self.tensors.iter().zip(&offsets) {
            put_str(&mut b, &t.name);
            b.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(t.ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        let start = b.len();
        for (t, off) in self.tensors.iter().zip(&offsets) {
            if t.offset.is_none() {
                b.resize(start + *off as usize, 0);
                b.extend(&t.data);
            }
        }
        b
    }

    fn set(&mut self, key: &str, v: Kv) {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.kv.push((key.into(), v)),
        }
    }

    fn tensor(&mut self, name: &str) -> &mut T {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// (elements, bytes) per block of the test's types.
fn block(ty: u32) -> (usize, usize) {
    match ty {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q5_0 => (32, 22),
        Q5_1 => (32, 24),
        Q8_0 => (32, 34),
        _ => unreachable!(),
    }
}

/// One random row of `cols` values encoded as `ty`: scales small and positive, everything else
/// random bytes.
fn random_row(rng: &mut Rng, ty: u32, cols: usize) -> Vec<u8> {
    let (be, bs) = block(ty);
    let mut out = vec![];
    for _ in 0..cols / be {
        let small = |rng: &mut Rng| f16::from_f32(0.001 + 0.02 * rng.unit()).to_le_bytes();
        match ty {
            F32 => out.extend((rng.unit() * 0.2 - 0.1).to_le_bytes()),
            F16 => out.extend(f16::from_f32(rng.unit() * 0.2 - 0.1).to_le_bytes()),
            BF16 => out.extend(bf16::from_f32(rng.unit() * 0.2 - 0.1).to_le_bytes()),
            Q4_1 | Q5_1 => {
                out.extend(small(rng));
                out.extend(f16::from_f32(-0.1 * rng.unit()).to_le_bytes());
                out.extend(rng.bytes(bs - 4));
            }
            _ => {
                out.extend(small(rng));
                out.extend(rng.bytes(bs - 2));
            }
        }
    }
    out
}

/// Element `e` of an encoded row, decoded from the ggml block definitions one element at a
/// time (independently of the converter's block loops).
fn decode(ty: u32, row: &[u8], e: usize) -> f32 {
    let (be, bs) = block(ty);
    let b = &row[(e / be) * bs..(e / be + 1) * bs];
    let j = e % be;
    let h = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let nib = |qs: &[u8]| if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
    match ty {
        F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        F16 => h(0),
        BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Q4_0 => (nib(&b[2..]) as f32 - 8.0) * h(0),
        Q4_1 => nib(&b[4..]) as f32 * h(0) + h(2),
        Q5_0 => {
            let hi = (u32::from_le_bytes([b[2], b[3], b[4], b[5]]) >> j) & 1;
            ((nib(&b[6..]) as u32 | hi << 4) as f32 - 16.0) * h(0)
        }
        Q5_1 => {
            let hi = (u32::from_le_bytes([b[4], b[5], b[6], b[7]]) >> j) & 1;
            (nib(&b[8..]) as u32 | hi << 4) as f32 * h(0) + h(2)
        }
        Q8_0 => b[2 + j] as i8 as f32 * h(0),
        _ => unreachable!(),
    }
}

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 128;
const LAYERS: usize = 2;

/// GPT-2's byte alphabet: printable bytes stand for themselves, the rest are moved past 255.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

fn tiny_tokens() -> (Vec<String>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    let merges = ["Ġ t", "h e", "Ġt he", "1 2"];
    tokens.extend(["Ġt", "he", "Ġthe", "12"].map(String::from));
    (tokens, merges.map(String::from).to_vec())
}

/// A model's tensors in Hugging Face layout (name, [rows, cols], encoded rows) and its GGUF.
struct Tiny {
    gguf: Gguf,
    /// Hugging Face name → (shape, values), decoded independently.
    expected: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

/// llama.cpp's Q/K row order (convert_hf_to_gguf's `permute`): within each head, Hugging Face
/// row `j * half + i` is stored at row `2 * i + j`.
fn gguf_row(r: usize, heads: usize, rows: usize) -> usize {
    let hd = rows / heads;
    let (h, w) = (r / hd, r % hd);
    let (j, i) = (w / (hd / 2), w % (hd / 2));
    h * hd + 2 * i + j
}

fn tiny_llama(ty: u32, tied: bool, pre: &str) -> Tiny {
    tiny_model("llama", ty, tied, pre)
}

/// A tiny `llama` or `qwen2` (q/k/v biases, rows in Hugging Face order) model.
fn tiny_model(arch: &str, ty: u32, tied: bool, pre: &str) -> Tiny {
    let qwen = arch == "qwen2";
    let (tokens, merges) = tiny_tokens();
    let vocab = tokens.len();
    let mut rng = Rng(ty as u64 + 7);
    let mut tensors = vec![];
    let mut expected = HashMap::new();
    let mut matrix =
        |g: &str, hf: &str, rows: usize, cols: usize, ty: u32, heads: Option<usize>, rng: &mut Rng| {
            let hf_rows: Vec<Vec<u8>> = (0..rows).map(|_| random_row(rng, ty, cols)).collect();
            let values: Vec<f32> = hf_rows.iter().flat_map(|r| (0..cols).map(|e| decode(ty, r, e))).collect();
            let mut stored = vec![vec![]; rows];
            for (r, row) in hf_rows.into_iter().enumerate() {
                stored[heads.map_or(r, |h| gguf_row(r, h, rows))] = row;
            }
            let dims = if rows == 1 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
            tensors.push(T { name: g.into(), dims, ty, data: stored.concat(), offset: None });
            let shape = if rows == 1 { vec![cols] } else { vec![rows, cols] };
            expected.insert(hf.to_string(), (shape, values));
        };
    matrix("token_embd.weight", "model.embed_tokens.weight", vocab, HIDDEN, ty, None, &mut rng);
    for i in 0..LAYERS {
        let (b, p) = (format!("blk.{i}"), format!("model.layers.{i}"));
        let (qd, kvd) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        for (g, hf, rows, cols, heads) in [
            ("attn_q", "self_attn.q_proj", qd, HIDDEN, Some(HEADS)),
            ("attn_k", "self_attn.k_proj", kvd, HIDDEN, Some(KV_HEADS)),
            ("attn_v", "self_attn.v_proj", kvd, HIDDEN, None),
            ("attn_output", "self_attn.o_proj", HIDDEN, qd, None),
            ("ffn_gate", "mlp.gate_proj", INTER, HIDDEN, None),
            ("ffn_up", "mlp.up_proj", INTER, HIDDEN, None),
            ("ffn_down", "mlp.down_proj", HIDDEN, INTER, None),
        ] {
            let heads = heads.filter(|_| !qwen);
            matrix(&format!("{b}.{g}.weight"), &format!("{p}.{hf}.weight"), rows, cols, ty, heads, &mut rng);
            if qwen && g.starts_with("attn_") && g != "attn_output" {
                matrix(&format!("{b}.{g}.bias"), &format!("{p}.{hf}.bias"), 1, rows, F32, None, &mut rng);
            }
        }
        matrix(
            &format!("{b}.attn_norm.weight"),
            &format!("{p}.input_layernorm.weight"),
            1,
            HIDDEN,
            F32,
            None,
            &mut rng,
        );
        matrix(
            &format!("{b}.ffn_norm.weight"),
            &format!("{p}.post_attention_layernorm.weight"),
            1,
            HIDDEN,
            F32,
            None,
            &mut rng,
        );
    }
    matrix("output_norm.weight", "model.norm.weight", 1, HIDDEN, F32, None, &mut rng);
    if !tied {
        matrix("output.weight", "lm_head.weight", vocab, HIDDEN, ty, None, &mut rng);
    }
    let mut types = vec![1i32; vocab];
    types[..3].fill(3);
    let kv: Vec<(String, Kv)> = vec![
        ("general.architecture".into(), Kv::Str(arch.into())),
        ("general.name".into(), Kv::Str("tiny".into())),
        ("llama.block_count".into(), Kv::U32(LAYERS as u32)),
        ("llama.context_length".into(), Kv::U32(256)),
        ("llama.embedding_length".into(), Kv::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Kv::U32(INTER as u32)),
        ("llama.attention.head_count".into(), Kv::U32(HEADS as u32)),
        ("llama.attention.head_count_kv".into(), Kv::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base".into(), Kv::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Kv::F32(1e-5)),
        ("llama.rope.dimension_count".into(), Kv::U32(HEAD_DIM as u32)),
        ("tokenizer.ggml.model".into(), Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Kv::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), Kv::Strs(tokens)),
        ("tokenizer.ggml.token_type".into(), Kv::I32s(types)),
        ("tokenizer.ggml.merges".into(), Kv::Strs(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Kv::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Kv::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Kv::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Kv::Bool(false)),
        ("tokenizer.chat_template".into(), Kv::Str(TEMPLATE.into())),
    ];
    let kv = kv.into_iter().map(|(k, v)| (k.replace("llama.", &format!("{arch}.")), v)).collect();
    Tiny { gguf: Gguf { version: 3, kv, tensors, n_tensors: None, n_kv: None }, expected }
}

const TEMPLATE: &str =
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn convert(from: &Path, out: &Path, dtype: fcgpu::DType) -> anyhow::Result<fcgpu::gguf::Summary> {
    fcgpu::gguf::convert(from, out, dtype)
}

/// Every tensor of a safetensors file as f32.
fn load(path: &Path) -> std::collections::BTreeMap<String, fcgpu::Tensor> {
    fcgpu::model::weights::load_all(path).unwrap()
}

// ---- (a) synthetic models ----

#[test]
fn every_supported_type_dequantizes_exactly() {
    for ty in [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0] {
        let tiny = tiny_llama(ty, false, "smollm");
        let dir = tempfile::tempdir().unwrap();
        let src = write(dir.path(), "m.gguf", &tiny.gguf.bytes());
        let out = dir.path().join("out");
        let s = convert(&src, &out, fcgpu::DType::F32).unwrap();
        assert!(!s.tied);
        let got = load(&out.join("model.safetensors"));
        assert_eq!(got.len(), tiny.expected.len(), "type {ty}: tensor count");
        for (name, (shape, values)) in &tiny.expected {
            let t = &got[name];
            assert_eq!(t.shape(), &shape[..], "type {ty}: {name} shape");
            let v = t.to_vec();
            for (k, (a, b)) in v.iter().zip(values).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "type {ty}: {name}[{k}] is {a}, expected {b}");
            }
        }
    }
}

#[test]
fn bf16_output_is_the_f32_values_rounded() {
    let tiny = tiny_llama(Q4_1, true, "smollm");
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "m.gguf", &tiny.gguf.bytes());
    let out = dir.path().join("out");
    convert(&src, &out, fcgpu::DType::BF16).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let (t, _) = fcgpu::model::weights::WeightFiles::open(&out)
        .unwrap()
        .load_any("model.layers.1.self_attn.k_proj.weight")
        .map(|(t, p)| (t, p.to_path_buf()))
        .unwrap();
    assert_eq!(t.dtype(), fcgpu::DType::BF16);
    let want: Vec<f32> = tiny.expected["model.layers.1.self_attn.k_proj.weight"]
        .1
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(t.to_dtype(fcgpu::DType::F32).unwrap().to_vec(), want);
}

fn logprobs(model: &Path, ids: &[u32]) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "in.jsonl", format!("{{\"input_ids\": {ids:?}}}\n").as_bytes());
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args([
            "logprobs",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--input",
            f.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// A model built directly from Hugging Face-layout tensors, with the same config.
fn direct_model(config_dir: &Path, tensors: &HashMap<String, (Vec<usize>, Vec<f32>)>, out: &Path) {
    let config = fcgpu::model::ModelConfig::from_file(&config_dir.join("config.json")).unwrap();
    let model = fcgpu::model::Model::build(config, &mut |name, shape| {
        let (s, v) = &tensors[name];
        assert_eq!(&s[..], shape, "{name}");
        fcgpu::Tensor::from_vec(v.clone(), shape)
    })
    .unwrap();
    model.save(out, None).unwrap();
}

#[test]
fn qk_rows_are_put_back_in_hugging_face_order() {
    let tiny = tiny_llama(Q8_0, true, "smollm");
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "m.gguf", &tiny.gguf.bytes());
    let conv = dir.path().join("converted");
    convert(&src, &conv, fcgpu::DType::F32).unwrap();
    let direct = dir.path().join("direct");
    direct_model(&conv, &tiny.expected, &direct);
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 263).collect();
    let (a, b) = (logprobs(&conv, &ids), logprobs(&direct, &ids));
    assert_eq!(a.len(), ids.len() - 1);
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(worst <= 1e-6, "converted and directly built models differ by {worst}");
    // The control: the rows left in llama.cpp's order give other log-probs, so the check above
    // can fail.
    let mut permuted = tiny.expected.clone();
    for (name, heads) in [("q_proj", HEADS), ("k_proj", KV_HEADS)] {
        for i in 0..LAYERS {
            let (shape, v) = permuted.get_mut(&format!("model.layers.{i}.self_attn.{name}.weight")).unwrap();
            let (rows, cols) = (shape[0], shape[1]);
            let old = v.clone();
            for r in 0..rows {
                let g = gguf_row(r, heads, rows);
                v[g * cols..(g + 1) * cols].copy_from_slice(&old[r * cols..(r + 1) * cols]);
            }
        }
    }
    let wrong = dir.path().join("wrong");
    direct_model(&conv, &permuted, &wrong);
    let c = logprobs(&wrong, &ids);
    let diff = a.iter().zip(&c).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(diff > 1e-3, "leaving the rows permuted changed the log-probs by only {diff}");
}

#[test]
fn config_tokenizer_and_side_files() {
    let tiny = tiny_llama(Q4_0, true, "smollm");
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "m.gguf", &tiny.gguf.bytes());
    let out = dir.path().join("out");
    let s = convert(&src, &out, fcgpu::DType::F32).unwrap();
    assert!(s.tied);
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(f)).unwrap()).unwrap()
    };
    let cfg = read("config.json");
    for (k, v) in [
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("hidden_size", 64),
        ("intermediate_size", 128),
        ("num_hidden_layers", 2),
        ("vocab_size", 263),
        ("head_dim", 16),
        ("max_position_embeddings", 256),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(cfg[k], v, "config.json {k}");
    }
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(cfg["rope_theta"].as_f64(), Some(10000.0));
    assert!(!load(&out.join("model.safetensors")).contains_key("lm_head.weight"));
    assert_eq!(read("generation_config.json")["eos_token_id"], 2);
    let tc = read("tokenizer_config.json");
    assert_eq!(tc["chat_template"], TEMPLATE);
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), TEMPLATE);
    // The model loads in fcgpu as it is.
    fcgpu::model::Model::load(&out).unwrap();
}

#[test]
fn qwen2_keeps_row_order_and_biases() {
    let tiny = tiny_model("qwen2", Q8_0, false, "qwen2");
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "m.gguf", &tiny.gguf.bytes());
    let out = dir.path().join("out");
    let s = convert(&src, &out, fcgpu::DType::F32).unwrap();
    assert_eq!(s.arch, "qwen2");
    let got = load(&out.join("model.safetensors"));
    assert_eq!(got.len(), tiny.expected.len());
    for (name, (_, values)) in &tiny.expected {
        assert_eq!(&got[name].to_vec(), values, "{name}");
    }
    assert!(got.contains_key("model.layers.1.self_attn.k_proj.bias") && got.contains_key("lm_head.weight"));
    let model = fcgpu::model::Model::load(&out).unwrap();
    assert!(model.config.qkv_bias && !model.config.tie_word_embeddings);
}

fn encode(dir: &Path, text: &str) -> Vec<u32> {
    let t = fcgpu::model::tokenizer::Tokenizer::load(dir).unwrap();
    t.encode(text, true).unwrap()
}

#[test]
fn tokenizer_pre_split_follows_tokenizer_ggml_pre() {
    let dir = tempfile::tempdir().unwrap();
    let id = |s: &str| -> u32 {
        let (tokens, _) = tiny_tokens();
        tokens.iter().position(|t| t == s).unwrap() as u32
    };
    let text = "<|im_start|>the 12 the";
    let mut got = HashMap::new();
    for pre in ["smollm", "llama-bpe", "qwen2"] {
        let tiny = tiny_llama(F32, true, pre);
        let src = write(dir.path(), &format!("{pre}.gguf"), &tiny.gguf.bytes());
        let out = dir.path().join(pre);
        convert(&src, &out, fcgpu::DType::F32).unwrap();
        got.insert(pre, encode(&out, text));
    }
    // smollm and qwen2 split digits one by one; llama-bpe keeps up to three together.
    let digits = vec![1, id("t"), id("he"), id("Ġ"), id("1"), id("2"), id("Ġthe")];
    assert_eq!(got["smollm"], digits);
    assert_eq!(got["qwen2"], digits);
    assert_eq!(got["llama-bpe"], vec![1, id("t"), id("he"), id("Ġ"), id("12"), id("Ġthe")]);
}

// ---- (b) hostile files ----

/// The error of converting `bytes`, after checking that nothing was left behind.
fn fails(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "m.gguf", bytes);
    let out = dir.path().join("out");
    let err = match convert(&src, &out, fcgpu::DType::F32) {
        Ok(_) => panic!("a hostile file converted"),
        Err(e) => format!("{e:#}"),
    };
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("m.gguf")], "left behind after `{err}`");
    assert!(err.contains("m.gguf"), "the error does not name the file: {err}");
    err
}

#[test]
fn truncated_files_are_errors_with_nothing_left_behind() {
    let bytes = tiny_llama(Q8_0, true, "smollm").gguf.bytes();
    let mut cuts: Vec<usize> = (0..64).collect();
    cuts.extend((64..bytes.len()).step_by(bytes.len() / 150));
    cuts.push(bytes.len() - 1);
    for cut in cuts {
        let err = fails(&bytes[..cut]);
        assert!(
            err.contains("ends at byte") || err.contains("past the end") || err.contains("claims"),
            "cut at {cut}: {err}"
        );
    }
}

fn base() -> Gguf {
    tiny_llama(Q8_0, true, "smollm").gguf
}

#[test]
fn lying_and_unsupported_files_are_clear_errors() {
    let le = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut cases: Vec<(&str, Gguf, &str)> = vec![];
    let mut add = |what: &'static str, f: &dyn Fn(&mut Gguf), want: &'static str| {
        let mut g = base();
        f(&mut g);
        cases.push((what, g, want));
    };
    add("metadata count", &|g| g.n_kv = Some(u64::MAX), "claims 18446744073709551615 metadata entries");
    add("tensor count", &|g| g.n_tensors = Some(1 << 40), "tensor infos");
    add("string length", &|g| g.set("general.name", Kv::Raw(8, le(&[1 << 50]))), "general.name");
    add(
        "array count",
        &|g| g.set("x.arr", Kv::Raw(9, [4u32.to_le_bytes().to_vec(), le(&[1 << 60])].concat())),
        "array elements",
    );
    add("value type", &|g| g.set("x.bad", Kv::Raw(13, vec![])), "unknown value type 13");
    add(
        "array element type",
        &|g| g.set("x.arr", Kv::Raw(9, [77u32.to_le_bytes().to_vec(), le(&[1])].concat())),
        "unknown array element type 77",
    );
    add(
        "nesting",
        &|g| g.set("x.deep", Kv::Raw(9, [9u32.to_le_bytes().to_vec(), le(&[1])].concat().repeat(20))),
        "nested",
    );
    add("bool", &|g| g.set("x.b", Kv::Raw(7, vec![2])), "bool value 2");
    add("duplicate key", &|g| g.kv.push(("general.name".into(), Kv::Str("again".into()))), "appears twice");
    add("alignment", &|g| g.set("general.alignment", Kv::U32(3)), "power of two");
    add("version 1", &|g| g.version = 1, "version 1");
    add("big-endian", &|g| g.version = 3u32.swap_bytes(), "big-endian");
    add("dims count", &|g| g.tensor("output_norm.weight").dims = vec![1; 5], "5 dimensions");
    add(
        "dims overflow",
        &|g| g.tensor("output_norm.weight").dims = vec![1 << 32, 1 << 32, 1 << 32],
        "overflows",
    );
    add("zero dim", &|g| g.tensor("output_norm.weight").dims = vec![64, 0], "dimension 1 is 0");
    add("offset past end", &|g| g.tensor("output_norm.weight").offset = Some(1 << 40), "past the end");
    add(
        "misaligned offset",
        &|g| g.tensor("output_norm.weight").offset = Some(3),
        "not a multiple of the alignment",
    );
    add("ggml type", &|g| g.tensor("output_norm.weight").ty = 99, "unknown ggml type id 99");
    add(
        "unsupported quant",
        &|g| g.tensor("blk.0.ffn_up.weight").ty = 12,
        "`blk.0.ffn_up.weight` has type Q4_K",
    );
    add(
        "partial block",
        &|g| {
            let t = g.tensor("blk.0.attn_norm.weight");
            t.ty = Q8_0;
            t.dims = vec![48];
        },
        "not a multiple of Q8_0",
    );
    add(
        "duplicate tensor",
        &|g| {
            let t = g.tensors[1].clone();
            g.tensors.push(t);
        },
        "appears twice",
    );
    add(
        "architecture",
        &|g| g.set("general.architecture", Kv::Str("gpt2".into())),
        "architecture `gpt2` is not supported",
    );
    add("pre-tokenizer", &|g| g.set("tokenizer.ggml.pre", Kv::Str("falcon".into())), "`falcon`");
    add(
        "tokenizer model",
        &|g| g.set("tokenizer.ggml.model", Kv::Str("llama".into())),
        "tokenizer model `llama`",
    );
    add("bos id", &|g| g.set("tokenizer.ggml.bos_token_id", Kv::U32(99999)), "outside the 263 tokens");
    add("block count", &|g| g.set("llama.block_count", Kv::U32(1 << 20)), "block_count");
    add("head count", &|g| g.set("llama.attention.head_count", Kv::U32(0)), "head_count` is 0");
    add(
        "missing tensor",
        &|g| g.tensors.retain(|t| t.name != "blk.1.ffn_up.weight"),
        "`blk.1.ffn_up.weight` is missing",
    );
    add("wrong shape", &|g| g.tensor("blk.0.attn_q.weight").dims = vec![64, 32], "expected [64, 64]");
    add(
        "extra tensor",
        &|g| {
            g.tensors.push(T {
                name: "rope_freqs.weight".into(),
                dims: vec![8],
                ty: F32,
                data: vec![0; 32],
                offset: None,
            })
        },
        "rope scaling",
    );
    add(
        "non-finite weight",
        &|g| g.tensor("output_norm.weight").data[8..12].copy_from_slice(&f32::NAN.to_le_bytes()),
        "non-finite",
    );
    add("magic", &|g| g.kv.clear(), "");
    for (what, g, want) in cases {
        let mut bytes = g.bytes();
        if what == "magic" {
            bytes[..4].copy_from_slice(b"GGML");
        }
        let err = fails(&bytes);
        let want = if what == "magic" { "magic" } else { want };
        assert!(err.contains(want), "{what}: expected `{want}` in: {err}");
    }
}

#[test]
fn existing_out_needs_force_and_force_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "m.gguf", &base().bytes());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let run = |force: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fcgpu"));
        c.args(["convert", "--from", src.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let o = run(false);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    let o = run(true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "temporary directories left: {names:?}");
}

// ---- (c) the real model against transformers ----

fn fixture(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real/smollm2").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

#[test]
fn real_smollm2_weights_match_transformers() {
    let Some(dir) = real_model_dir() else {
        eprintln!("skipped: run scripts/get-model.sh smollm2-135m");
        return;
    };
    let r = fixture("weights.json");
    let stamp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fcgpu_convert.json")).unwrap()).unwrap();
    assert_eq!(
        stamp["source_sha256"], r["source"]["gguf_sha256"],
        "the cached model comes from another GGUF"
    );
    let files = fcgpu::model::weights::WeightFiles::open(&dir).unwrap();
    let tensors = r["tensors"].as_object().unwrap();
    assert_eq!(files.names().len(), tensors.len(), "tensor count");
    let (mut worst, mut worst_sum) = (0f64, 0f64);
    for (name, want) in tensors {
        let (t, _) = files.load_any(name).unwrap();
        let shape: Vec<usize> =
            want["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape(), &shape[..], "{name}");
        let v = t.to_dtype(fcgpu::DType::F32).unwrap().to_vec();
        let mut rng = Rng(fnv1a64(name.as_bytes()));
        for w in want["values"].as_array().unwrap() {
            let i = (rng.next() % v.len() as u64) as usize;
            // The reference holds the shortest decimal of each f32 value: read back as f32.
            let d = (v[i] - w.as_f64().unwrap() as f32).abs() as f64;
            assert!(d <= 1e-6, "{name}[{i}] is {}, transformers has {w}", v[i]);
            worst = worst.max(d);
        }
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let sumsq: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
        for (got, key) in [(sum, "sum"), (sumsq, "sumsq")] {
            let w = want[key].as_f64().unwrap();
            let rel = (got - w).abs() / w.abs().max(1e-3);
            assert!(rel <= 1e-9, "{name}: {key} {got} against transformers' {w}");
            worst_sum = worst_sum.max(rel);
        }
    }
    eprintln!(
        "{} tensors: max |value - transformers| {worst:e}, max relative sum difference {worst_sum:e}",
        tensors.len()
    );
}

#[test]
fn real_smollm2_tokenizer_matches_transformers() {
    let Some(dir) = real_model_dir() else {
        eprintln!("skipped: run scripts/get-model.sh smollm2-135m");
        return;
    };
    let r = fixture("tokenizer.json");
    let tok = fcgpu::model::tokenizer::Tokenizer::load(&dir).unwrap();
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 2000);
    let mut bad = vec![];
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let ids = tok.encode(text, true).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let hash = format!("{:016x}", fnv1a64(&bytes));
        if ids.len() as u64 != c["n"].as_u64().unwrap() || hash != c["hash"].as_str().unwrap() {
            bad.push(format!("{text:?} → {ids:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} strings tokenize differently, first: {}",
        bad.len(),
        cases.len(),
        bad[0]
    );
    eprintln!("{} strings tokenize identically ({} tokens)", cases.len(), r["tokens_total"]);
}
