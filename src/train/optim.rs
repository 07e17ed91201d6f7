//! AdamW with decoupled weight decay and bias correction, and clipping by global norm.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use rayon::prelude::*;

use crate::autograd::Grads;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// Moments per parameter name, and the step count (for bias correction).
#[derive(Clone, Debug, Default)]
pub struct AdamW {
    pub step: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

impl AdamW {
    /// One update of `param` (named `name`) with gradient `grad`, at learning rate `lr`.
    /// Call `begin_step` once per optimizer step before updating the parameters.
    pub fn update(&mut self, cfg: &AdamWConfig, lr: f32, name: &str, param: &mut Tensor, grad: &[f32]) -> Result<()> {
        ensure!(grad.len() == param.numel(), "AdamW: gradient of `{name}` has {} values for {} parameters", grad.len(), param.numel());
        let n = grad.len();
        let m = self.m.entry(name.to_string()).or_insert_with(|| vec![0.0; n]);
        let v = self.v.entry(name.to_string()).or_insert_with(|| vec![0.0; n]);
        let t = self.step.max(1) as i32;
        let (bc1, bc2) = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
        let mut p = param.to_vec();
        p.par_iter_mut().zip(m.par_iter_mut().zip(v.par_iter_mut())).zip(grad.par_iter()).for_each(|((p, (m, v)), &g)| {
            *m = cfg.beta1 * *m + (1.0 - cfg.beta1) * g;
            *v = cfg.beta2 * *v + (1.0 - cfg.beta2) * g * g;
            let (mh, vh) = (*m / bc1, *v / bc2);
            // Decoupled decay: shrinks the weight directly, not through the gradient.
            *p -= lr * (mh / (vh.sqrt() + cfg.eps) + cfg.weight_decay * *p);
        });
        param.replace_data(p)
    }

    pub fn begin_step(&mut self) {
        self.step += 1;
    }
}

/// Global L2 norm of the gradients of `params`.
pub fn global_norm(grads: &Grads, params: &[&Tensor]) -> Result<f32> {
    let mut ss = 0.0f64;
    for p in params {
        if let Some(g) = grads.get(p) {
            ss += g.f32s()?.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        }
    }
    Ok(ss.sqrt() as f32)
}

/// The factor that brings a gradient of norm `norm` down to `max_norm` (1 when already below).
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 }
}

/// One optimizer step on every parameter of `model` that has a gradient in `grads` (by name):
/// clips by global norm, then AdamW. Returns the pre-clip norm. A non-finite norm is an error
/// and nothing is updated.
pub fn apply_gradients(
    model: &mut crate::model::Model,
    opt: &mut AdamW,
    cfg: &AdamWConfig,
    lr: f32,
    mut grads: std::collections::HashMap<String, Vec<f32>>,
    max_norm: f32,
) -> Result<f32> {
    let norm = grads.values().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
    ensure!(norm.is_finite(), "gradient norm is {norm}; stopping before the update, weights unchanged");
    let clip = clip_factor(norm, max_norm);
    opt.begin_step();
    let mut err = None;
    model.visit_mut(&mut |name, t| {
        if err.is_some() {
            return;
        }
        if let Some(mut g) = grads.remove(name) {
            if clip != 1.0 {
                g.iter_mut().for_each(|x| *x *= clip);
            }
            if let Err(e) = opt.update(cfg, lr, name, t, &g) {
                err = Some(e);
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    model.requires_grad();
    Ok(norm)
}
