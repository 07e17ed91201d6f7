//! Build script: the emu device.
//!
//! Every `kernels/*.cu` file is compiled as C++ (cc crate) with `FCGPU_EMU` defined, so
//! `kernels/common.cuh` pulls in `kernels/emu/cuda_emu.h` (the CUDA execution model on the CPU)
//! and `kernels/ptx.cuh` pulls in `kernels/emu/ptx_emu.h` (the PTX wrappers re-implemented).
//! For each `extern "C" __global__` function the script parses the signature and generates a
//! trampoline `void t(void** args)` that unpacks the `void**` argument list exactly as
//! `cuLaunchKernel` does, plus a name -> trampoline table that the Rust emu driver searches.
//! Each file is compiled a second time for the emu sanitizer (`FCGPU_EMU_CHECK`): with
//! `FCEMU_CHECKED` defined and every memory access instrumented (GCC/Clang
//! `-fsanitize=kernel-address` in callback mode; kernels/emu/check.cpp supplies the callbacks),
//! inside a namespace of its own and with its kernels renamed, into a second table
//! (`fcemu_chk_registry`). `tests/kernels/*.cu` (planted-bug kernels for the sanitizer's tests)
//! go into both tables but not into `KERNEL_FUNCTIONS` or NVRTC's sources.
//! It also generates `kernel_sources.rs`: every kernel file and header embedded as text, which
//! the cuda device and `fcgpu kernels check` hand to NVRTC.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

struct Kernel {
    name: String,
    param_types: Vec<String>,
}

fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            i += 1;
            out.push_str(&src[start..i.min(src.len())]);
        } else {
            let ch = src[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn parse_kernels(path: &Path, src: &str) -> Vec<Kernel> {
    let src = strip_comments(src);
    let marker = "extern \"C\" __global__";
    let mut out = Vec::new();
    let mut rest = src.as_str();
    while let Some(pos) = rest.find(marker) {
        rest = &rest[pos + marker.len()..];
        let mut s = rest.trim_start();
        if let Some(r) = s.strip_prefix("__launch_bounds__") {
            let close =
                r.find(')').unwrap_or_else(|| panic!("{}: unterminated __launch_bounds__", path.display()));
            s = r[close + 1..].trim_start();
        }
        let mut s = s
            .strip_prefix("void")
            .unwrap_or_else(|| panic!("{}: a __global__ function must return void", path.display()))
            .trim_start();
        if let Some(r) = s.strip_prefix("__launch_bounds__") {
            let close =
                r.find(')').unwrap_or_else(|| panic!("{}: unterminated __launch_bounds__", path.display()));
            s = r[close + 1..].trim_start();
        }
        let open = s.find('(').unwrap();
        let name = s[..open].trim().to_string();
        let close = s[open..].find(')').unwrap() + open;
        let params = &s[open + 1..close];
        let mut param_types = Vec::new();
        for p in params.split(',') {
            let p = p.replace("__restrict__", " ");
            let p = p.trim();
            if p.is_empty() || p == "void" {
                continue;
            }
            let name_start = p
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map(|i| i + 1)
                .unwrap_or_else(|| panic!("{}: parameter `{p}` of {name} has no name", path.display()));
            let ty = p[..name_start].trim();
            assert!(!ty.is_empty(), "{}: parameter `{p}` of {name} has no type", path.display());
            param_types.push(ty.to_string());
        }
        out.push(Kernel { name, param_types });
    }
    out
}

/// Kind of a kernel parameter as the launch code passes it: p pointer, i int, u unsigned,
/// l long long, f float.
fn param_kind(path: &Path, kernel: &str, ty: &str) -> char {
    let t = ty.replace("const", " ");
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.contains('*') {
        'p'
    } else {
        match t.as_str() {
            "int" => 'i',
            "unsigned" | "unsigned int" | "u32" => 'u',
            "long long" | "i64" => 'l',
            "float" => 'f',
            _ => panic!(
                "{}: parameter type `{ty}` of {kernel} is not pointer, int, unsigned, long long or float",
                path.display()
            ),
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kdir = root.join("kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    // `FCGPU_TEST_CUDA=1` at build time turns the CUDA tests on (`cfg(fcgpu_test_cuda)`);
    // without it they are compiled as #[ignore], so a machine without a GPU reports them as
    // ignored, never as passed.
    println!("cargo:rustc-check-cfg=cfg(fcgpu_test_cuda)");
    println!("cargo:rerun-if-env-changed=FCGPU_TEST_CUDA");
    if std::env::var("FCGPU_TEST_CUDA").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=fcgpu_test_cuda");
    }

    let mut cu: Vec<PathBuf> = Vec::new();
    let mut headers: Vec<PathBuf> = Vec::new();
    for e in std::fs::read_dir(&kdir).expect("kernels/") {
        let p = e.unwrap().path();
        println!("cargo:rerun-if-changed={}", p.display());
        match p.extension().and_then(|x| x.to_str()) {
            Some("cu") => cu.push(p),
            Some("cuh") => headers.push(p),
            _ => {}
        }
    }
    for e in std::fs::read_dir(kdir.join("emu")).expect("kernels/emu/") {
        println!("cargo:rerun-if-changed={}", e.unwrap().path().display());
    }
    cu.sort();
    headers.sort();
    let mut test_cu: Vec<PathBuf> = Vec::new();
    let tdir = root.join("tests").join("kernels");
    println!("cargo:rerun-if-changed={}", tdir.display());
    if let Ok(rd) = std::fs::read_dir(&tdir) {
        for e in rd {
            let p = e.unwrap().path();
            println!("cargo:rerun-if-changed={}", p.display());
            if p.extension().and_then(|x| x.to_str()) == Some("cu") {
                test_cu.push(p);
            }
        }
    }
    test_cu.sort();

    // Embedded sources for NVRTC.
    let mut rs = String::from("/// (file name, source) of every kernel file, sorted by name.\n");
    rs.push_str("pub static KERNEL_FILES: &[(&str, &str)] = &[\n");
    for p in &cu {
        let f = p.file_name().unwrap().to_str().unwrap();
        writeln!(rs, "    ({f:?}, include_str!({:?})),", p.display().to_string()).unwrap();
    }
    rs.push_str("];\n/// (include name, source) of every header the kernel files include.\n");
    rs.push_str("pub static KERNEL_HEADERS: &[(&str, &str)] = &[\n");
    for p in &headers {
        let f = p.file_name().unwrap().to_str().unwrap();
        writeln!(rs, "    ({f:?}, include_str!({:?})),", p.display().to_string()).unwrap();
    }
    rs.push_str(
        "];\n/// (kernel function name, file name, parameter kinds) of every `extern \"C\" __global__`\n",
    );
    rs.push_str("/// function; kinds: p pointer, i int, u unsigned, l long long, f float.\n");
    rs.push_str("pub static KERNEL_FUNCTIONS: &[(&str, &str, &str)] = &[\n");

    // Emu: one C++ translation unit per kernel file, plus the registry.
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("FCGPU_EMU", None)
        .include(&kdir)
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-variable")
        .file(kdir.join("emu").join("runtime.cpp"))
        .file(kdir.join("emu").join("check.cpp"));
    let mut checked = cc::Build::new();
    checked
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("FCGPU_EMU", None)
        .define("FCEMU_CHECKED", None)
        .include(&kdir)
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unused-variable");
    instrument(&mut checked);
    let mut registry = String::from(
        "// generated by build.rs\nstruct fcemu_kernel { const char* name; void (*fn)(void**); };\n",
    );
    let mut tables = Vec::new();
    let mut chk_tables = Vec::new();
    for p in cu.iter().chain(&test_cu) {
        let product = !test_cu.contains(p);
        let src = std::fs::read_to_string(p).unwrap();
        let stem = p.file_stem().unwrap().to_str().unwrap().replace(['-', '.'], "_");
        let fname = p.file_name().unwrap().to_str().unwrap();
        let kernels = parse_kernels(p, &src);
        let mut cpp =
            format!("// generated by build.rs from {}\n#include {:?}\n\n", fname, p.display().to_string());
        cpp.push_str("struct fcemu_kernel { const char* name; void (*fn)(void**); };\nnamespace {\n");
        for k in &kernels {
            let args: Vec<String> =
                k.param_types.iter().enumerate().map(|(i, t)| format!("*({t}*)a[{i}]")).collect();
            writeln!(
                cpp,
                "void fcemu_t_{}(void** a) {{ (void)a; {}({}); }}",
                k.name,
                k.name,
                args.join(", ")
            )
            .unwrap();
            let kinds: String = k.param_types.iter().map(|t| param_kind(p, &k.name, t)).collect();
            if product {
                writeln!(rs, "    ({:?}, {fname:?}, {kinds:?}),", k.name).unwrap();
            }
        }
        cpp.push_str("}  // namespace\n\n");
        writeln!(cpp, "extern \"C\" const fcemu_kernel fcemu_kernels_{stem}[] = {{").unwrap();
        for k in &kernels {
            writeln!(cpp, "    {{\"{}\", fcemu_t_{}}},", k.name, k.name).unwrap();
        }
        cpp.push_str("    {nullptr, nullptr},\n};\n");
        let gen = out.join(format!("emu_{stem}.cpp"));
        std::fs::write(&gen, cpp).unwrap();
        build.file(&gen);
        writeln!(registry, "extern \"C\" const fcemu_kernel fcemu_kernels_{stem}[];").unwrap();
        tables.push(format!("fcemu_kernels_{stem}"));
        let gen = out.join(format!("emu_chk_{stem}.cpp"));
        std::fs::write(&gen, checked_unit(p, &stem, &kernels)).unwrap();
        checked.file(&gen);
        writeln!(registry, "extern \"C\" const fcemu_kernel fcemu_chk_kernels_{stem}[];").unwrap();
        chk_tables.push(format!("fcemu_chk_kernels_{stem}"));
    }
    rs.push_str("];\n");
    writeln!(
        registry,
        "extern \"C\" const fcemu_kernel* const fcemu_registry[] = {{ {}{}nullptr }};",
        tables.join(", "),
        if tables.is_empty() { "" } else { ", " }
    )
    .unwrap();
    writeln!(
        registry,
        "extern \"C\" const fcemu_kernel* const fcemu_chk_registry[] = {{ {}{}nullptr }};",
        chk_tables.join(", "),
        if chk_tables.is_empty() { "" } else { ", " }
    )
    .unwrap();
    let reg = out.join("emu_registry.cpp");
    std::fs::write(&reg, registry).unwrap();
    // In the checked library, which the linker reads first: the registry names both copies.
    checked.file(&reg);
    build.warnings(false);
    checked.warnings(false);
    // The checked copy first: it calls into the runtime (libfcemu), which the linker must see after it.
    checked.compile("fcemu_chk");
    build.compile("fcemu");

    std::fs::write(out.join("kernel_sources.rs"), rs).unwrap();
}

/// Every load and store of the checked copy calls `__asan_{load,store}N_noabort` (defined in
/// kernels/emu/check.cpp); no ASan runtime, no shadow memory, no stack or global redzones.
fn instrument(b: &mut cc::Build) {
    b.flag("-fsanitize=kernel-address").flag("-fsanitize-recover=kernel-address");
    if b.get_compiler().is_like_clang() {
        for f in ["-asan-instrumentation-with-call-threshold=0", "-asan-stack=0", "-asan-globals=0"] {
            b.flag("-mllvm").flag(f);
        }
    } else {
        for f in ["asan-instrumentation-with-call-threshold=0", "asan-stack=0", "asan-globals=0"] {
            b.flag(format!("--param={f}"));
        }
    }
}

/// The checked copy of one kernel file: its code inside the namespace `fcemu_chk_k` (so its
/// helpers never merge with the plain copy's), its `extern "C"` kernels renamed `fcemu_chk_*`,
/// and a table `fcemu_chk_kernels_<stem>` under the original names.
fn checked_unit(path: &Path, stem: &str, kernels: &[Kernel]) -> String {
    let mut cpp = format!(
        "// generated by build.rs: checked copy of {}\n#include \"emu/cuda_emu.h\"\n",
        path.display()
    );
    for k in kernels {
        writeln!(cpp, "#define {} fcemu_chk_{}", k.name, k.name).unwrap();
    }
    writeln!(cpp, "namespace fcemu_chk_k {{\n#include {:?}", path.display().to_string()).unwrap();
    cpp.push_str("struct fcemu_kernel { const char* name; void (*fn)(void**); };\nnamespace {\n");
    for k in kernels {
        let args: Vec<String> =
            k.param_types.iter().enumerate().map(|(i, t)| format!("*({t}*)a[{i}]")).collect();
        writeln!(cpp, "void fcemu_t_{}(void** a) {{ (void)a; {}({}); }}", k.name, k.name, args.join(", "))
            .unwrap();
    }
    cpp.push_str("}  // namespace\n}  // namespace fcemu_chk_k\n\n");
    writeln!(cpp, "extern \"C\" const fcemu_chk_k::fcemu_kernel fcemu_chk_kernels_{stem}[] = {{").unwrap();
    for k in kernels {
        writeln!(cpp, "    {{\"{}\", fcemu_chk_k::fcemu_t_{}}},", k.name, k.name).unwrap();
    }
    cpp.push_str("    {nullptr, nullptr},\n};\n");
    cpp
}
