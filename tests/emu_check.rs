//! The emu sanitizer (`FCGPU_EMU_CHECK`): each check catches its planted bug
//! (tests/kernels/planted_bugs.cu, compiled through the same emu path as kernels/*.cu), and the
//! correct twin of a planted kernel passes. The whole kernel suite and the device-parity tests run
//! under every check in CI (scripts/test.sh).

use fcgpu::backend::emu::EmuChecks;
use fcgpu::backend::{GpuBuffer, GpuDevice, Kernel, KernelArgs, LaunchCfg};

fn checked(spec: &str) -> GpuDevice {
    GpuDevice::emu_checked(EmuChecks::parse(spec).unwrap())
}

/// Launch a planted kernel (not in the product's signature table, so through the driver).
fn launch(d: &GpuDevice, name: &'static str, cfg: LaunchCfg, args: &mut KernelArgs) -> Result<(), String> {
    let mut params = args.as_params();
    unsafe { d.driver().launch(Kernel::new("planted_bugs.cu", name), cfg, &mut params) }
        .map_err(|e| format!("{e:#}"))
}

fn floats(n: usize) -> Vec<f32> {
    (0..n).map(|i| 1.0 + i as f32).collect()
}

fn assert_reports(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in the report:\n{err}");
    }
}

#[test]
fn parses_the_check_list() {
    assert_eq!(EmuChecks::parse("1").unwrap(), EmuChecks::ALL);
    assert_eq!(EmuChecks::parse("").unwrap(), EmuChecks::NONE);
    let c = EmuChecks::parse("memcheck, racecheck").unwrap();
    assert!(c.has("memcheck") && c.has("racecheck") && !c.has("initcheck") && !c.has("shuffle"));
    let e = EmuChecks::parse("memcheck,bogus").unwrap_err().to_string();
    assert!(e.contains("bogus") && e.contains("synccheck"), "{e}");
}

#[test]
fn memcheck_reports_an_out_of_bounds_read() {
    let d = checked("memcheck");
    let x = d.upload_f32(&floats(100)).unwrap();
    let y = d.alloc(400).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y).i32(100);
    let e = launch(&d, "planted_oob_read", LaunchCfg::linear(2, 64), &mut a).unwrap_err();
    // thread 99 = block 1, thread 35 reads x[100]: offset 400 of the 400-byte allocation
    assert_reports(
        &e,
        &[
            "memcheck",
            "planted_oob_read",
            "block (1,0,0)",
            "thread (35,0,0)",
            "offset 400 of a 400-byte",
            "out of bounds",
        ],
    );
    // the same kernel within bounds passes
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y).i32(99);
    launch(&d, "planted_oob_read", LaunchCfg::linear(2, 64), &mut a).unwrap();
}

#[test]
fn memcheck_reports_a_use_after_free() {
    let d = checked("memcheck");
    let x = d.upload_f32(&floats(64)).unwrap();
    let y = d.alloc(256).unwrap();
    let stale = x.ptr();
    drop(x);
    let mut a = KernelArgs::new();
    a.ptr(stale).buf(&y).i32(64);
    let e = launch(&d, "planted_copy", LaunchCfg::linear(1, 64), &mut a).unwrap_err();
    assert_reports(
        &e,
        &["memcheck", "planted_copy", "block (0,0,0)", "thread (0,0,0)", "offset 0", "use after free"],
    );
}

#[test]
fn initcheck_reports_a_read_of_memory_never_written() {
    let d = checked("initcheck");
    let x: GpuBuffer = d.alloc(256).unwrap(); // never written: poisoned, as CUDA leaves it
    let y = d.alloc(256).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y).i32(64);
    let e = launch(&d, "planted_copy", LaunchCfg::linear(1, 64), &mut a).unwrap_err();
    assert_reports(&e, &["initcheck", "planted_copy", "never written"]);
    // the poison is visible, not zeros
    assert!(y.download_f32().unwrap().iter().all(|v| v.is_nan()));
    // written (upload, zero, or by a kernel) is initialised
    x.zero().unwrap();
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y).i32(64);
    launch(&d, "planted_copy", LaunchCfg::linear(1, 64), &mut a).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&y).buf(&x).i32(64);
    launch(&d, "planted_copy", LaunchCfg::linear(1, 64), &mut a).unwrap();
}

#[test]
fn initcheck_covers_the_gemm_operands() {
    use fcgpu::backend::Gemm;
    use fcgpu::dtype::DType;
    let d = checked("initcheck");
    let a = d.upload_f32(&floats(6)).unwrap();
    let b = d.alloc(6 * 4).unwrap();
    let c = d.alloc(4 * 4).unwrap();
    let e = format!(
        "{:#}",
        d.gemm(&Gemm::simple(DType::F32, 2, 2, 3, a.ptr(), b.ptr(), false, c.ptr())).unwrap_err()
    );
    assert_reports(&e, &["initcheck", "reads B", "never written"]);
}

#[test]
fn racecheck_reports_both_threads_of_a_shared_memory_race() {
    let d = checked("racecheck");
    let x = d.upload_f32(&floats(64)).unwrap();
    let y = d.alloc(256).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y).i32(0);
    let e = launch(&d, "planted_shared_race", LaunchCfg::linear(1, 64), &mut a).unwrap_err();
    // thread 0 reads s[1] first; thread 1 then writes it: both are named
    assert_reports(
        &e,
        &["racecheck", "planted_shared_race", "write after read", "thread (1,0,0)", "thread (0,0,0)"],
    );
    // with the barrier: no report, and the right values
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y).i32(1);
    launch(&d, "planted_shared_race", LaunchCfg::linear(1, 64), &mut a).unwrap();
    let want: Vec<f32> = (0..64).map(|t| 1.0 + ((t + 1) % 64) as f32).collect();
    assert_eq!(y.download_f32().unwrap(), want);
}

#[test]
fn synccheck_reports_divergent_barriers() {
    let d = checked("synccheck");
    let y = d.alloc(256).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&y);
    let e = launch(&d, "planted_divergent_barrier", LaunchCfg::linear(1, 64), &mut a).unwrap_err();
    assert_reports(&e, &["synccheck", "divergent __syncthreads", "thread (32,0,0)", "planted_bugs.cu:"]);
}

#[test]
fn synccheck_reports_a_collective_naming_exited_lanes() {
    let d = checked("synccheck");
    let x = d.upload_f32(&floats(32)).unwrap();
    let y = d.alloc(128).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y);
    let e = launch(&d, "planted_shuffle_after_exit", LaunchCfg::linear(1, 32), &mut a).unwrap_err();
    assert_reports(
        &e,
        &["synccheck", "__shfl_xor_sync with mask 0xffffffff names lanes that exited", "0x0000ffff"],
    );
}

#[test]
fn synccheck_reports_a_diverged_warp_and_a_deadlock() {
    let d = checked("synccheck");
    let x = d.upload_f32(&floats(32)).unwrap();
    let y = d.alloc(128).unwrap();
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y);
    let e = launch(&d, "planted_diverged_collective", LaunchCfg::linear(1, 32), &mut a).unwrap_err();
    assert_reports(&e, &["synccheck", "diverged warp", "__ballot_sync", "__shfl_xor_sync"]);
    // without synccheck this deadlock aborts the process; with it, the launch fails and says where
    let mut a = KernelArgs::new();
    a.buf(&x).buf(&y);
    let e = launch(&d, "planted_deadlock", LaunchCfg::linear(1, 32), &mut a).unwrap_err();
    assert_reports(&e, &["synccheck", "deadlock", "thread (0,0,0) waits at __syncthreads planted_bugs.cu:"]);
}

#[test]
fn schedule_fuzzing_exposes_an_order_dependent_kernel() {
    // Threads whose y differs from what index order gives (x = base + i, distinct per run, so a
    // slot read before its writer ran holds the previous run's value).
    let wrong = |d: &GpuDevice, base: f32| -> Vec<usize> {
        let x_host: Vec<f32> = (0..64).map(|i| base + i as f32).collect();
        let x = d.upload_f32(&x_host).unwrap();
        let y = d.zeros(256).unwrap();
        let mut a = KernelArgs::new();
        a.buf(&x).buf(&y);
        launch(d, "planted_order_dependent", LaunchCfg::linear(1, 64), &mut a).unwrap();
        let y = y.download_f32().unwrap();
        (0..64).filter(|&t| y[t] != x_host[if t > 0 { t - 1 } else { 0 }]).collect()
    };
    // in index order the bug hides; with the threads shuffled it shows, the same way per seed
    assert!(wrong(&checked("synccheck"), 100.0).is_empty());
    let fuzz = || GpuDevice::emu_checked(EmuChecks::parse("shuffle").unwrap().with_seed(7));
    let first = wrong(&fuzz(), 200.0);
    assert!(!first.is_empty());
    assert_eq!(wrong(&fuzz(), 300.0), first);
}

#[test]
fn every_check_passes_the_correct_kernels_and_keeps_their_results() {
    // a product kernel under all checks gives the plain emu's bits
    let x_host: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |d: &GpuDevice| {
        let x = d.upload_f32(&x_host).unwrap();
        let y = d.upload_f32(&x_host).unwrap();
        let out = d.alloc(300 * 4).unwrap();
        let mut a = KernelArgs::new();
        a.buf(&x).buf(&y).buf(&out).i64(300);
        d.launch(Kernel::new("swiglu.cu", "swiglu_fwd_f32"), LaunchCfg::elementwise(300), &mut a).unwrap();
        out.download_f32().unwrap()
    };
    assert_eq!(run(&checked("1")), run(&GpuDevice::emu_checked(EmuChecks::NONE)));
}
