//! AdamW with decoupled weight decay and bias correction, and clipping by global norm.
//!
//! On the cpu the moments are host vectors and the update runs in f32 on the parameters. On a
//! GPU device ([`AdamW::attach`]) every trainable parameter has f32 master weights and moments on
//! the device; one fused kernel per parameter applies clipping, AdamW and writes the new bf16
//! working copy the forward reads; the global norm comes from the sum-of-squares kernel.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use crate::autograd::Grads;
use crate::backend::storage::GpuStorage;
use crate::backend::{GpuBuffer, GpuDevice};
use crate::kernels::adamw::{adamw_step, AdamW as AdamWKernel};
use crate::kernels::cast::{cast, sum_squares};
use crate::model::Model;
use crate::ops::device::{accumulate, buf, kernel_dtype};
use crate::tensor::{DType, Device, Tensor};

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
#[derive(Debug, Default)]
pub struct AdamW {
    pub step: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
    /// Master weights and moments on a GPU device (see [`AdamW::attach`]); the host maps then
    /// hold only what is not on the device.
    pub device: Option<DeviceState>,
}

/// f32 master weights and moments of every parameter, on one GPU device.
#[derive(Debug)]
pub struct DeviceState {
    dev: GpuDevice,
    params: BTreeMap<String, DeviceParam>,
}

#[derive(Debug)]
struct DeviceParam {
    master: GpuBuffer,
    m: GpuBuffer,
    v: GpuBuffer,
    n: usize,
}

impl AdamW {
    /// One update of `param` (named `name`) with gradient `grad`, at learning rate `lr`.
    /// Call `begin_step` once per optimizer step before updating the parameters.
    pub fn update(
        &mut self,
        cfg: &AdamWConfig,
        lr: f32,
        name: &str,
        param: &mut Tensor,
        grad: &[f32],
    ) -> Result<()> {
        ensure!(
            grad.len() == param.numel(),
            "AdamW: gradient of `{name}` has {} values for {} parameters",
            grad.len(),
            param.numel()
        );
        let n = grad.len();
        let m = self.m.entry(name.to_string()).or_insert_with(|| vec![0.0; n]);
        let v = self.v.entry(name.to_string()).or_insert_with(|| vec![0.0; n]);
        let t = self.step.max(1) as i32;
        let (bc1, bc2) = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
        let mut p = param.to_vec();
        p.par_iter_mut().zip(m.par_iter_mut().zip(v.par_iter_mut())).zip(grad.par_iter()).for_each(
            |((p, (m, v)), &g)| {
                *m = cfg.beta1 * *m + (1.0 - cfg.beta1) * g;
                *v = cfg.beta2 * *v + (1.0 - cfg.beta2) * g * g;
                let (mh, vh) = (*m / bc1, *v / bc2);
                // Decoupled decay: shrinks the weight directly, not through the gradient.
                *p -= lr * (mh / (vh.sqrt() + cfg.eps) + cfg.weight_decay * *p);
            },
        );
        param.replace_data(p)
    }

    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Puts the f32 master weights of `model` (on the cpu, in f32: the exact weights, before the
    /// bf16 rounding of the device copy) and the moments on `device`. Moments loaded from a
    /// checkpoint move from the host maps to the device.
    pub fn attach(&mut self, model: &Model, device: Device) -> Result<()> {
        let dev = device.gpu()?;
        let mut params = BTreeMap::new();
        for (name, t) in model.trainable_params() {
            let n = t.numel();
            // The meta device has no values to copy (and a 7B plan no host memory to spare).
            let master = if dev.kind() == crate::backend::GpuKind::Meta {
                dev.alloc(n * 4)?
            } else {
                dev.upload_f32(&t.host_f32()?)?
            };
            let moment = |map: &mut BTreeMap<String, Vec<f32>>| -> Result<GpuBuffer> {
                match map.remove(&name) {
                    Some(x) => {
                        ensure!(
                            x.len() == n,
                            "optimizer state of `{name}` has {} values for {n} parameters",
                            x.len()
                        );
                        dev.upload_f32(&x)
                    }
                    None => dev.zeros(n * 4),
                }
            };
            let (m, v) = (moment(&mut self.m)?, moment(&mut self.v)?);
            params.insert(name, DeviceParam { master, m, v, n });
        }
        self.device = Some(DeviceState { dev, params });
        Ok(())
    }

    /// The master weights as an f32 cpu model (the structure of `model`) and the optimizer with
    /// every moment on the host: what a checkpoint stores. On the cpu: copies of both.
    pub fn host_state(&self, model: &Model) -> Result<(Model, AdamW)> {
        let mut host = model.to_device(Device::Cpu)?;
        let mut opt = AdamW { step: self.step, m: self.m.clone(), v: self.v.clone(), device: None };
        let Some(ds) = &self.device else { return Ok((host, opt)) };
        let mut err = None;
        host.visit_trainable_mut(&mut |name, t| {
            if let (None, Some(p)) = (&err, ds.params.get(name)) {
                if let Err(e) = p.master.download_f32().and_then(|w| t.replace_data(w)) {
                    err = Some(e);
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        for (name, p) in &ds.params {
            opt.m.insert(name.clone(), p.m.download_f32()?);
            opt.v.insert(name.clone(), p.v.download_f32()?);
        }
        Ok((host, opt))
    }
}

/// Gradient sums of one optimizer step, where the parameters live: host vectors by name on the
/// cpu (f64: exact for a few micro-batches, so the order of the sums, one rank's or several
/// ranks' all-reduced, does not change the update), f32 device tensors on a GPU.
pub enum StepGrads {
    Host(HashMap<String, Vec<f64>>),
    Device(BTreeMap<String, Tensor>),
}

impl StepGrads {
    /// Empty sums for parameters on `device`.
    pub fn on(device: Device) -> StepGrads {
        if device.is_cpu() {
            StepGrads::Host(HashMap::new())
        } else {
            StepGrads::Device(BTreeMap::new())
        }
    }

    /// Adds the gradient of every parameter of `params` that has one in `grads`.
    pub fn add(&mut self, params: &[(String, Tensor)], grads: &Grads) -> Result<()> {
        for (name, p) in params {
            let Some(g) = grads.get(p) else { continue };
            match self {
                StepGrads::Host(map) => {
                    let a = map.entry(name.clone()).or_insert_with(|| vec![0.0; p.numel()]);
                    for (x, &y) in a.iter_mut().zip(g.f32s()?.iter()) {
                        *x += f64::from(y);
                    }
                }
                StepGrads::Device(map) => {
                    let sum = match map.remove(name) {
                        None => g.clone(),
                        Some(prev) => accumulate(&prev, g)?,
                    };
                    crate::autograd::count_as_gradient(&sum);
                    map.insert(name.clone(), sum);
                }
            }
        }
        Ok(())
    }

    /// Sums the host gradients of every rank (parameters in name order, one collective); a
    /// parameter one rank has no gradient for counts as zeros there.
    pub fn all_reduce(
        &mut self,
        d: &mut dyn crate::dist::collective::Collective,
        params: &[(String, Tensor)],
    ) -> Result<()> {
        let StepGrads::Host(map) = self else {
            bail!(
                "data parallelism on a GPU device needs the NCCL backend, which is not built yet (issue 31)"
            )
        };
        let mut names: Vec<(&String, usize)> = params.iter().map(|(n, t)| (n, t.numel())).collect();
        names.sort();
        let mut flat = Vec::with_capacity(names.iter().map(|x| x.1).sum());
        for (n, len) in &names {
            match map.get(*n) {
                Some(g) => flat.extend_from_slice(g),
                None => flat.extend(std::iter::repeat_n(0.0, *len)),
            }
        }
        d.all_reduce_sum_f64(&mut flat)?;
        let mut at = 0;
        for (n, len) in names {
            let g = &flat[at..at + len];
            // A parameter no rank has a gradient for stays out (it takes no optimizer step).
            if map.contains_key(n) || g.iter().any(|&x| x != 0.0) {
                map.insert(n.clone(), g.to_vec());
            }
            at += len;
        }
        Ok(())
    }

    /// Global L2 norm (on a GPU: the sum-of-squares kernel, one float downloaded).
    pub fn norm(&self) -> Result<f32> {
        match self {
            StepGrads::Host(map) => Ok(map
                .values()
                .flat_map(|g| g.iter())
                .map(|&x| (x as f32 as f64).powi(2))
                .sum::<f64>()
                .sqrt() as f32),
            StepGrads::Device(map) => {
                let Some(first) = map.values().next() else { return Ok(0.0) };
                let dev = first.gpu_storage().context("device gradients")?.device().clone();
                let out = dev.zeros(4)?;
                for (i, g) in map.values().enumerate() {
                    let g = g.to_dtype(kernel_dtype(g))?;
                    sum_squares(&dev, buf(&g), g.dtype(), g.numel(), &out, i > 0)?;
                }
                Ok(out.download_f32()?[0].sqrt())
            }
        }
    }
}

/// One optimizer step with `grads`: [`apply_gradients`] on the cpu, the fused device update on a
/// GPU. Returns the pre-clip norm.
pub fn apply_step(
    model: &mut Model,
    opt: &mut AdamW,
    cfg: &AdamWConfig,
    lr: f32,
    grads: StepGrads,
    max_norm: f32,
) -> Result<f32> {
    match grads {
        StepGrads::Host(map) => {
            let map = map.into_iter().map(|(n, g)| (n, g.into_iter().map(|x| x as f32).collect())).collect();
            apply_gradients(model, opt, cfg, lr, map, max_norm)
        }
        StepGrads::Device(map) => {
            apply_gradients_device(model, opt, cfg, lr, StepGrads::Device(map), max_norm)
        }
    }
}

/// [`apply_gradients`] on a GPU device: the norm from the sum-of-squares kernel (a non-finite norm
/// is an error and nothing changes), then per parameter one fused kernel: gradient × clip factor,
/// AdamW on the f32 master weights and moments, and the new bf16 working copy, which replaces the
/// parameter's storage.
fn apply_gradients_device(
    model: &mut Model,
    opt: &mut AdamW,
    cfg: &AdamWConfig,
    lr: f32,
    grads: StepGrads,
    max_norm: f32,
) -> Result<f32> {
    let norm = grads.norm()?;
    ensure!(norm.is_finite(), "gradient norm is {norm}; stopping before the update, weights unchanged");
    let StepGrads::Device(mut grads) = grads else { bail!("device gradients expected") };
    let clip = clip_factor(norm, max_norm);
    opt.begin_step();
    let step = u32::try_from(opt.step).context("optimizer step count")?;
    let ds = opt
        .device
        .as_ref()
        .context("the optimizer has no device state: call AdamW::attach after loading the model")?;
    let h = AdamWKernel {
        lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        step,
        grad_scale: clip,
    };
    let mut err = None;
    model.visit_trainable_mut(&mut |name, t| {
        if err.is_some() {
            return;
        }
        if let Some(g) = grads.remove(name) {
            if let Err(e) = device_update(ds, &h, name, t, &g) {
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

/// The fused AdamW update of one parameter; `t` gets the new working copy in its dtype.
fn device_update(ds: &DeviceState, h: &AdamWKernel, name: &str, t: &mut Tensor, g: &Tensor) -> Result<()> {
    let p = ds.params.get(name).with_context(|| format!("no master weights for `{name}` on the device"))?;
    ensure!(
        g.numel() == p.n && t.numel() == p.n,
        "AdamW: gradient of `{name}` has {} values for {} parameters",
        g.numel(),
        p.n
    );
    let g = g.to_dtype(kernel_dtype(g))?;
    let dtype = t.dtype();
    let copy = GpuStorage::uninit(&ds.dev, dtype, p.n)?;
    let bf16_copy = (dtype == DType::BF16).then_some(&copy.buf);
    adamw_step(&ds.dev, h, &p.master, &p.m, &p.v, buf(&g), g.dtype(), bf16_copy, p.n)?;
    if bf16_copy.is_none() {
        cast(&ds.dev, &p.master, DType::F32, &copy.buf, dtype, p.n)?;
    }
    t.replace_gpu(copy)
}

/// The factor that brings a gradient of norm `norm` down to `max_norm` (1 when already below).
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
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
    let norm =
        grads.values().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32;
    ensure!(norm.is_finite(), "gradient norm is {norm}; stopping before the update, weights unchanged");
    let clip = clip_factor(norm, max_norm);
    opt.begin_step();
    let mut err = None;
    model.visit_trainable_mut(&mut |name, t| {
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
