use rayon::prelude::*;

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / row.len() as f64;
    (1.0 / (ms + eps as f64).sqrt()) as f32
}

pub fn forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0.0; x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
        let r = inv_rms(xr, eps);
        for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
            *y = x * r * w;
        }
    });
    y
}

/// (dx, dw): with x̂ = x·r, dx = r·(g⊙w − x̂·mean(g⊙w⊙x̂)), dw = Σ_rows g⊙x̂.
pub fn backward(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut dx = vec![0.0; x.len()];
    let dw = dx
        .par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(g.par_chunks(d)))
        .fold(
            || vec![0.0f32; d],
            |mut dw, (dxr, (xr, gr))| {
                let r = inv_rms(xr, eps);
                let mut dot = 0.0f64;
                for i in 0..d {
                    let xh = xr[i] * r;
                    dw[i] += gr[i] * xh;
                    dot += (gr[i] * w[i] * xh) as f64;
                }
                let mean = (dot / d as f64) as f32;
                for i in 0..d {
                    dxr[i] = r * (gr[i] * w[i] - xr[i] * r * mean);
                }
                dw
            },
        )
        .reduce(|| vec![0.0f32; d], |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
            a
        });
    (dx, dw)
}
