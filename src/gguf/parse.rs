//! The GGUF container (versions 2 and 3, little-endian): header, metadata, tensor infos and
//! the aligned data section. Every count, length, offset and dimension is checked against the
//! file's size before it is used, so a truncated or lying file is an error naming what is
//! wrong, never a panic or an allocation sized by the file.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;

use super::types::GgmlType;

/// `GGUF` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// ggml's limit on tensor dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays nest at most this deep (a lying file could otherwise recurse without bound).
const MAX_NESTING: usize = 8;
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(x) => Some(x.into()),
            Value::I16(x) => Some(x.into()),
            Value::I32(x) => Some(x.into()),
            Value::I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }

    /// A number of any type (integers included).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of this value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }
}

/// One tensor's description, with its data located and bounds-checked in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file, and its length (None for a type whose
    /// layout this reader does not know; such a tensor cannot be converted).
    pub start: u64,
    pub nbytes: Option<u64>,
}

impl TensorInfo {
    pub fn num_elements(&self) -> u64 {
        // Checked at parse time not to overflow.
        self.dims.iter().product()
    }

    /// The shape in row-major (PyTorch / safetensors) order: ggml's dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    map: Mmap,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map; a file changing under a running conversion is outside what
        // we support, as in every memory-mapped loader.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let (version, metadata, tensors, alignment) =
            parse(&map).with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        Ok(GgufFile { path: path.to_path_buf(), version, metadata, tensors, alignment, map })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The raw bytes of a tensor whose type has a known layout.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let n = t.nbytes.with_context(|| {
            format!(
                "{}: tensor `{}` has type {}, which this converter cannot read",
                self.path.display(),
                t.name,
                t.ggml_type
            )
        })?;
        // In bounds: checked at parse time.
        Ok(&self.map[t.start as usize..(t.start + n) as usize])
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

type Parsed = (u32, Vec<(String, Value)>, Vec<TensorInfo>, u64);

fn parse(buf: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.u32().context("reading the magic number")?;
    if magic != MAGIC {
        bail!("the file does not start with the GGUF magic (found {:02x?})", &buf[..4]);
    }
    let version = c.u32().context("reading the version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (versions 2 and 3 are; re-export the file with a current llama.cpp)"),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            bail!("this is a big-endian GGUF file; only little-endian files are supported")
        }
        v => bail!("unknown GGUF version {v} (supported: 2 and 3)"),
    }
    let n_tensors = c.u64().context("reading the tensor count")?;
    let n_kv = c.u64().context("reading the metadata count")?;
    // Each metadata entry takes at least 12 bytes (key length + value type) and each tensor
    // info at least 24; a count that the rest of the file cannot hold is a lie.
    c.check_count(n_kv, 12, "metadata entries")?;
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
    let mut seen = HashSet::new();
    for i in 0..n_kv {
        let key = c.string().with_context(|| format!("reading the key of metadata entry {i}"))?;
        if !seen.insert(key.clone()) {
            bail!("metadata key `{key}` appears twice");
        }
        let ty = c.u32().with_context(|| format!("reading the type of metadata key `{key}`"))?;
        let value = c.value(ty, 0).with_context(|| format!("reading the value of metadata key `{key}`"))?;
        metadata.push((key, value));
    }
    let alignment = alignment(&metadata)?;
    c.check_count(n_tensors, 24, "tensor infos")?;
    let mut infos = Vec::with_capacity(n_tensors as usize);
    let mut seen = HashSet::new();
    for i in 0..n_tensors {
        let info = c.tensor_info().with_context(|| format!("reading tensor info {i}"))?;
        if !seen.insert(info.0.clone()) {
            bail!("tensor `{}` appears twice", info.0);
        }
        infos.push(info);
    }
    let data_start = c.pos as u64;
    let data_start = data_start.div_ceil(alignment) * alignment;
    let tensors = infos
        .into_iter()
        .map(|(name, dims, ty, offset)| {
            locate(name, dims, ty, offset, data_start, alignment, buf.len() as u64)
        })
        .collect::<Result<_>>()?;
    Ok((version, metadata, tensors, alignment))
}

fn alignment(metadata: &[(String, Value)]) -> Result<u64> {
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == "general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match v {
        Value::U32(a) if a.is_power_of_two() => Ok((*a).into()),
        Value::U32(a) => bail!("`general.alignment` is {a}; it must be a power of two"),
        other => bail!("`general.alignment` has type {}; it must be a uint32", other.type_name()),
    }
}

/// Checks a tensor's dims, type and place in the data section.
fn locate(
    name: String,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
    data_start: u64,
    alignment: u64,
    file_len: u64,
) -> Result<TensorInfo> {
    let ggml_type =
        GgmlType::from_id(ty).with_context(|| format!("tensor `{name}`: unknown ggml type id {ty}"))?;
    let mut elements: u64 = 1;
    for (i, &d) in dims.iter().enumerate() {
        if d == 0 {
            bail!("tensor `{name}`: dimension {i} is 0");
        }
        elements = elements
            .checked_mul(d)
            .with_context(|| format!("tensor `{name}`: the element count of dims {dims:?} overflows"))?;
    }
    if !offset.is_multiple_of(alignment) {
        bail!("tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}");
    }
    let start = data_start
        .checked_add(offset)
        .with_context(|| format!("tensor `{name}`: data offset {offset} overflows"))?;
    let nbytes = match ggml_type.layout() {
        Some((block, size)) => {
            if !dims[0].is_multiple_of(block) {
                bail!("tensor `{name}`: its rows have {} elements, not a multiple of {ggml_type}'s block of {block}", dims[0]);
            }
            let n = (elements / block)
                .checked_mul(size)
                .with_context(|| format!("tensor `{name}`: its byte size overflows"))?;
            let end =
                start.checked_add(n).with_context(|| format!("tensor `{name}`: its data end overflows"))?;
            if end > file_len {
                bail!(
                    "tensor `{name}`: its data (bytes {start}..{end}, {ggml_type} {dims:?}) extends past the end of the file ({file_len} bytes); the file is truncated or the offset is wrong"
                );
            }
            Some(n)
        }
        None => None,
    };
    Ok(TensorInfo { name, dims, ggml_type, start, nbytes })
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "needs {n} bytes at byte {} but the file ends at byte {} (truncated, or a length is wrong)",
                self.pos,
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    /// An error when `count` items of at least `min_size` bytes cannot fit in what is left.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_size) > self.remaining() {
            bail!(
                "the file claims {count} {what} at byte {}, more than its remaining {} bytes can hold",
                self.pos,
                self.remaining()
            );
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let at = self.pos;
        let len = self.u64()?;
        let bytes = self.take(len).with_context(|| format!("a string of {len} bytes at byte {at}"))?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| anyhow::anyhow!("the string at byte {at} is not valid UTF-8: {e}"))
    }

    /// One value of GGUF type `ty` (arrays nest at most [`MAX_NESTING`] deep).
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("bool value {b} at byte {} (must be 0 or 1)", self.pos - 1),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    bail!("arrays nested more than {MAX_NESTING} deep at byte {}", self.pos);
                }
                let elem = self.u32()?;
                let count = self.u64()?;
                let min = min_value_size(elem).with_context(|| {
                    format!("unknown array element type {elem} at byte {} (valid: 0 to 12)", self.pos - 12)
                })?;
                self.check_count(count, min, "array elements")?;
                let mut v = Vec::with_capacity(count as usize);
                for i in 0..count {
                    v.push(self.value(elem, depth + 1).with_context(|| format!("array element {i}"))?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown value type {other} at byte {} (valid: 0 to 12)", self.pos - 4),
        })
    }

    fn tensor_info(&mut self) -> Result<(String, Vec<u64>, u32, u64)> {
        let name = self.string().context("reading the name")?;
        let n_dims = self.u32().with_context(|| format!("tensor `{name}`: reading its dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("tensor `{name}` has {n_dims} dimensions (must be 1 to {MAX_DIMS})");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64().with_context(|| format!("tensor `{name}`: reading its dimensions"))?);
        }
        let ty = self.u32().with_context(|| format!("tensor `{name}`: reading its type"))?;
        let offset = self.u64().with_context(|| format!("tensor `{name}`: reading its offset"))?;
        Ok((name, dims, ty, offset))
    }
}

/// The fewest bytes a value of type `ty` takes (None for an unknown type).
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}
