//! Reverse-mode autograd over a graph recorded in the tensors themselves.
//!
//! Each op result keeps an `Arc<dyn GradFn>` holding its inputs and whatever it saved for
//! backward. `backward` sorts the graph that reaches the loss topologically and runs the rules
//! in reverse, accumulating gradients per tensor id. Rules compute with plain ops while
//! recording is off, so the backward pass builds no graph of its own.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use anyhow::{ensure, Context, Result};

use crate::tensor::Tensor;

pub trait GradFn: Send + Sync {
    fn name(&self) -> &'static str;
    /// The op's tensor inputs, in the order `backward` returns their gradients.
    fn inputs(&self) -> Vec<Tensor>;
    /// Gradients of the inputs given the gradient of the output (`None`: no gradient flows).
    fn backward(&self, grad: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

pub fn is_enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// Runs `f` with graph recording off (inference, and inside backward rules).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let prev = ENABLED.with(|e| e.replace(false));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _r = Restore(prev);
    f()
}

/// Runs `f` with graph recording on, whatever the caller had (a checkpointed layer recomputes
/// its forward inside the backward pass, which otherwise runs with recording off).
pub fn with_grad<T>(f: impl FnOnce() -> T) -> T {
    let prev = ENABLED.with(|e| e.replace(true));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _r = Restore(prev);
    f()
}

/// Gradients by tensor id.
#[derive(Default)]
pub struct Grads {
    map: HashMap<usize, Tensor>,
}

impl Grads {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn accumulate(&mut self, id: usize, g: Tensor) -> Result<()> {
        match self.map.remove(&id) {
            None => {
                self.map.insert(id, g);
            }
            Some(prev) => {
                ensure!(
                    prev.shape() == g.shape(),
                    "gradient shapes disagree: {:?} vs {:?}",
                    prev.shape(),
                    g.shape()
                );
                if prev.device().is_gpu() || g.device().is_gpu() {
                    self.map.insert(id, crate::ops::device::accumulate(&prev, &g)?);
                    return Ok(());
                }
                let mut v = prev.to_vec();
                for (a, b) in v.iter_mut().zip(g.f32s()?) {
                    *a += b;
                }
                self.map.insert(id, Tensor::from_vec(v, g.shape())?);
            }
        }
        Ok(())
    }
}

/// Counts a device tensor's memory as a gradient ([`crate::backend::memory`]).
pub fn count_as_gradient(t: &Tensor) {
    if let Some(s) = t.gpu_storage() {
        s.buf.count_as(crate::backend::memory::Category::Gradients);
    }
}

/// Tensors reachable from `root` through grad_fn links, inputs before users.
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative DFS: graphs of deep models overflow the stack when walked recursively.
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(g) = t.grad_fn() {
            for i in g.inputs() {
                if i.tracks_grad() && !seen.contains(&i.id()) {
                    stack.push((i, false));
                }
            }
        }
    }
    order
}

impl Tensor {
    /// Gradients of this scalar with respect to every tensor it depends on.
    pub fn backward(&self) -> Result<Grads> {
        ensure!(self.numel() == 1, "backward needs a scalar, got shape {:?}", self.shape());
        self.backward_with(Tensor::from_vec_like(vec![1.0], self.shape(), self)?)
    }

    /// Backward from an explicit output gradient (shape of `self`).
    pub fn backward_with(&self, seed: Tensor) -> Result<Grads> {
        ensure!(seed.shape() == self.shape(), "seed gradient shape {:?} != {:?}", seed.shape(), self.shape());
        let order = topo_order(self);
        let mut grads = Grads::default();
        grads.map.insert(self.id(), seed);
        no_grad(|| {
            for t in order.iter().rev() {
                let Some(gf) = t.grad_fn() else { continue };
                let Some(g) = grads.map.get(&t.id()).cloned() else { continue };
                let inputs = gf.inputs();
                let gin = gf.backward(&g).with_context(|| format!("backward of {}", gf.name()))?;
                ensure!(
                    gin.len() == inputs.len(),
                    "{}: {} gradients for {} inputs",
                    gf.name(),
                    gin.len(),
                    inputs.len()
                );
                for (inp, gi) in inputs.iter().zip(gin) {
                    if let (true, Some(gi)) = (inp.tracks_grad(), gi) {
                        ensure!(
                            gi.shape() == inp.shape(),
                            "{}: gradient shape {:?} for input {:?}",
                            gf.name(),
                            gi.shape(),
                            inp.shape()
                        );
                        grads.accumulate(inp.id(), gi)?;
                        if inp.grad_fn().is_none() {
                            // A leaf's gradient (a parameter's) is counted as a gradient.
                            count_as_gradient(&grads.map[&inp.id()]);
                        }
                    }
                }
                // Intermediate gradients are not needed once passed on; leaves keep theirs.
                if t.grad_fn().is_some() {
                    grads.map.remove(&t.id());
                }
            }
            Ok(grads)
        })
    }
}
