//! Tensor: a shape, a dtype and contiguous row-major storage on a device, plus the autograd
//! link (`grad_fn`) that records how it was made.
//!
//! Tensors are immutable values: ops make new tensors, `reshape` shares storage. The few
//! places that update in place (optimizer steps) go through `Tensor::replace_data` on a leaf.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::borrow::Cow;

use anyhow::{bail, ensure, Context, Result};

use crate::autograd::{self, GradFn};
use crate::backend::storage::GpuStorage;
pub use crate::device::Device;
pub use crate::dtype::DType;
pub use crate::storage::CpuStorage;

#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Gpu(GpuStorage),
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Gpu(s) => s.device().tag(),
        }
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static ROUND_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the output of every cpu op that a GPU stores in bf16 rounded to bf16 (round to
/// nearest even): the GPU path computes each op in f32 and stores its result in bf16, so this is
/// a cpu simulation of that rounding (not of the kernels' summation order). Tests use it to size
/// their bf16 tolerances per model; nothing else does. Affects only the calling thread.
pub fn with_bf16_rounding<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            ROUND_BF16.with(|r| r.set(self.0));
        }
    }
    let _reset = Reset(ROUND_BF16.with(|r| r.replace(true)));
    f()
}

pub(crate) struct Inner {
    pub(crate) id: usize,
    pub(crate) storage: Arc<Storage>,
    pub(crate) shape: Vec<usize>,
    pub(crate) grad_fn: Option<Arc<dyn GradFn>>,
    pub(crate) requires_grad: bool,
}

#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor(id={}, shape={:?}, dtype={:?}", self.id(), self.shape(), self.dtype())?;
        if let Some(g) = &self.0.grad_fn {
            write!(f, ", grad_fn={}", g.name())?;
        }
        write!(f, ")")
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    fn make(
        storage: Arc<Storage>,
        shape: Vec<usize>,
        grad_fn: Option<Arc<dyn GradFn>>,
        requires_grad: bool,
    ) -> Tensor {
        Tensor(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            storage,
            shape,
            grad_fn,
            requires_grad,
        }))
    }

    pub fn from_storage(storage: CpuStorage, shape: &[usize]) -> Result<Tensor> {
        ensure!(
            storage.len() == numel(shape),
            "data has {} elements but shape {:?} needs {}",
            storage.len(),
            shape,
            numel(shape)
        );
        Ok(Self::make(Arc::new(Storage::Cpu(storage)), shape.to_vec(), None, false))
    }

    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Self::from_storage(CpuStorage::F32(data), shape)
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Self::from_vec(vec![0.0; numel(shape)], shape).unwrap()
    }

    pub fn scalar(x: f32) -> Tensor {
        Self::from_vec(vec![x], &[]).unwrap()
    }

    /// A result of an op: records `grad_fn` when autograd is on and an input tracks gradients.
    /// Under [`with_bf16_rounding`] the values are rounded to bf16, as a GPU stores them.
    pub(crate) fn from_op(mut data: Vec<f32>, shape: &[usize], grad_fn: Option<Arc<dyn GradFn>>) -> Tensor {
        if ROUND_BF16.with(|r| r.get()) {
            data.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
        Self::from_op_f32(data, shape, grad_fn)
    }

    /// [`Tensor::from_op`] for ops whose GPU output is f32 whatever the compute dtype (log-probs,
    /// losses): never rounded.
    pub(crate) fn from_op_f32(data: Vec<f32>, shape: &[usize], grad_fn: Option<Arc<dyn GradFn>>) -> Tensor {
        debug_assert_eq!(data.len(), numel(shape));
        let grad_fn =
            grad_fn.filter(|g| autograd::is_enabled() && g.inputs().iter().any(|t| t.tracks_grad()));
        let tracks = grad_fn.is_some();
        Self::make(Arc::new(Storage::Cpu(CpuStorage::F32(data))), shape.to_vec(), grad_fn, tracks)
    }

    /// A tensor holding device storage (a leaf).
    pub fn from_gpu(storage: GpuStorage, shape: &[usize]) -> Result<Tensor> {
        ensure!(
            storage.len == numel(shape),
            "device data has {} elements but shape {:?} needs {}",
            storage.len,
            shape,
            numel(shape)
        );
        Ok(Self::make(Arc::new(Storage::Gpu(storage)), shape.to_vec(), None, false))
    }

    /// [`Tensor::from_op`] for a result on a GPU device.
    pub(crate) fn from_gpu_op(
        storage: GpuStorage,
        shape: &[usize],
        grad_fn: Option<Arc<dyn GradFn>>,
    ) -> Tensor {
        debug_assert_eq!(storage.len, numel(shape));
        let grad_fn =
            grad_fn.filter(|g| autograd::is_enabled() && g.inputs().iter().any(|t| t.tracks_grad()));
        let tracks = grad_fn.is_some();
        Self::make(Arc::new(Storage::Gpu(storage)), shape.to_vec(), grad_fn, tracks)
    }

    /// The same data (shared storage) as the result of an op with `grad_fn`.
    pub(crate) fn with_grad_fn(&self, grad_fn: Option<Arc<dyn GradFn>>) -> Tensor {
        let grad_fn =
            grad_fn.filter(|g| autograd::is_enabled() && g.inputs().iter().any(|t| t.tracks_grad()));
        let tracks = grad_fn.is_some();
        Self::make(self.0.storage.clone(), self.0.shape.clone(), grad_fn, tracks)
    }

    /// f32 `data` on the device of `like` (the same GPU handle), or on the cpu.
    pub fn from_vec_like(data: Vec<f32>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
        let t = Self::from_vec(data, shape)?;
        match like.gpu_storage() {
            None => Ok(t),
            Some(g) => Self::from_gpu(GpuStorage::from_cpu(g.device(), t.cpu_storage()?)?, shape),
        }
    }

    pub fn id(&self) -> usize {
        self.0.id
    }

    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    pub fn dims(&self) -> usize {
        self.0.shape.len()
    }

    pub fn dim(&self, i: usize) -> usize {
        self.0.shape[i]
    }

    pub fn numel(&self) -> usize {
        numel(&self.0.shape)
    }

    pub fn device(&self) -> Device {
        self.0.storage.device()
    }

    pub fn dtype(&self) -> DType {
        match &*self.0.storage {
            Storage::Cpu(s) => s.dtype(),
            Storage::Gpu(s) => s.dtype,
        }
    }

    /// The device storage, when the tensor is on a GPU device.
    pub fn gpu_storage(&self) -> Option<&GpuStorage> {
        match &*self.0.storage {
            Storage::Gpu(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.0.storage
    }

    pub fn grad_fn(&self) -> Option<&Arc<dyn GradFn>> {
        self.0.grad_fn.as_ref()
    }

    /// True for a leaf parameter or anything computed from one while autograd was on.
    pub fn tracks_grad(&self) -> bool {
        self.0.requires_grad
    }

    /// A leaf that collects gradients (a trainable parameter).
    pub fn requires_grad(self) -> Tensor {
        Self::make(self.0.storage.clone(), self.0.shape.clone(), None, true)
    }

    /// Same data, cut from the graph.
    pub fn detach(&self) -> Tensor {
        Self::make(self.0.storage.clone(), self.0.shape.clone(), None, false)
    }

    /// f32 data on the CPU. Errors for other dtypes: CPU ops compute in f32 only.
    pub fn f32s(&self) -> Result<&[f32]> {
        match &*self.0.storage {
            Storage::Cpu(s) => match s.as_f32() {
                Some(v) => Ok(v),
                None => bail!("expected an f32 tensor, got {:?}", s.dtype()),
            },
            Storage::Gpu(_) => bail!(
                "expected a tensor on the cpu, this one is on {} (download it with to_device or to_vec)",
                self.device()
            ),
        }
    }

    /// The values as f32 on the host: borrowed for a cpu f32 tensor, else converted or
    /// downloaded.
    pub fn host_f32(&self) -> Result<Cow<'_, [f32]>> {
        Ok(match &*self.0.storage {
            Storage::Cpu(s) => match s.as_f32() {
                Some(v) => Cow::Borrowed(v),
                None => Cow::Owned(s.to_f32_vec()),
            },
            Storage::Gpu(s) => Cow::Owned(s.to_f32_vec().with_context(|| {
                format!("downloading a tensor of shape {:?} from {}", self.shape(), self.device())
            })?),
        })
    }

    /// The values as f32 on the host (downloaded from a GPU device).
    ///
    /// # Panics
    /// When a download from the device fails (use [`Tensor::host_f32`] to get the error).
    pub fn to_vec(&self) -> Vec<f32> {
        match &*self.0.storage {
            Storage::Cpu(s) => s.to_f32_vec(),
            Storage::Gpu(_) => self.host_f32().map(Cow::into_owned).unwrap_or_else(|e| panic!("{e:#}")),
        }
    }

    pub fn to_scalar(&self) -> Result<f32> {
        ensure!(self.numel() == 1, "to_scalar on a tensor of shape {:?}", self.shape());
        Ok(self.host_f32()?[0])
    }

    /// Host storage; an error for a tensor on a GPU device (see [`Tensor::to_device`]).
    pub fn cpu_storage(&self) -> Result<&CpuStorage> {
        match &*self.0.storage {
            Storage::Cpu(s) => Ok(s),
            Storage::Gpu(_) => bail!("expected a tensor on the cpu, this one is on {}", self.device()),
        }
    }

    /// A copy in `dtype` on the same device (cast kernels on a GPU). Cut from the graph; a
    /// trainable leaf stays one.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let s = match &*self.0.storage {
            Storage::Cpu(s) => Storage::Cpu(s.to_dtype(dtype)),
            Storage::Gpu(s) => Storage::Gpu(s.to_dtype(dtype)?),
        };
        Ok(Self::make(
            Arc::new(s),
            self.0.shape.clone(),
            None,
            self.0.requires_grad && self.0.grad_fn.is_none(),
        ))
    }

    /// A copy on `device`, same dtype (uploads, downloads, or both between two GPUs). Cut from
    /// the graph; a trainable leaf stays one.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let host;
        let cpu = match &*self.0.storage {
            Storage::Cpu(s) => s,
            Storage::Gpu(s) => {
                host = s.to_cpu().with_context(|| format!("downloading from {}", self.device()))?;
                &host
            }
        };
        let s = match device {
            Device::Cpu => Storage::Cpu(cpu.clone()),
            gpu => Storage::Gpu(
                GpuStorage::from_cpu(&gpu.gpu()?, cpu).with_context(|| format!("uploading to {gpu}"))?,
            ),
        };
        Ok(Self::make(
            Arc::new(s),
            self.0.shape.clone(),
            None,
            self.0.requires_grad && self.0.grad_fn.is_none(),
        ))
    }

    /// Same data under a new shape (one dimension may be `usize::MAX` to infer it).
    /// Shares storage; gradients flow through.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let shape = infer_shape(shape, self.numel())?;
        let grad_fn: Option<Arc<dyn GradFn>> = if self.tracks_grad() && autograd::is_enabled() {
            Some(Arc::new(ReshapeBack { input: self.clone() }))
        } else {
            None
        };
        let tracks = grad_fn.is_some();
        Ok(Self::make(self.0.storage.clone(), shape, grad_fn, tracks))
    }

    /// New values for a leaf, keeping its identity as a parameter (optimizer updates). On a GPU
    /// device they are uploaded in the tensor's dtype.
    pub fn replace_data(&mut self, data: Vec<f32>) -> Result<()> {
        ensure!(
            data.len() == self.numel(),
            "replace_data: {} values for shape {:?}",
            data.len(),
            self.shape()
        );
        let requires_grad = self.0.requires_grad;
        let storage = match &*self.0.storage {
            Storage::Cpu(_) => Storage::Cpu(CpuStorage::F32(data)),
            Storage::Gpu(g) => {
                Storage::Gpu(GpuStorage::from_cpu(g.device(), &CpuStorage::F32(data).to_dtype(g.dtype))?)
            }
        };
        *self = Self::make(Arc::new(storage), self.0.shape.clone(), None, requires_grad);
        Ok(())
    }

    /// New device storage for a leaf (the fused optimizer writes the updated bf16 weights).
    pub(crate) fn replace_gpu(&mut self, storage: GpuStorage) -> Result<()> {
        ensure!(
            storage.len == self.numel(),
            "replace_gpu: {} values for shape {:?}",
            storage.len,
            self.shape()
        );
        let requires_grad = self.0.requires_grad;
        *self = Self::make(Arc::new(Storage::Gpu(storage)), self.0.shape.clone(), None, requires_grad);
        Ok(())
    }
}

fn infer_shape(shape: &[usize], n: usize) -> Result<Vec<usize>> {
    let unknown = shape.iter().filter(|&&d| d == usize::MAX).count();
    ensure!(unknown <= 1, "reshape: at most one inferred dimension");
    let known: usize = shape.iter().filter(|&&d| d != usize::MAX).product();
    let mut out = shape.to_vec();
    if unknown == 1 {
        ensure!(
            known > 0 && n % known == 0,
            "reshape: cannot infer a dimension of {:?} for {} elements",
            shape,
            n
        );
        for d in out.iter_mut() {
            if *d == usize::MAX {
                *d = n / known;
            }
        }
    }
    ensure!(numel(&out) == n, "reshape: shape {:?} does not hold {} elements", out, n);
    Ok(out)
}

struct ReshapeBack {
    input: Tensor,
}

impl GradFn for ReshapeBack {
    fn name(&self) -> &'static str {
        "reshape"
    }
    fn inputs(&self) -> Vec<Tensor> {
        vec![self.input.clone()]
    }
    fn backward(&self, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.reshape(self.input.shape())?)])
    }
}
