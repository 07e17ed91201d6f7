//! Dequantization of ggml blocks to f32, in ggml's exact block layouts (ggml-common.h): each
//! block holds 32 weights with f16 scales; `d * q + m` is computed in f32 in the same order as
//! ggml and gguf-py, so the values are bit-identical to theirs.

use half::{bf16, f16};

use super::types::GgmlType;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `bytes` (exactly the tensor's data, as located by the parser) into `out`, whose
/// length is the tensor's element count. Panics only on a type without a layout, which the
/// caller rules out first.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks(bytes, 18, out, q4_0),
        GgmlType::Q4_1 => blocks(bytes, 20, out, q4_1),
        GgmlType::Q5_0 => blocks(bytes, 22, out, q5_0),
        GgmlType::Q5_1 => blocks(bytes, 24, out, q5_1),
        GgmlType::Q8_0 => blocks(bytes, 34, out, q8_0),
        other => unreachable!("dequantize called on {other}, which has no layout"),
    }
}

fn blocks(bytes: &[u8], size: usize, out: &mut [f32], f: fn(&[u8], &mut [f32])) {
    for (b, o) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(32)) {
        f(b, o);
    }
}

/// `{ f16 d; u8 qs[16] }`: low nibbles are weights 0..16, high nibbles 16..32, offset by 8.
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `{ f16 d; f16 m; u8 qs[16] }`: `q * d + m`.
fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        o[j] = (q & 0x0f) as f32 * d + m;
        o[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The fifth bit of weights j and j + 16 from the 32-bit `qh`.
fn high_bits(qh: u32, j: usize) -> (u8, u8) {
    ((((qh >> j) << 4) & 0x10) as u8, ((qh >> (j + 12)) & 0x10) as u8)
}

/// `{ f16 d; u8 qh[4]; u8 qs[16] }`: 5-bit weights offset by 16.
fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let (h0, h1) = high_bits(qh, j);
        o[j] = (((q & 0x0f) | h0) as i32 - 16) as f32 * d;
        o[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// `{ f16 d; f16 m; u8 qh[4]; u8 qs[16] }`: 5-bit `q * d + m`.
fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let (h0, h1) = high_bits(qh, j);
        o[j] = ((q & 0x0f) | h0) as f32 * d + m;
        o[j + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

/// `{ f16 d; i8 qs[32] }`.
fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        o[j] = q as i8 as f32 * d;
    }
}
