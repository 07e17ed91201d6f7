//! `fcgpu kernels check` through NVRTC. Runs when libnvrtc loads (scripts/test.sh puts the pip
//! NVRTC on LD_LIBRARY_PATH for its own `kernels check` step); otherwise prints why it skipped.

use fcgpu::backend::nvrtc;

fn nvrtc_here() -> bool {
    match nvrtc::available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: {e:#}");
            false
        }
    }
}

#[test]
fn swiglu_compiles_to_cubin_without_spills() {
    if !nvrtc_here() {
        return;
    }
    let c = nvrtc::compile("swiglu.cu", "sm_80", true).unwrap();
    assert!(c.ok, "{}", c.log);
    assert!(c.cubin.len() > 1000 && &c.cubin[..4] == b"\x7fELF", "CUBIN is an ELF image");
    let r = nvrtc::parse_ptxas(&c.log, "sm_80");
    let mut names: Vec<_> = r.iter().map(|k| k.kernel.as_str()).collect();
    names.sort();
    assert_eq!(names, ["swiglu_bwd_bf16", "swiglu_bwd_f32", "swiglu_fwd_bf16", "swiglu_fwd_f32"]);
    assert!(r.iter().all(|k| k.registers > 0 && k.spill_stores == 0 && k.spill_loads == 0));
}

#[test]
fn cli_json_lists_every_kernel_of_a_file() {
    if !nvrtc_here() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fcgpu"))
        .args(["kernels", "check", "--arch", "sm_90", "--file", "rope", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        for key in ["kernel", "arch", "registers", "spill_stores", "spill_loads", "shared_bytes"] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        assert_eq!(r["arch"], "sm_90");
    }
}

#[test]
fn a_compile_error_is_reported_with_the_log() {
    if !nvrtc_here() {
        return;
    }
    // An architecture NVRTC does not know is an error with a log, not a crash.
    let c = nvrtc::compile("swiglu.cu", "sm_1", false);
    match c {
        Ok(c) => assert!(!c.ok && !c.log.is_empty()),
        Err(e) => assert!(!format!("{e:#}").is_empty()),
    }
}
