//! `fcgpu eval`: score model answers per BFCL category (BFCL's AST checker semantics).

use crate::data::{load_bfcl_category, Sample, BFCL_CATEGORIES};
use crate::fc::decode::AnswerFormat;
use crate::fc::prompt::PromptStyle;
use crate::fc::score::score;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// BFCL prompting mode: a Python call list (after any `<think>…</think>`).
    Python,
    /// Qwen JSON mode: `<tool_call>` blocks.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// BFCL v4 data directory (falls back to $FCGPU_BFCL_DIR).
    #[arg(long)]
    pub bfcl_dir: Option<PathBuf>,
    /// Score this data set instead of BFCL's: fcgpu or xLAM JSON lines with ground truth (for
    /// example a run's `sft/task/eval.jsonl` with `--style compact`).
    #[arg(long, conflicts_with = "bfcl_dir")]
    pub data: Option<PathBuf>,
    /// A category name, or `all`.
    #[arg(long, default_value = "all")]
    pub category: String,
    /// JSON lines `{"id": .., "result": "<raw model text>"}`: a file, or (with `all`) a folder.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub results: Option<PathBuf>,
    /// Answer format; default `python`, or `json` with `--style qwen-fc`.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Generate the answers with this model (greedy, KV-cache rollout engine) instead of
    /// reading `--results`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) for the
    /// model, applied as adapters (not merged).
    #[arg(long, requires = "model")]
    pub adapter: Option<PathBuf>,
    /// Prompt style for `--model`. Default: the style recorded in the model directory
    /// (`fcgpu.json`, written by `sft` and `train`), else `bfcl`.
    #[arg(long, value_enum)]
    pub style: Option<PromptStyle>,
    /// At most N entries per category (the first N).
    #[arg(long)]
    pub limit: Option<usize>,
    /// With `--model`: answer length limit in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// With `--model`: most sequences decoded at once.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// With `--model`: positions per block of the paged KV cache.
    #[arg(long, default_value_t = crate::model::kv_cache::DEFAULT_BLOCK)]
    pub kv_block_size: usize,
    /// With `--model`: cpu, cuda, cuda:N, emu, or auto (cuda when a GPU is usable, else cpu).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// With `--model` on a GPU device: bf16 (default) or f32 weights and activations.
    #[arg(long)]
    pub dtype: Option<String>,
    /// With `--model`: write the generated answers as result lines (re-scorable with `--results`).
    #[arg(long)]
    pub save_results: Option<PathBuf>,
    /// Write one line per entry: `{"id", "category", "valid", "error_type"}`.
    #[arg(long)]
    pub verdicts: Option<PathBuf>,
    /// With `--model`: answers drawn per entry. Above 1 (with `--temperature` > 0), the report
    /// is pass@1 (the mean over the draws) and pass@k (any draw right) per category: how much
    /// sampling finds that greedy decoding misses, the headroom of RL.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// With `--model`: sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// With `--model` and `--temperature` > 0: the sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for Args {
    /// Score all categories of `$FCGPU_BFCL_DIR` (set `results` or `model`).
    fn default() -> Self {
        Args {
            bfcl_dir: None,
            category: "all".into(),
            results: None,
            format: None,
            verdicts: None,
            model: None,
            adapter: None,
            style: None,
            limit: None,
            max_new_tokens: 512,
            batch_size: 64,
            kv_block_size: crate::model::kv_cache::DEFAULT_BLOCK,
            save_results: None,
            device: "auto".into(),
            dtype: None,
            data: None,
            samples: 1,
            temperature: 0.0,
            seed: 0,
        }
    }
}

/// `--bfcl-dir`, or else `$FCGPU_BFCL_DIR`.
pub fn resolve_bfcl_dir(arg: Option<PathBuf>) -> Result<PathBuf> {
    match arg.or_else(|| std::env::var_os("FCGPU_BFCL_DIR").map(PathBuf::from)) {
        Some(p) => Ok(p),
        None => bail!("--bfcl-dir is required (or set FCGPU_BFCL_DIR)"),
    }
}

/// Reads result lines into id → text; a malformed line is an error naming file and line, and so
/// is an id given twice (in this file or an earlier one): which answer to score would be a guess.
pub fn read_results(path: &Path, into: &mut HashMap<String, String>) -> Result<()> {
    read_results_at(path, into, &mut HashMap::new())
}

/// [`read_results`], with `seen` recording where each id was read (for the duplicate error).
fn read_results_at(
    path: &Path,
    into: &mut HashMap<String, String>,
    seen: &mut HashMap<String, String>,
) -> Result<()> {
    let text = crate::jsonl::read_text(path)?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let id = v.get("id").and_then(|x| x.as_str());
        let Some(id) = id else { bail!("{}:{}: missing string field \"id\"", path.display(), i + 1) };
        // BFCL result files hold a string; anything else is kept as its JSON text.
        let result = match v.get("result") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => bail!("{}:{}: missing field \"result\"", path.display(), i + 1),
        };
        let here = format!("{}:{}", path.display(), i + 1);
        if let Some(first) = seen.get(id) {
            bail!("{here}: duplicate id {id:?} (first at {first}); give each id one answer");
        }
        seen.insert(id.to_string(), here);
        into.insert(id.to_string(), result);
    }
    Ok(())
}

fn load_results(path: &Path) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut seen = HashMap::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            read_results_at(&f, &mut out, &mut seen)?;
        }
    } else {
        read_results_at(path, &mut out, &mut seen)?;
    }
    Ok(out)
}

/// Result ids that match no entry of `samples`, sorted: they are reported, not scored.
fn unknown_ids(results: &HashMap<String, String>, samples: &[Sample]) -> Vec<String> {
    let known: std::collections::HashSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    let mut v: Vec<String> = results.keys().filter(|k| !known.contains(k.as_str())).cloned().collect();
    v.sort();
    v
}

fn load_samples(dir: &Path, category: &str) -> Result<Vec<Sample>> {
    if category != "all" {
        return load_bfcl_category(dir, category);
    }
    let mut all = Vec::new();
    let mut found = 0;
    for c in BFCL_CATEGORIES {
        if dir.join(format!("BFCL_v4_{c}.json")).exists() {
            all.extend(load_bfcl_category(dir, c)?);
            found += 1;
        }
    }
    if found == 0 {
        bail!("--bfcl-dir {}: no BFCL_v4_<category>.json file of any known category", dir.display());
    }
    Ok(all)
}

/// The first `limit` samples of every category (order kept).
fn limit_per_category(samples: Vec<Sample>, limit: usize) -> Vec<Sample> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    samples
        .into_iter()
        .filter(|s| {
            let n = seen.entry(s.category.clone()).or_default();
            *n += 1;
            *n <= limit
        })
        .collect()
}

/// The model's answers in `dir` to every sample, `a.samples` per entry (greedy at temperature
/// 0): one id → raw text map per draw.
fn generate_results(dir: &Path, samples: &[Sample], a: &Args) -> Result<Vec<HashMap<String, String>>> {
    use crate::model::tokenizer::Tokenizer;
    use crate::rollout::{self, SamplingConfig};
    let device = crate::cli::device(&a.device, "eval")?;
    let mut model = crate::cli::load_model(dir, a.adapter.as_deref(), device, a.dtype.as_deref())?;
    let tok = Tokenizer::load(dir)?;
    let context = model.config.max_position_embeddings;
    if a.max_new_tokens >= context {
        bail!(
            "--max-new-tokens {} leaves no room for a prompt in the model's context of {context} tokens (max_position_embeddings); use at most {}",
            a.max_new_tokens,
            context - 1
        );
    }
    model.config.eos_token_ids = rollout::chat_eos_ids(&model, Some(&tok));
    // As the trainers render them: the model's own chat template (the built-in Qwen ChatML one
    // for a model with none), or the embedded task's compact prompt.
    let prompter = crate::train::prompt::Prompter::new(Some(dir), style(a))?;
    let prompts: Vec<Vec<u32>> = samples
        .iter()
        .map(|s| prompter.ids(&tok, s).with_context(|| format!("entry {}", s.id)))
        .collect::<Result<_>>()?;
    let cfg = SamplingConfig {
        n: a.samples,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        seed: a.seed,
        max_batch: a.batch_size.max(1),
        progress: true,
        kv_block_size: a.kv_block_size,
        ..Default::default()
    };
    let out = rollout::generate(&model, &prompts, &cfg, Some(&tok))?;
    let mut draws = vec![HashMap::new(); a.samples];
    let mut next = vec![0usize; samples.len()];
    for c in &out {
        let k = &mut next[c.prompt_index];
        draws[*k].insert(samples[c.prompt_index].id.clone(), c.text(&tok)?);
        *k += 1;
    }
    if let Some(p) = &a.save_results {
        let mut f = Vec::new();
        for (k, results) in draws.iter().enumerate() {
            for s in samples {
                let mut line = serde_json::json!({"id": s.id, "result": results[&s.id]});
                if a.samples > 1 {
                    line["sample"] = serde_json::json!(k);
                }
                serde_json::to_writer(&mut f, &line)?;
                f.write_all(b"\n")?;
            }
        }
        crate::runfs::write_atomic(p, &f)?;
    }
    Ok(draws)
}

/// pass@1 (mean over draws) and pass@k (any draw right) per category, and pooled.
fn pass_at_k_table(samples: &[Sample], reports: &[crate::fc::score::Report]) -> String {
    let k = reports.len();
    let mut per: std::collections::BTreeMap<&str, (usize, usize, usize)> = Default::default();
    for (i, s) in samples.iter().enumerate() {
        let right = reports.iter().filter(|r| r.verdicts[i].valid).count();
        for key in [s.category.as_str(), "all"] {
            let e = per.entry(key).or_default();
            e.0 += 1;
            e.1 += right;
            e.2 += (right > 0) as usize;
        }
    }
    let mut out = format!("{:<26} {:>8} {:>9} {:>7}\n", "category", "pass@1", format!("pass@{k}"), "count");
    let order = |c: &str| BFCL_CATEGORIES.iter().position(|x| *x == c).unwrap_or(usize::MAX);
    let mut cats: Vec<&&str> = per.keys().collect();
    cats.sort_by_key(|c| (**c == "all", order(c), c.to_string()));
    for c in cats {
        let (n, right, any) = per[*c];
        let p1 = 100.0 * right as f64 / (n * k) as f64;
        out.push_str(&format!("{:<26} {:>7.2}% {:>8.2}% {:>7}\n", c, p1, 100.0 * any as f64 / n as f64, n));
    }
    out
}

/// The entries to score: `--data`, or BFCL's categories from `--bfcl-dir`.
fn entries(a: &Args) -> Result<Vec<Sample>> {
    if let Some(p) = &a.data {
        let all = crate::data::load_jsonl_unique_ids(p)?;
        if all.is_empty() {
            bail!("--data {}: no entries to score", p.display());
        }
        if a.category == "all" {
            return Ok(all);
        }
        let picked: Vec<Sample> = all.into_iter().filter(|s| s.category == a.category).collect();
        if picked.is_empty() {
            bail!("--data {}: no entry of category {:?}", p.display(), a.category);
        }
        return Ok(picked);
    }
    let bfcl_dir = crate::cli::eval::resolve_bfcl_dir(a.bfcl_dir.clone())?;
    if !bfcl_dir.is_dir() {
        bail!("--bfcl-dir {}: no such directory", bfcl_dir.display());
    }
    load_samples(&bfcl_dir, &a.category)
}

/// Most answers drawn per entry (`--samples`).
const MAX_SAMPLES: usize = 1024;

/// Most sequences decoded at once (`--batch-size`).
const MAX_BATCH: usize = 4096;

fn check_sampling(a: &Args) -> Result<()> {
    if a.limit == Some(0) {
        bail!("--limit must be at least 1 (it is the number of entries per category scored)");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if a.batch_size == 0 || a.batch_size > MAX_BATCH {
        bail!("--batch-size must be between 1 and {MAX_BATCH}, got {}", a.batch_size);
    }
    // Every draw of every entry is kept until scoring: bound the memory a typo can ask for.
    if a.samples == 0 || a.samples > MAX_SAMPLES {
        bail!("--samples must be between 1 and {MAX_SAMPLES}, got {}", a.samples);
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0, got {}", a.temperature);
    }
    if a.samples > 1 && a.temperature == 0.0 {
        bail!("--samples {} needs --temperature > 0 (greedy draws are all the same)", a.samples);
    }
    if a.model.is_none() && (a.samples > 1 || a.temperature > 0.0) {
        bail!("--samples and --temperature need --model (they say how to generate the answers)");
    }
    Ok(())
}

pub fn run(mut a: Args) -> Result<()> {
    check_sampling(&a)?;
    a.style = Some(crate::train::prompt::eval_style(a.style, a.model.as_deref())?);
    let all_samples = entries(&a)?;
    let samples = match a.limit {
        Some(n) => limit_per_category(all_samples.clone(), n),
        None => all_samples.clone(),
    };
    let mut draws = match (&a.model, &a.results) {
        (Some(dir), _) => generate_results(dir, &samples, &a)?,
        (None, Some(r)) => vec![load_results(r)?],
        (None, None) => bail!("give --results or --model"),
    };
    if draws.len() > 1 {
        let fmt = answer_format(&a);
        let reports: Vec<_> = draws.iter().map(|r| score(&samples, r, fmt)).collect();
        print!("{}", pass_at_k_table(&samples, &reports));
        if let Some(p) = &a.verdicts {
            let mut f = Vec::new();
            for (k, r) in reports.iter().enumerate() {
                for v in &r.verdicts {
                    let mut line = serde_json::to_value(v)?;
                    line["sample"] = serde_json::json!(k);
                    serde_json::to_writer(&mut f, &line)?;
                    f.write_all(b"\n")?;
                }
            }
            crate::runfs::write_atomic(p, &f)?;
        }
        return Ok(());
    }
    let results = draws.remove(0);
    let unknown = unknown_ids(&results, &all_samples);
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(5).map(String::as_str).collect();
        eprintln!(
            "warning: {} result ids match no entry of the scored categories and are not scored: {}{}",
            unknown.len(),
            shown.join(", "),
            if unknown.len() > 5 { ", ..." } else { "" }
        );
    }
    let report = score(&samples, &results, answer_format(&a));
    print!("{}", report.table());
    if !unknown.is_empty() {
        println!("unknown ids (not scored): {}", unknown.len());
    }
    if let Some(p) = &a.verdicts {
        let mut f = Vec::new();
        for v in &report.verdicts {
            serde_json::to_writer(&mut f, v)?;
            f.write_all(b"\n")?;
        }
        crate::runfs::write_atomic(p, &f)?;
    }
    Ok(())
}

/// `--style`, resolved by `run` (the model's recorded style, else `bfcl`).
fn style(a: &Args) -> PromptStyle {
    a.style.unwrap_or(PromptStyle::Bfcl)
}

/// `--format`, or the style's own: JSON for `qwen-fc`, Python otherwise.
fn answer_format(a: &Args) -> AnswerFormat {
    let default_format = if style(a) == PromptStyle::QwenFc { Format::Json } else { Format::Python };
    match a.format.unwrap_or(default_format) {
        Format::Python => AnswerFormat::Python,
        Format::Json => AnswerFormat::Json,
    }
}
