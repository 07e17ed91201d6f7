//! The memory plan of a training run (`fcgpu plan`), and what depends on it.

use crate::model::checkpoint::Checkpointing;
use crate::tensor::Device;
use crate::train::run_config::RunConfig;

/// Whether a run checkpoints its layers' activations on `device`: `layer` always, `none`
/// never, `auto` on a GPU device (the cpu keeps its activations in host memory).
pub fn checkpoint_layers(run: &RunConfig, device: Device) -> bool {
    match run.checkpoint_activations {
        Checkpointing::None => false,
        Checkpointing::Layer => true,
        Checkpointing::Auto => device.is_gpu(),
    }
}
