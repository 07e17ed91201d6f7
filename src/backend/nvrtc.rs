//! NVRTC: compile a kernel file (with the embedded headers) to CUBIN for one `sm_XY`, with the
//! ptxas resource report. Used by the cuda device (with an on-disk cache) and by
//! `fcgpu kernels check`. NVRTC is loaded dynamically; [`available`] is checked first because
//! cudarc panics when the library is missing.

use std::ffi::{c_char, c_int, CStr, CString};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::sys;

use super::sources;

/// Ok when libnvrtc can be loaded; otherwise an error saying how to get it.
pub fn available() -> Result<()> {
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        bail!(
            "NVRTC (libnvrtc.so) not found. Install it (e.g. `pip install nvidia-cuda-nvrtc` in a venv) and put \
             its lib directory (site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH"
        )
    }
}

/// (major, minor) of the loaded NVRTC.
pub fn version() -> Result<(i32, i32)> {
    available()?;
    let (mut a, mut b): (c_int, c_int) = (0, 0);
    check(unsafe { sys::nvrtcVersion(&mut a, &mut b) }, "nvrtcVersion")?;
    Ok((a, b))
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        let s = unsafe { CStr::from_ptr(sys::nvrtcGetErrorString(r)) }.to_string_lossy().into_owned();
        Err(anyhow!("{what}: {s}"))
    }
}

/// Result of compiling one kernel file for one architecture.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub file: String,
    pub arch: String,
    /// CUBIN image (empty when compilation failed).
    pub cubin: Vec<u8>,
    /// The NVRTC program log (compiler diagnostics and, with `-v`, the ptxas report).
    pub log: String,
    pub ok: bool,
}

/// Options every compile uses. `arch` is "sm_80"-style. Accuracy-preserving math (no
/// `--use_fast_math`): kernels call the fast intrinsics (`__expf`) explicitly where wanted.
pub fn options(arch: &str, verbose_ptxas: bool) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--device-as-default-execution-space".to_string(),
        "-lineinfo".to_string(),
    ];
    if verbose_ptxas {
        o.push("--ptxas-options=-v".to_string());
    }
    o
}

/// Compile `file` (a name in [`sources::KERNEL_FILES`]) to CUBIN for `arch`. Compile errors are
/// returned as `Compiled { ok: false, log }`, not as `Err` (which is for NVRTC being unusable).
pub fn compile(file: &str, arch: &str, verbose_ptxas: bool) -> Result<Compiled> {
    available()?;
    let src = sources::kernel_file(file).with_context(|| format!("no kernel file {file}"))?;
    let c_src = CString::new(src)?;
    let c_name = CString::new(file)?;
    let hdr_src: Vec<CString> =
        sources::KERNEL_HEADERS.iter().map(|(_, s)| CString::new(*s).unwrap()).collect();
    let hdr_name: Vec<CString> =
        sources::KERNEL_HEADERS.iter().map(|(n, _)| CString::new(*n).unwrap()).collect();
    let hs: Vec<*const c_char> = hdr_src.iter().map(|s| s.as_ptr()).collect();
    let hn: Vec<*const c_char> = hdr_name.iter().map(|s| s.as_ptr()).collect();
    let opts: Vec<CString> =
        options(arch, verbose_ptxas).into_iter().map(|o| CString::new(o).unwrap()).collect();
    let op: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
    unsafe {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        check(
            sys::nvrtcCreateProgram(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                hs.len() as c_int,
                hs.as_ptr(),
                hn.as_ptr(),
            ),
            "nvrtcCreateProgram",
        )?;
        let rc = sys::nvrtcCompileProgram(prog, op.len() as c_int, op.as_ptr());
        let mut log_n = 0usize;
        let mut log = String::new();
        if sys::nvrtcGetProgramLogSize(prog, &mut log_n) == sys::nvrtcResult::NVRTC_SUCCESS && log_n > 1 {
            let mut buf = vec![0u8; log_n];
            sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char);
            buf.truncate(log_n - 1);
            log = String::from_utf8_lossy(&buf).into_owned();
        }
        let mut cubin = Vec::new();
        let ok = rc == sys::nvrtcResult::NVRTC_SUCCESS;
        if ok {
            let mut n = 0usize;
            check(sys::nvrtcGetCUBINSize(prog, &mut n), "nvrtcGetCUBINSize")?;
            cubin = vec![0u8; n];
            check(sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char), "nvrtcGetCUBIN")?;
        }
        sys::nvrtcDestroyProgram(&mut prog);
        Ok(Compiled { file: file.to_string(), arch: arch.to_string(), cubin, log, ok })
    }
}

/// Per-kernel resource usage from a ptxas `-v` report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelResources {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

fn number_before(s: &str, unit: &str) -> Option<u32> {
    let i = s.find(unit)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

/// Parse the ptxas report (`ptxas info : Compiling entry function 'k' for 'sm_80'`,
/// `N bytes stack frame, N bytes spill stores, N bytes spill loads`,
/// `Used N registers, N bytes smem, ...`).
pub fn parse_ptxas(log: &str, arch: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut cur: Option<usize> = None;
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelResources {
                kernel: name,
                arch: arch.to_string(),
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                shared_bytes: 0,
                stack_bytes: 0,
            });
            cur = Some(out.len() - 1);
            continue;
        }
        let Some(c) = cur else { continue };
        let k = &mut out[c];
        if line.contains("spill stores") {
            k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            k.registers = number_before(line, "registers").unwrap_or(0);
            k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'swiglu_fwd_bf16' for 'sm_80'\n\
ptxas info    : Function properties for swiglu_fwd_bf16\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 18 registers, 384 bytes smem, 380 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'b' for 'sm_80'\n\
ptxas info    : Function properties for b\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 40 registers, 380 bytes cmem[0]\n";
        let r = parse_ptxas(log, "sm_80");
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                kernel: "swiglu_fwd_bf16".into(),
                arch: "sm_80".into(),
                registers: 18,
                spill_stores: 4,
                spill_loads: 12,
                shared_bytes: 384,
                stack_bytes: 8
            }
        );
        assert_eq!((r[1].registers, r[1].shared_bytes, r[1].spill_stores), (40, 0, 0));
    }
}
