//! GEMM through the `gemm` crate: row-major slices, optional transposes, optional accumulate.

use gemm::Parallelism;

/// A row-major matrix view: `rows × cols`, element (r, c) at `r * ld + c`, or transposed.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Read as its transpose (cols × rows).
    pub trans: bool,
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, trans: false }
    }
    pub fn t(self) -> Self {
        Mat { trans: !self.trans, ..self }
    }
    fn shape(&self) -> (usize, usize) {
        if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
    /// (column stride, row stride) of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.trans {
            (self.cols as isize, 1)
        } else {
            (1, self.cols as isize)
        }
    }
}

pub fn parallelism(work: usize) -> Parallelism {
    // Small products are faster on one thread than paying for a fork-join.
    if work < 1 << 15 || rayon::current_thread_index().is_some() {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `c = a·b` (or `c += a·b` when `accumulate`), c row-major `m × n`.
pub fn gemm(a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    assert_eq!(k, k2, "gemm inner dimensions differ");
    assert!(a.data.len() >= a.rows * a.cols && b.data.len() >= b.rows * b.cols);
    assert_eq!(c.len(), m * n, "gemm output size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let (a_cs, a_rs) = a.strides();
    let (b_cs, b_rs) = b.strides();
    // SAFETY: sizes checked above; gemm reads a and b and writes c within these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m * n * k),
        );
    }
}

/// Strided gemm for views inside larger buffers (attention heads): raw strides in elements.
/// c (m × n, row stride ldc) = [c +] a (m × k) · b (k × n).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        1.0,
        alpha,
        false,
        false,
        false,
        parallelism(m * n * k),
    );
}
