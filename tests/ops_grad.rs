//! Every op: forward against a naive f64 reference, backward against finite differences, on the
//! cpu and (the same backward rules, device arm) on the emu device.

use fcgpu::ops::{
    self,
    gradcheck::{check, check_device, rand_tensor, rand_vec, to_device},
    RopeTable,
};
use fcgpu::{Device, Tensor};

/// `#[test]`s running a check `fn(Device)` on the cpu and on emu.
macro_rules! cpu_and_emu {
    ($($check:ident => $cpu:ident, $emu:ident;)*) => {
        $(
            #[test]
            fn $cpu() {
                $check(Device::Cpu);
            }
            #[test]
            fn $emu() {
                $check(Device::Emu);
            }
        )*
    };
}

cpu_and_emu! {
    linear_grad_on => linear_grad, linear_grad_emu;
    matmul_grad_on => matmul_grad, matmul_grad_emu;
    elementwise_grads_on => elementwise_grads, elementwise_grads_emu;
    embedding_grad_on => embedding_grad_accumulates_repeated_ids, embedding_grad_accumulates_repeated_ids_emu;
    rms_norm_grad_on => rms_norm_grad, rms_norm_grad_emu;
    swiglu_grad_on => swiglu_grad, swiglu_grad_emu;
    rope_grad_on => rope_grad_and_norm_preserved, rope_grad_and_norm_preserved_emu;
    logprob_entropy_grad_on => logprob_entropy_grad, logprob_entropy_grad_emu;
}

/// Random trainable tensors of `shapes` on `dev` (seeds `seed`, `seed + 1`, ...).
fn inputs(dev: Device, shapes: &[&[usize]], seed: u64) -> Vec<Tensor> {
    let ts: Vec<Tensor> = shapes.iter().zip(seed..).map(|(s, i)| rand_tensor(s, i)).collect();
    to_device(&ts, dev).unwrap()
}

const EPS: f32 = 1e-2;
const TOL: f32 = 2e-2;

fn linear_grad_on(dev: Device) {
    let xwb = inputs(dev, &[&[3, 5], &[4, 5], &[4]], 1);
    check(|t| ops::linear(&t[0], &t[1], Some(&t[2])), &xwb, EPS, TOL, 64).unwrap();
}

#[test]
fn linear_forward_matches_naive() {
    let x = rand_tensor(&[7, 9], 4);
    let w = rand_tensor(&[5, 9], 5);
    let y = ops::linear(&x, &w, None).unwrap().to_vec();
    let (xv, wv) = (x.to_vec(), w.to_vec());
    for r in 0..7 {
        for o in 0..5 {
            let e: f32 = (0..9).map(|i| xv[r * 9 + i] * wv[o * 9 + i]).sum();
            assert!((y[r * 5 + o] - e).abs() < 1e-5);
        }
    }
}

fn matmul_grad_on(dev: Device) {
    let ab = inputs(dev, &[&[2, 3, 4], &[2, 4, 5]], 6);
    check(|t| ops::matmul(&t[0], &t[1]), &ab, EPS, TOL, 64).unwrap();
}

fn elementwise_grads_on(dev: Device) {
    let [a, b] = <[Tensor; 2]>::try_from(inputs(dev, &[&[2, 6], &[2, 6]], 8)).unwrap();
    check(|t| ops::add(&t[0], &t[1]), &[a.clone(), b.clone()], EPS, TOL, 64).unwrap();
    check(|t| ops::mul(&t[0], &t[1]), &[a.clone(), b.clone()], EPS, TOL, 64).unwrap();
    check(|t| ops::scale(&t[0], -1.7), &[a.clone()], EPS, TOL, 64).unwrap();
    check(|t| ops::narrow(&t[0], 1, 2, 3), &[a.clone()], EPS, TOL, 64).unwrap();
    check(|t| ops::sum(&ops::mul(&t[0], &t[1])?), &[a, b], EPS, TOL, 64).unwrap();
}

fn embedding_grad_on(dev: Device) {
    let table = inputs(dev, &[&[5, 3]], 10).remove(0);
    let ids = [1u32, 4, 1, 0];
    check(|t| ops::embedding(&t[0], &ids), &[table.clone()], EPS, TOL, 64).unwrap();
    assert!(ops::embedding(&table, &[5]).is_err(), "id outside the vocabulary must be an error");
}

fn rms_norm_grad_on(dev: Device) {
    let xw = inputs(dev, &[&[4, 8], &[8]], 11);
    check(|t| ops::rms_norm(&t[0], &t[1], 1e-6), &xw, EPS, TOL, 64).unwrap();
}

fn swiglu_grad_on(dev: Device) {
    let gu = inputs(dev, &[&[3, 7], &[3, 7]], 13);
    check(|t| ops::swiglu(&t[0], &t[1]), &gu, EPS, TOL, 64).unwrap();
}

fn rope_grad_on(dev: Device) {
    let table = RopeTable::new(8, 10000.0, None);
    let x = inputs(dev, &[&[3, 2, 8]], 15).remove(0);
    let pos = [0u32, 5, 17];
    check(|t| ops::rope(&t[0], &pos, &table), &[x.clone()], EPS, TOL, 64).unwrap();
    let y = ops::rope(&x, &pos, &table).unwrap().to_vec();
    let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
    assert!((n(&y) - n(&x.to_vec())).abs() < 1e-4, "rotation must keep the norm");
    assert_eq!(&y[..16], &x.to_vec()[..16], "position 0 is the identity");
}

/// Naive causal GQA attention in f64 for one packed batch.
fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    hq: usize,
    hkv: usize,
    d: usize,
    seqs: &[(usize, usize)],
) -> Vec<f64> {
    let mut out = vec![0.0; q.len()];
    let scale = 1.0 / (d as f64).sqrt();
    for &(s, l) in seqs {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            for i in 0..l {
                let qi = &q[(s + i) * hq * d + h * d..][..d];
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d).map(|c| qi[c] as f64 * k[(s + j) * hkv * d + kh * d + c] as f64).sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for c in 0..d {
                    out[(s + i) * hq * d + h * d + c] = (0..=i)
                        .map(|j| (sc[j] - m).exp() / z * v[(s + j) * hkv * d + kh * d + c] as f64)
                        .sum();
                }
            }
        }
    }
    out
}

#[test]
fn attention_forward_matches_naive_across_blocks() {
    // 70 and 1 tokens: crosses the 64-row query block and covers a length-1 sequence.
    let (hq, hkv, d) = (4, 2, 8);
    let seqs = [(0, 70), (70, 1), (71, 5)];
    let n = 76;
    let q = rand_tensor(&[n, hq, d], 16);
    let k = rand_tensor(&[n, hkv, d], 17);
    let v = rand_tensor(&[n, hkv, d], 18);
    let y = ops::attention(&q, &k, &v, &seqs).unwrap().to_vec();
    let e = naive_attention(&q.to_vec(), &k.to_vec(), &v.to_vec(), hq, hkv, d, &seqs);
    let err = y.iter().zip(&e).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-5, "max error {err}");
}

#[test]
fn attention_grad() {
    let seqs = [(0, 5), (5, 1), (6, 3)];
    let q = rand_tensor(&[9, 4, 4], 19);
    let k = rand_tensor(&[9, 2, 4], 20);
    let v = rand_tensor(&[9, 2, 4], 21);
    check(|t| ops::attention(&t[0], &t[1], &t[2], &seqs), &[q, k, v], EPS, TOL, 200).unwrap();
}

/// On emu the flash kernels compute in bf16, too coarse for finite differences: the device
/// gradients are held to the cpu's, which `attention_grad` holds to finite differences.
#[test]
fn attention_grad_emu() {
    let seqs = [(0, 5), (5, 1), (6, 3)];
    let q = rand_tensor(&[9, 4, 4], 19);
    let k = rand_tensor(&[9, 2, 4], 20);
    let v = rand_tensor(&[9, 2, 4], 21);
    check_device(|t| ops::attention(&t[0], &t[1], &t[2], &seqs), &[q, k, v], Device::Emu, 3e-2).unwrap();
}

#[test]
fn attention_grad_long_sequence() {
    let seqs = [(0, 67)];
    let q = rand_tensor(&[67, 2, 4], 22);
    let k = rand_tensor(&[67, 1, 4], 23);
    let v = rand_tensor(&[67, 1, 4], 24);
    check(|t| ops::attention(&t[0], &t[1], &t[2], &seqs), &[q, k, v], EPS, TOL, 60).unwrap();
}

#[test]
fn logprob_entropy_matches_full_softmax() {
    // 70 rows: more than one chunk of 64; vocabulary not a round number.
    let (n, hid, v, t) = (70, 6, 37, 0.7f32);
    let h = rand_tensor(&[n, hid], 25);
    let w = rand_tensor(&[v, hid], 26);
    let targets: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
    let out = ops::linear_logprob_entropy(&h, &w, &targets, t).unwrap().to_vec();
    let (hv, wv) = (h.to_vec(), w.to_vec());
    for r in 0..n {
        let z: Vec<f64> = (0..v)
            .map(|o| {
                (0..hid).map(|i| hv[r * hid + i] as f64 * wv[o * hid + i] as f64).sum::<f64>() / t as f64
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lz = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let ent: f64 = -z.iter().map(|x| (x - lz).exp() * (x - lz)).sum::<f64>();
        assert!((out[r] as f64 - (z[targets[r] as usize] - lz)).abs() < 1e-5);
        assert!((out[n + r] as f64 - ent).abs() < 1e-5);
    }
}

#[test]
fn logprob_chunked_equals_row_by_row() {
    // A vocabulary large enough for several 64-row chunks (backward recomputes their logits),
    // against one-row calls (one chunk each, backward reusing forward's logits).
    let (n, hid, v) = (130, 4, 70_001);
    let h = rand_tensor(&[n, hid], 41);
    let w = rand_tensor(&[v, hid], 42);
    let targets: Vec<u32> = (0..n).map(|i| (i * 7919 % v) as u32).collect();
    let gw = fcgpu::ops::gradcheck::rand_vec(2 * n, 43);
    let out = ops::linear_logprob_entropy(&h, &w, &targets, 0.9).unwrap();
    let grads = ops::weighted_sum(&out, &gw).unwrap().backward().unwrap();
    let (dh, dw) = (grads.get(&h).unwrap().to_vec(), grads.get(&w).unwrap().to_vec());
    let (hv, outv) = (h.to_vec(), out.to_vec());
    let mut dw_rows = vec![0.0f64; v * hid];
    for r in 0..n {
        let hr = Tensor::from_vec(hv[r * hid..(r + 1) * hid].to_vec(), &[1, hid]).unwrap().requires_grad();
        let o = ops::linear_logprob_entropy(&hr, &w, &targets[r..r + 1], 0.9).unwrap();
        let ov = o.to_vec();
        assert!((ov[0] - outv[r]).abs() < 1e-5 && (ov[1] - outv[n + r]).abs() < 1e-5, "row {r} forward");
        let g = ops::weighted_sum(&o, &[gw[r], gw[n + r]]).unwrap().backward().unwrap();
        for (a, b) in g.get(&hr).unwrap().to_vec().iter().zip(&dh[r * hid..(r + 1) * hid]) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "row {r} dh: {a} vs {b}");
        }
        for (acc, x) in dw_rows.iter_mut().zip(g.get(&w).unwrap().to_vec()) {
            *acc += x as f64;
        }
    }
    let err = dw.iter().zip(&dw_rows).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(err < 1e-5, "dW max error {err}");
}

fn logprob_entropy_grad_on(dev: Device) {
    let hw = inputs(dev, &[&[5, 4], &[11, 4]], 27);
    let targets = [3u32, 0, 10, 3, 7];
    check(|t| ops::linear_logprob_entropy(&t[0], &t[1], &targets, 0.8), &hw, EPS, TOL, 64).unwrap();
}

#[test]
fn autograd_accumulates_shared_inputs_and_detach_stops() {
    let a = rand_tensor(&[4], 29);
    let y = ops::sum(&ops::mul(&a, &a).unwrap()).unwrap();
    let g = y.backward().unwrap();
    let expect: Vec<f32> = a.to_vec().iter().map(|x| 2.0 * x).collect();
    for (x, e) in g.get(&a).unwrap().to_vec().iter().zip(&expect) {
        assert!((x - e).abs() < 1e-6);
    }
    let y2 = ops::sum(&ops::mul(&a, &a.detach()).unwrap()).unwrap();
    let g2 = y2.backward().unwrap();
    for (x, e) in g2.get(&a).unwrap().to_vec().iter().zip(&a.to_vec()) {
        assert!((x - e).abs() < 1e-6);
    }
    let _ = rand_vec(1, 0);
    assert!(Tensor::from_vec(vec![1.0; 3], &[2, 2]).is_err());
}

/// A shared-prefix layout and the same sequences unshared: `groups` of (prefix length,
/// dependants' lengths), then plain sequences. Unshared, the prefix stands alone and each
/// dependant is `prefix ++ dependant`; `map[u]` is the shared row of unshared row `u`, and `keep[u]`
/// says whether `u`'s output is the one its shared row must equal (the prefix alone, each
/// dependant's own rows), so the shared gradient is the unshared one summed over `map`.
struct SharedCase {
    seqs: Vec<(usize, usize)>,
    prefix: Vec<Option<usize>>,
    useqs: Vec<(usize, usize)>,
    map: Vec<usize>,
    keep: Vec<bool>,
}

fn shared_case(groups: &[(usize, &[usize])], plain: &[usize]) -> SharedCase {
    let mut c = SharedCase { seqs: vec![], prefix: vec![], useqs: vec![], map: vec![], keep: vec![] };
    let mut n = 0;
    let useq = |c: &mut SharedCase, rows: Vec<(usize, bool)>| {
        c.useqs.push((c.map.len(), rows.len()));
        for (r, k) in rows {
            c.map.push(r);
            c.keep.push(k);
        }
    };
    for &(pl, kids) in groups {
        let p = c.seqs.len();
        c.seqs.push((n, pl));
        c.prefix.push(None);
        let prows: Vec<usize> = (n..n + pl).collect();
        useq(&mut c, prows.iter().map(|&r| (r, true)).collect());
        n += pl;
        for &l in kids {
            c.seqs.push((n, l));
            c.prefix.push(Some(p));
            let rows = prows.iter().map(|&r| (r, false)).chain((n..n + l).map(|r| (r, true))).collect();
            useq(&mut c, rows);
            n += l;
        }
    }
    for &l in plain {
        c.seqs.push((n, l));
        c.prefix.push(None);
        useq(&mut c, (n..n + l).map(|r| (r, true)).collect());
        n += l;
    }
    c
}

/// Rows `map` of `x` (`[rows, heads, dim]`).
fn gather(x: &[f32], map: &[usize], width: usize) -> Vec<f32> {
    map.iter().flat_map(|&r| x[r * width..(r + 1) * width].iter().copied()).collect()
}

/// Attention over a shared-prefix batch on `dev` in `dtype` equals the cpu op over the same
/// sequences unshared (f32): the output of every row, the gradient of every q row, and the
/// gradients of k and v with a prefix row's summed over the prefix and all its dependants.
fn attention_shared_matches_unshared_on(dev: Device, dtype: fcgpu::DType, tol: f32) {
    use fcgpu::DType;
    let c = shared_case(&[(70, &[5, 1, 66]), (3, &[2]), (1, &[4, 3])], &[6]);
    let n: usize = c.seqs.iter().map(|s| s.1).sum();
    let (hq, hkv, d) = (4, 2, 8);
    // Inputs rounded to `dtype`, so both sides see the same values.
    let round = |v: Vec<f32>, shape: &[usize]| {
        Tensor::from_vec(v, shape).unwrap().to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().to_vec()
    };
    let q = round(rand_vec(n * hq * d, 30), &[n, hq, d]);
    let k = round(rand_vec(n * hkv * d, 31), &[n, hkv, d]);
    let v = round(rand_vec(n * hkv * d, 32), &[n, hkv, d]);
    let w = rand_vec(n * hq * d, 33);
    let on = |x: &[f32], h: usize| {
        let t = Tensor::from_vec(x.to_vec(), &[n, h, d]).unwrap().to_dtype(dtype).unwrap();
        t.to_device(dev).unwrap().requires_grad()
    };
    let (qs, ks, vs) = (on(&q, hq), on(&k, hkv), on(&v, hkv));
    let y = ops::attention::attention_shared(&qs, &ks, &vs, &c.seqs, &c.prefix).unwrap();
    let g = ops::weighted_sum(&y, &w).unwrap().backward().unwrap();
    // Unshared, on the cpu in f32.
    let u = c.map.len();
    let leaf = |x: Vec<f32>, h: usize| Tensor::from_vec(x, &[u, h, d]).unwrap().requires_grad();
    let (qu, ku, vu) = (
        leaf(gather(&q, &c.map, hq * d), hq),
        leaf(gather(&k, &c.map, hkv * d), hkv),
        leaf(gather(&v, &c.map, hkv * d), hkv),
    );
    let yu = ops::attention(&qu, &ku, &vu, &c.useqs).unwrap();
    let wu: Vec<f32> = (0..u)
        .flat_map(|r| {
            let (src, keep) = (&w[c.map[r] * hq * d..(c.map[r] + 1) * hq * d], c.keep[r]);
            src.iter().map(move |&x| if keep { x } else { 0.0 })
        })
        .collect();
    let gu = ops::weighted_sum(&yu, &wu).unwrap().backward().unwrap();
    let close = |what: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}[{j}]: shared {a} vs unshared {b}");
        }
    };
    let (ys, yuv) = (y.to_vec(), yu.to_vec());
    let w_out = hq * d;
    let mut want_y = vec![f32::NAN; n * w_out];
    for r in (0..u).filter(|&r| c.keep[r]) {
        want_y[c.map[r] * w_out..(c.map[r] + 1) * w_out].copy_from_slice(&yuv[r * w_out..(r + 1) * w_out]);
    }
    close("output", &ys, &want_y);
    for (name, xs, xu, h) in [("q", &qs, &qu, hq), ("k", &ks, &ku, hkv), ("v", &vs, &vu, hkv)] {
        let gu = gu.get(xu).unwrap().to_vec();
        let mut want = vec![0.0f32; n * h * d];
        for r in 0..u {
            let dst = &mut want[c.map[r] * h * d..(c.map[r] + 1) * h * d];
            dst.iter_mut().zip(&gu[r * h * d..(r + 1) * h * d]).for_each(|(a, b)| *a += b);
        }
        close(&format!("gradient of {name}"), &g.get(xs).unwrap().to_vec(), &want);
    }
}

#[test]
fn attention_shared_matches_unshared() {
    attention_shared_matches_unshared_on(Device::Cpu, fcgpu::DType::F32, 1e-5);
}

#[test]
fn attention_shared_matches_unshared_emu_f32() {
    attention_shared_matches_unshared_on(Device::Emu, fcgpu::DType::F32, 1e-5);
}

#[test]
fn attention_shared_matches_unshared_emu_bf16() {
    attention_shared_matches_unshared_on(Device::Emu, fcgpu::DType::BF16, 3e-2);
}

#[test]
fn attention_shared_grad() {
    let c = shared_case(&[(4, &[3, 1])], &[2]);
    let q = rand_tensor(&[12, 4, 4], 34);
    let k = rand_tensor(&[12, 2, 4], 35);
    let v = rand_tensor(&[12, 2, 4], 36);
    let f = |t: &[Tensor]| ops::attention::attention_shared(&t[0], &t[1], &t[2], &c.seqs, &c.prefix);
    check(f, &[q, k, v], EPS, TOL, 200).unwrap();
}

#[test]
fn attention_refuses_malformed_prefixes() {
    let (q, k) = (rand_tensor(&[6, 2, 4], 37), rand_tensor(&[6, 1, 4], 38));
    let seqs = [(0, 2), (2, 2), (4, 2)];
    for (prefix, want) in [
        (vec![Some(1), None, None], "must come earlier"),
        (vec![None, Some(0), Some(1)], "has a prefix itself"),
        (vec![None, Some(0)], "2 prefix entries for 3"),
    ] {
        let e = ops::attention::attention_shared(&q, &k, &k, &seqs, &prefix).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let seqs = [(0, 2), (2, 1), (3, 1), (4, 2)];
    let e = ops::attention::attention_shared(&q, &k, &k, &seqs, &[None, Some(0), None, Some(0)]).unwrap_err();
    assert!(e.to_string().contains("not consecutive"), "{e}");
}
