//! Activation checkpointing (`--checkpoint-activations`): each layer's forward runs with graph
//! recording off, so none of its intermediate activations are kept; only its input is. The
//! layer's output carries one gradient rule, [`LayerCheckpoint`], which in the backward pass
//! runs the layer's forward again with recording on and backpropagates through that copy.
//!
//! The recomputed forward is the same ops on the same inputs, so it gives the same values, and
//! the backward through it visits the layer's ops in the same order as without checkpointing:
//! the gradients are bit-identical (tests/checkpoint_activations.rs checks it on the cpu and on
//! emu in f32). What it saves: per layer, everything but the input `[tokens, hidden]` between
//! the forward and the backward; what it costs: one more forward of every layer.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::{block, Batch, Model};
use crate::autograd::{self, GradFn};
use crate::ops;
use crate::tensor::Tensor;

/// `--checkpoint-activations`: `none` keeps every activation for the backward pass, `layer`
/// keeps only each layer's input and recomputes the rest, `auto` is `layer` when the memory plan
/// says the run does not fit the device without it (`none` on the cpu).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    #[default]
    None,
    Layer,
    Auto,
}

impl Checkpointing {
    pub fn parse(s: &str) -> Result<Checkpointing> {
        Ok(match s {
            "none" => Checkpointing::None,
            "layer" => Checkpointing::Layer,
            "auto" => Checkpointing::Auto,
            _ => bail!("--checkpoint-activations {s:?}: expected none, layer or auto"),
        })
    }
}

/// The packed batch's layout, owned: a layer's recomputation runs after `hidden_states` returned.
struct Layout {
    positions: Vec<u32>,
    seqs: Vec<(usize, usize)>,
    prefix: Vec<Option<usize>>,
}

/// Every layer's output `[tokens, hidden]`, each layer checkpointed (see the module docs).
pub(super) fn layers_forward(model: &Model, batch: &Batch) -> Result<Tensor> {
    let layout = Arc::new(Layout {
        positions: batch.positions.clone(),
        seqs: batch.seqs.clone(),
        prefix: batch.prefix.clone(),
    });
    let shared = Arc::new(model.clone());
    let params = layer_params(model);
    let mut x = ops::embedding(&model.embed, &batch.ids)?;
    for (li, params) in params.into_iter().enumerate() {
        let y = autograd::no_grad(|| shared.block(li, &x, &layout.positions, &mut packed(&layout)))?;
        let rule = LayerCheckpoint { model: shared.clone(), layout: layout.clone(), li, x, params };
        x = y.with_grad_fn(Some(Arc::new(rule)));
    }
    Ok(x)
}

fn packed(l: &Layout) -> block::Packed<'_> {
    block::Packed { seqs: &l.seqs, prefix: &l.prefix }
}

/// Each layer's parameters: every named parameter under `model.layers.{i}.`, so a parameter a
/// layer gains (an adapter) is covered as long as `Model::visit_mut` names it.
fn layer_params(model: &Model) -> Vec<Vec<Tensor>> {
    let mut per = vec![Vec::new(); model.layers.len()];
    for (name, t) in model.named_params() {
        let Some(rest) = name.strip_prefix("model.layers.") else { continue };
        let Some(li) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) else { continue };
        if let Some(v) = per.get_mut(li) {
            v.push(t);
        }
    }
    per
}

/// The gradient rule of a checkpointed layer: inputs are the layer's input and its parameters.
struct LayerCheckpoint {
    model: Arc<Model>,
    layout: Arc<Layout>,
    li: usize,
    x: Tensor,
    params: Vec<Tensor>,
}

impl GradFn for LayerCheckpoint {
    fn name(&self) -> &'static str {
        "checkpointed layer"
    }

    fn inputs(&self) -> Vec<Tensor> {
        let mut v = Vec::with_capacity(1 + self.params.len());
        v.push(self.x.clone());
        v.extend(self.params.iter().cloned());
        v
    }

    fn backward(&self, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        // The input as a leaf of its own, tracked only when a gradient must reach it.
        let x = if self.x.tracks_grad() { self.x.detach().requires_grad() } else { self.x.detach() };
        let y = autograd::with_grad(|| {
            self.model.block(self.li, &x, &self.layout.positions, &mut packed(&self.layout))
        })?;
        if !y.tracks_grad() {
            return Ok(vec![None; 1 + self.params.len()]);
        }
        let mut g = y.backward_with(grad.clone())?;
        let mut out = Vec::with_capacity(1 + self.params.len());
        let gx = g.remove(&x);
        if let Some(s) = gx.as_ref().and_then(|t| t.gpu_storage()) {
            // A leaf here, but the gradient of an activation in the whole graph.
            s.buf.count_as(crate::backend::memory::Category::Activations);
        }
        out.push(gx);
        out.extend(self.params.iter().map(|p| g.remove(p)));
        Ok(out)
    }
}
