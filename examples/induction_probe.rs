//! The induction (copy) probe, fcgpu side (issue 10, item 2). See `fcgpu::train::probe`.
//!
//!     cargo run --example induction_probe -- --seed 0 --steps 3000 --out runs/probe/seed0
//!
//! writes `<out>/init/` (config.json + model.safetensors: the initial weights, which
//! `tools/induction_probe.py` loads for the PyTorch run) and `<out>/fcgpu.jsonl` (one line per
//! step: step, loss, grad_norm), then prints the phase-change step. Options: `--len N` (copy
//! length, default 24), `--batch N` (sequences per step, 16), `--lr X` (3e-3), `--preset`
//! (tiny; micro for a quick look), `--init-only`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fcgpu::train::probe::{copy_batch, phase_change_step, probe_model, probe_trainer, PLATEAU, WINDOW};
use fcgpu::train::tiny::TinySize;

struct Args {
    seed: u64,
    steps: u64,
    len: usize,
    batch: usize,
    lr: f32,
    preset: String,
    out: PathBuf,
    init_only: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        seed: 0,
        steps: 3000,
        len: 24,
        batch: 16,
        lr: 3e-3,
        preset: "tiny".into(),
        out: PathBuf::from("runs/probe"),
        init_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--init-only" {
            a.init_only = true;
            continue;
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{flag} {v}: {e}");
        match flag.as_str() {
            "--seed" => a.seed = v.parse().map_err(|e| bad(&e))?,
            "--steps" => a.steps = v.parse().map_err(|e| bad(&e))?,
            "--len" => a.len = v.parse().map_err(|e| bad(&e))?,
            "--batch" => a.batch = v.parse().map_err(|e| bad(&e))?,
            "--lr" => a.lr = v.parse().map_err(|e| bad(&e))?,
            "--preset" => a.preset = v,
            "--out" => a.out = PathBuf::from(v),
            other => bail!("unknown option {other}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let a = parse()?;
    let model = probe_model(TinySize::by_name(&a.preset)?, a.seed)?;
    model.save(&a.out.join("init"), None)?;
    if a.init_only {
        return Ok(());
    }
    let mut t = probe_trainer(model, a.lr, a.steps);
    let path = a.out.join("fcgpu.jsonl");
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut losses = Vec::new();
    for step in 1..=a.steps {
        let m = t.step_on(&[copy_batch(a.seed, step, a.batch, a.len)])?;
        writeln!(log, "{{\"step\":{step},\"loss\":{},\"grad_norm\":{}}}", m.loss, m.grad_norm)?;
        losses.push(m.loss);
        if step % 10 == 0 {
            log.flush()?;
        }
        if step % 100 == 0 {
            eprintln!("step {step}: loss {:.4} grad norm {:.3}", m.loss, m.grad_norm);
        }
    }
    log.flush()?;
    let pc = phase_change_step(&losses, PLATEAU, WINDOW);
    println!("seed {}: phase change at step {}", a.seed, pc.map_or("none".to_string(), |s| s.to_string()));
    Ok(())
}
