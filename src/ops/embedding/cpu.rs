pub fn forward(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(ids.len() * dim);
    for &i in ids {
        let i = i as usize;
        y.extend_from_slice(&table[i * dim..(i + 1) * dim]);
    }
    y
}

/// Gradient of the table: rows of `grad` added at their ids (repeated ids accumulate).
pub fn backward(grad: &[f32], dim: usize, ids: &[u32], vocab: usize) -> Vec<f32> {
    let mut d = vec![0.0; vocab * dim];
    for (r, &i) in ids.iter().enumerate() {
        let i = i as usize;
        for (a, b) in d[i * dim..(i + 1) * dim].iter_mut().zip(&grad[r * dim..(r + 1) * dim]) {
            *a += b;
        }
    }
    d
}
