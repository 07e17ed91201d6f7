//! `fcgpu doctor`: passes on emu (every kernel family at two shapes, the optimizer, RL, sampling
//! and decode kernels included; JSON as documented), and
//! `--device cuda` without a GPU fails with a clear message.

use std::process::Command;

fn doctor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fcgpu")).arg("doctor").args(args).output().unwrap()
}

#[test]
fn doctor_on_emu_passes_and_prints_the_json_schema() {
    let out = doctor(&["--device", "emu", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["versions"]["device"].as_str().unwrap().starts_with("emu"));
    assert!(v["speed"]["skipped"].is_string());
    let kernels = v["kernels"].as_array().unwrap();
    for k in kernels {
        for field in ["kernel", "family", "shape", "max_abs_err", "tol", "ok"] {
            assert!(!k[field].is_null(), "{field} missing in {k}");
        }
        assert_eq!(k["ok"], true, "{k}");
    }
    // every family at two shapes, one of them awkward
    for family in [
        "rms_norm",
        "swiglu",
        "elementwise",
        "matmul",
        "logprob",
        "embedding",
        "rope",
        "attention",
        "attention_f32",
        "cast",
        "adamw",
        "advantage",
        "policy_loss",
        "sampling",
        "decode_attn",
    ] {
        let shapes: std::collections::BTreeSet<&str> =
            kernels.iter().filter(|k| k["family"] == family).map(|k| k["shape"].as_str().unwrap()).collect();
        assert_eq!(shapes.len(), 2, "{family}: {shapes:?}");
        assert!(shapes.iter().any(|s| s.contains("awkward")), "{family}: {shapes:?}");
    }
}

#[test]
fn doctor_on_emu_passes_under_the_sanitizer() {
    let out = Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["doctor", "--device", "emu"])
        .env("FCGPU_EMU_CHECK", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("emu_checks: memcheck,initcheck,racecheck,synccheck,shuffle")
            && s.contains("all checks passed"),
        "{s}"
    );
}

#[test]
fn doctor_without_a_gpu_fails_clearly() {
    if fcgpu::backend::GpuDevice::cuda_available() {
        return; // a GPU here: the acceptance run covers doctor --device cuda
    }
    let out = doctor(&["--device", "cuda"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fcgpu doctor: cannot open --device cuda"), "{err}");
    assert!(err.contains("not found") || err.contains("no GPU") || err.contains("CUDA"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = doctor(&["--device", "cpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a GPU device"));
}
