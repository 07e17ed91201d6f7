//! `fcgpu data`: data preparation. `data prepare` runs the two-stage refinement (an LLM
//! judge, then AST validation) over xLAM, BFCL or fcgpu data (docs/data.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::data::prepare::{self, ast, cache, client, input, judge, report, Stage};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Refine a data set: AST validation (stage 2) and an LLM judge (stage 1).
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// xLAM JSONL (or the xLAM-60k JSON array), fcgpu JSONL, or BFCL data: a
    /// `BFCL_v4_<category>.json` file or a directory of them (answers from `possible_answer/`).
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: input::Format,
    /// Output directory: accepted.jsonl, rejected.jsonl, summary.json (and the judge cache).
    #[arg(long)]
    pub out: PathBuf,
    /// Which stages run (`judge` and `all` need --judge-url or --judge-local).
    #[arg(long, value_enum, default_value = "ast")]
    pub stage: Stage,
    /// Stage 2: also reject string values that do not appear in the query.
    #[arg(long)]
    pub grounding: bool,
    /// Judge: most rounds per sample (K).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Judge: an OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1.
    #[arg(long, conflicts_with = "judge_local")]
    pub judge_url: Option<String>,
    /// Judge: the model name sent to --judge-url.
    #[arg(long, requires = "judge_url")]
    pub judge_model: Option<String>,
    /// Judge: a local model directory, run by fcgpu's rollout engine.
    #[arg(long)]
    pub judge_local: Option<PathBuf>,
    /// Judge: requests in flight (--judge-url) or sequences per decode batch (--judge-local).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Judge: answer length limit in tokens.
    #[arg(long, default_value_t = 1024)]
    pub judge_max_tokens: usize,
    /// Judge: re-asks after an answer without a verdict (then `judge_unparsed`).
    #[arg(long, default_value_t = 2)]
    pub judge_retries: u32,
    /// Judge: seconds per HTTP request before it is retried.
    #[arg(long, default_value_t = 300)]
    pub judge_timeout: u64,
    /// Judge: retries of an HTTP request after a timeout or a 5xx (backoff doubles from 0.5 s).
    #[arg(long, default_value_t = 4)]
    pub http_retries: u32,
    /// Judge: keep references without reasoning as they are (no reasoning written).
    #[arg(long)]
    pub no_write_reasoning: bool,
    /// Judge: a directory of prompt files overriding the shipped ones (prompts/judge/*.txt).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// With --judge-local: cpu, cuda, cuda:N, emu, or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Continue in an output directory of an earlier (killed) run: cached judge answers are reused.
    #[arg(long)]
    pub resume: bool,
    /// Replace the outputs (and the judge cache) of an earlier run in --out.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        DataCommand::Prepare(p) => prepare_cmd(p),
    }
}

/// `--out` must be a directory, and not the input itself (a file or a BFCL directory).
fn check_out_path(a: &PrepareArgs) -> Result<()> {
    let same = match (a.input.canonicalize(), a.out.canonicalize()) {
        (Ok(i), Ok(o)) => i == o,
        _ => false,
    };
    if same || (a.out.exists() && !a.out.is_dir()) {
        let what = if same { "is the input" } else { "exists and is not a directory" };
        bail!(
            "--out {} {what}: the output must be a directory other than the input (--input {})",
            a.out.display(),
            a.input.display()
        );
    }
    Ok(())
}

/// Refuses to overwrite an earlier run's files unless `--resume` or `--force` says what to do;
/// `--resume` continues only a run of the same input and options (`run`: this run's record).
fn check_out(a: &PrepareArgs, run: &serde_json::Value) -> Result<()> {
    let names = [report::ACCEPTED, report::REJECTED, report::SUMMARY, cache::CACHE_FILE, report::RUN];
    let old: Vec<&str> = names.iter().copied().filter(|n| a.out.join(n).exists()).collect();
    if old.is_empty() {
        return Ok(());
    }
    if a.force {
        // The outputs are replaced atomically at the end (the input may even be one of them);
        // only the cache must go now, or its answers would be reused.
        let p = a.out.join(cache::CACHE_FILE);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("--force: cannot remove {}", p.display()))?;
        }
        return Ok(());
    }
    if !a.resume {
        bail!(
            "--out {} already holds {} of an earlier run; pass --resume to continue it or --force to replace it",
            a.out.display(),
            old.join(", ")
        );
    }
    check_resume(&a.out, run)
}

/// `--resume` continues only the run recorded in `out`: same input bytes and options.
fn check_resume(out: &Path, run: &serde_json::Value) -> Result<()> {
    let path = out.join(report::RUN);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--resume: --out {} holds an earlier run without {} (an older fcgpu, or not a run of \
             `data prepare`), so its input cannot be checked; pass --force to replace it",
            out.display(),
            report::RUN
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let old: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let diff = report::run_differences(&old, run);
    if !diff.is_empty() {
        bail!(
            "--resume: --out {} holds a run of another input or options: {}; pass --force to replace it, \
             or choose another --out",
            out.display(),
            diff.join("; ")
        );
    }
    Ok(())
}

fn backend(a: &PrepareArgs) -> Result<Box<dyn client::Backend>> {
    if let Some(url) = &a.judge_url {
        let Some(model) = &a.judge_model else { bail!("--judge-url needs --judge-model") };
        let mut h = client::Http::new(url, model, Duration::from_secs(a.judge_timeout.max(1)));
        h.concurrency = a.concurrency.max(1);
        h.max_tokens = a.judge_max_tokens;
        h.retries = a.http_retries;
        h.api_key = std::env::var("FCGPU_JUDGE_API_KEY").ok().filter(|k| !k.is_empty());
        return Ok(Box::new(h));
    }
    if let Some(dir) = &a.judge_local {
        let mut l = client::Local::load(dir, &a.device)?;
        l.max_tokens = a.judge_max_tokens;
        l.max_batch = a.concurrency.max(1);
        return Ok(Box::new(l));
    }
    let stage = format!("{:?}", a.stage).to_lowercase();
    bail!("--stage {stage} needs a judge: --judge-url URL --judge-model NAME, or --judge-local DIR")
}

fn config(a: &PrepareArgs) -> Result<prepare::Config> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let judge = judge::Options {
        rounds: a.rounds,
        retries: a.judge_retries,
        write_reasoning: !a.no_write_reasoning,
        prompts: judge::Prompts::load(a.prompts.as_deref())?,
    };
    Ok(prepare::Config {
        input: a.input.clone(),
        format: a.format,
        stage: a.stage,
        ast: ast::Options { grounding: a.grounding },
        judge,
    })
}

fn prepare_cmd(a: PrepareArgs) -> Result<()> {
    if !a.input.exists() {
        bail!("--input {}: no such file or directory", a.input.display());
    }
    prepare::input::check(&a.input)?;
    let cfg = config(&a)?;
    // The backend first: a missing judge is an error before the output directory is touched.
    let backend = match a.stage {
        Stage::Ast => None,
        _ => Some(backend(&a)?),
    };
    crate::runfs::ensure_not_cwd(&a.out, "--out")?;
    check_out_path(&a)?;
    let run = report::run_record(&cfg, &input::fingerprint(&a.input, a.format)?);
    let _lock = crate::runfs::RunLock::acquire(&a.out)?;
    check_out(&a, &run)?;
    crate::runfs::clean_stale_temps_noisy(&a.out);
    let mut record = serde_json::to_vec_pretty(&run)?;
    record.push(b'\n');
    crate::runfs::write_atomic(&a.out.join(report::RUN), &record)?;
    let judge = match backend {
        None => None,
        Some(b) => Some(open_judge(&a.out, b, cfg.judge.clone())?),
    };
    let out = prepare::prepare(&cfg, judge.as_ref())?;
    let summary = report::summary(&cfg, &out);
    report::write(&a.out, &summary, &out)?;
    print!("{}", report::table(&summary));
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn open_judge(out: &Path, backend: Box<dyn client::Backend>, opts: judge::Options) -> Result<judge::Judge> {
    let cache = cache::Cache::open(out)?;
    if !cache.is_empty() {
        eprintln!("judge cache: {} answers from an earlier run", cache.len());
    }
    Ok(judge::Judge { backend, cache, opts })
}
