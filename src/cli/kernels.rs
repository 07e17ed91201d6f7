//! `fcgpu kernels check`: compile every kernel file with NVRTC for each architecture and report
//! registers, spills and shared memory per kernel. Fails on a compile error or any spill.

use anyhow::{bail, Result};
use clap::{Args as ClapArgs, Subcommand};

use crate::backend::nvrtc;
use crate::backend::sources::KERNEL_FILES;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: KernelsCommand,
}

#[derive(Subcommand, Debug)]
pub enum KernelsCommand {
    /// Compile every kernel to CUBIN with NVRTC; print registers, spills, shared memory.
    Check {
        /// Comma-separated target architectures.
        #[arg(long, default_value = "sm_80,sm_90", value_delimiter = ',')]
        arch: Vec<String>,
        /// Print a JSON array of {kernel, arch, registers, spill_stores, spill_loads, shared_bytes}.
        #[arg(long)]
        json: bool,
        /// Only files whose name contains this.
        #[arg(long)]
        file: Option<String>,
    },
    /// Print the roofline table (bytes, FLOPs, time at H100 peak) at Qwen2.5-7B shapes (Markdown).
    Roofline {
        /// Instead: project whole GRPO steps (rollout, reference pass, update) at Qwen2.5-1.5B and
        /// 7B shapes on H100 and H200, from the roofline and the decode loop's host counts.
        #[arg(long, conflicts_with = "serve")]
        grpo: bool,
        /// Instead: project `fcgpu serve` (requests/s, time to first token) for SmolLM2-135M on
        /// an H100, before and after the batched step and the prefix cache.
        #[arg(long)]
        serve: bool,
    },
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        KernelsCommand::Check { arch, json, file } => check(&arch, json, file.as_deref()),
        KernelsCommand::Roofline { grpo: true, .. } => {
            print!("{}", crate::roofline::step::markdown()?);
            Ok(())
        }
        KernelsCommand::Roofline { serve: true, .. } => {
            print!("{}", crate::roofline::serve::markdown(&crate::roofline::step::H100));
            Ok(())
        }
        KernelsCommand::Roofline { .. } => {
            print!("{}", crate::roofline::markdown(&crate::roofline::Shapes::qwen25_7b()));
            Ok(())
        }
    }
}

fn check(archs: &[String], json: bool, filter: Option<&str>) -> Result<()> {
    nvrtc::available()?;
    let (maj, min) = nvrtc::version()?;
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    if !json {
        println!("NVRTC {maj}.{min}");
        println!(
            "{:<34} {:<6} {:>5} {:>7} {:>7} {:>8}",
            "kernel", "arch", "regs", "spill_st", "spill_ld", "smem"
        );
    }
    for arch in archs {
        for (file, _) in KERNEL_FILES.iter().filter(|(f, _)| filter.is_none_or(|x| f.contains(x))) {
            let c = nvrtc::compile(file, arch, true)?;
            if !c.ok {
                errors.push(format!("{file} for {arch}: compile error\n{}", c.log));
                continue;
            }
            for k in nvrtc::parse_ptxas(&c.log, arch) {
                if k.spill_stores > 0 || k.spill_loads > 0 {
                    errors.push(format!(
                        "{} for {arch}: {} bytes spill stores, {} bytes spill loads",
                        k.kernel, k.spill_stores, k.spill_loads
                    ));
                }
                if !json {
                    println!(
                        "{:<34} {:<6} {:>5} {:>7} {:>7} {:>8}",
                        k.kernel, k.arch, k.registers, k.spill_stores, k.spill_loads, k.shared_bytes
                    );
                }
                rows.push(k);
            }
        }
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|k| {
                serde_json::json!({"kernel": k.kernel, "arch": k.arch, "registers": k.registers,
                    "spill_stores": k.spill_stores, "spill_loads": k.spill_loads, "shared_bytes": k.shared_bytes})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        bail!("kernels check: {} problem(s)", errors.len());
    }
    if !json {
        println!("{} kernels x {} arch(s): ok, no spills", rows.len() / archs.len().max(1), archs.len());
    }
    Ok(())
}
