//! Training: the SFT (`sft`, `srml`) and GRPO (`grpo`) trainers, their optimizer, schedule,
//! checkpoints, metrics and held-out evaluation, and the embedded tiny model (`tiny`).

pub mod base;
pub mod checkpoint;
pub mod copy_heads;
pub mod embedded;
pub mod grpo;
pub mod heldout;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod probe;
pub mod prompt;
pub mod run_config;
pub mod schedule;
pub mod sft;
pub mod shared_prompt;
pub mod srml;
pub mod tensorboard;
pub mod tiny;

/// The training loops' progress bar over `steps` (hidden when stderr is not a terminal, so logs
/// and pipes get plain lines only).
pub fn step_bar(steps: u64) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(steps);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        pb.set_style(style);
    }
    pb
}
