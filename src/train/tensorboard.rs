//! TensorBoard event files (`--log tensorboard`): the TFRecord framing with masked CRC32C
//! checksums around `tensorflow.Event` protocol buffers, written by hand since only three
//! messages (Event, Summary.Value, HistogramProto) are needed. TensorBoard reads every file
//! named `*tfevents*` in the run directory; a resumed run opens a new file, and TensorBoard
//! drops the steps after a step that goes backwards (its orphaned-data purge), as
//! metrics.jsonl drops them.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// One event file, appended step by step; every step is flushed so a kill loses at most the
/// step being written, and a failed write (a full disk) is an error.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<secs>.<host>.<pid>` (never an existing file) and
    /// writes the version record TensorBoard expects first.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        let secs = wall_time() as u64;
        let host = hostname();
        let mut n = 0;
        let (path, file) = loop {
            let suffix = if n == 0 { String::new() } else { format!(".{n}") };
            let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{}{suffix}", std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        };
        let mut w = EventWriter { path, out: BufWriter::new(file) };
        let mut ev = Vec::new();
        put_double(&mut ev, 1, wall_time());
        put_bytes(&mut ev, 3, b"brain.Event:2");
        w.record(&ev)?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A scalar summary `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_float(&mut v, 2, value as f32);
        self.summary(step, &v)
    }

    /// A histogram summary of `values` (non-finite ones skipped) in up to 30 equal buckets.
    pub fn histogram(&mut self, tag: &str, step: u64, values: &[f32]) -> Result<()> {
        let vals: Vec<f64> = values.iter().filter(|x| x.is_finite()).map(|&x| x as f64).collect();
        if vals.is_empty() {
            return Ok(());
        }
        let (lo, hi) = vals.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let buckets = if hi > lo { 30 } else { 1 };
        let width = (hi - lo) / buckets as f64;
        // Right edges; the last is `hi` itself so every value lands in a bucket.
        let limits: Vec<f64> =
            (1..=buckets).map(|i| if i == buckets { hi } else { lo + width * i as f64 }).collect();
        let mut counts = vec![0f64; buckets];
        for &x in &vals {
            counts[limits.iter().position(|&l| x <= l).unwrap_or(buckets - 1)] += 1.0;
        }
        let mut h = Vec::new();
        put_double(&mut h, 1, lo);
        put_double(&mut h, 2, hi);
        put_double(&mut h, 3, vals.len() as f64);
        put_double(&mut h, 4, vals.iter().sum());
        put_double(&mut h, 5, vals.iter().map(|x| x * x).sum());
        put_packed_doubles(&mut h, 6, &limits);
        put_packed_doubles(&mut h, 7, &counts);
        let mut v = Vec::new();
        put_bytes(&mut v, 1, tag.as_bytes());
        put_bytes(&mut v, 5, &h);
        self.summary(step, &v)
    }

    /// Pushes buffered records to the file (called once per step).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("cannot write {}", self.path.display()))?;
        self.out.get_ref().sync_data().with_context(|| format!("cannot sync {}", self.path.display()))
    }

    fn summary(&mut self, step: u64, value: &[u8]) -> Result<()> {
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, value);
        let mut ev = Vec::new();
        put_double(&mut ev, 1, wall_time());
        put_varint_field(&mut ev, 2, step);
        put_bytes(&mut ev, 5, &summary);
        self.record(&ev)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out.write_all(&rec).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The host name for the file name, reduced to characters safe in a path.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

/// TFRecord's checksum: CRC32C, rotated right by 15 and offset, so that a CRC of data that
/// itself holds CRCs stays well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_packed_doubles(out: &mut Vec<u8>, field: u32, v: &[f64]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    put_bytes(out, field, &bytes);
}

/// What one event file holds, read back with every checksum verified: `(tag, step, value)`
/// for scalars and `(tag, step, count)` for histograms. For tests and `fcgpu` tooling.
#[derive(Debug, Default)]
pub struct EventLog {
    pub scalars: Vec<(String, u64, f32)>,
    pub histograms: Vec<(String, u64, f64)>,
    pub version: Option<String>,
}

pub fn read(path: &Path) -> Result<EventLog> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut log = EventLog::default();
    let mut at = 0;
    while at < data.len() {
        ensure!(data.len() - at >= 12, "{}: truncated record header at byte {at}", path.display());
        let len_bytes = &data[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap());
        ensure!(crc == masked_crc(len_bytes), "{}: bad length checksum at byte {at}", path.display());
        let body = at + 12;
        ensure!(
            len <= data.len() && body + len + 4 <= data.len(),
            "{}: truncated record at byte {at}",
            path.display()
        );
        let ev = &data[body..body + len];
        let crc = u32::from_le_bytes(data[body + len..body + len + 4].try_into().unwrap());
        ensure!(crc == masked_crc(ev), "{}: bad data checksum at byte {at}", path.display());
        read_event(ev, &mut log).with_context(|| format!("{}: record at byte {at}", path.display()))?;
        at = body + len + 4;
    }
    Ok(log)
}

/// One protobuf field: number, and its varint value or length-delimited / fixed bytes.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn fields(mut b: &[u8]) -> Result<Vec<(u32, Field<'_>)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = take_varint(&mut b)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let n = match wire {
            0 => {
                out.push((field, Field::Varint(take_varint(&mut b)?)));
                continue;
            }
            1 => 8,
            5 => 4,
            2 => take_varint(&mut b)? as usize,
            w => bail!("wire type {w} of field {field}"),
        };
        ensure!(b.len() >= n, "truncated field {field}");
        let (x, rest) = b.split_at(n);
        b = rest;
        let v = Field::Bytes(x);
        out.push((field, v));
    }
    Ok(out)
}

fn take_varint(b: &mut &[u8]) -> Result<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        ensure!(!b.is_empty(), "truncated varint");
        let byte = b[0];
        *b = &b[1..];
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint longer than 10 bytes")
}

fn read_event(ev: &[u8], log: &mut EventLog) -> Result<()> {
    let mut step = 0;
    let mut summary = None;
    for (f, v) in fields(ev)? {
        match (f, v) {
            (2, Field::Varint(s)) => step = s,
            (3, Field::Bytes(b)) => log.version = Some(String::from_utf8_lossy(b).into_owned()),
            (5, Field::Bytes(b)) => summary = Some(b),
            _ => {}
        }
    }
    let Some(summary) = summary else { return Ok(()) };
    for (f, v) in fields(summary)? {
        let (1, Field::Bytes(value)) = (f, v) else { continue };
        let (mut tag, mut scalar, mut count) = (String::new(), None, None);
        for (f, v) in fields(value)? {
            match (f, v) {
                (1, Field::Bytes(b)) => tag = String::from_utf8_lossy(b).into_owned(),
                (2, Field::Bytes(b)) if b.len() == 4 => {
                    scalar = Some(f32::from_le_bytes(b.try_into().unwrap()))
                }
                (5, Field::Bytes(h)) => {
                    for (f, v) in fields(h)? {
                        if let (3, Field::Bytes(b)) = (f, v) {
                            count = Some(f64::from_le_bytes(b.try_into().unwrap()));
                        }
                    }
                }
                _ => {}
            }
        }
        match (scalar, count) {
            (Some(x), _) => log.scalars.push((tag, step, x)),
            (None, Some(n)) => log.histograms.push((tag, step, n)),
            _ => bail!("summary value `{tag}` is neither a scalar nor a histogram"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known CRC32C check value, and TFRecord's mask applied to it.
    #[test]
    fn masked_crc_of_the_standard_check_string() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn scalars_and_histograms_read_back_and_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 1, 0.5).unwrap();
        w.scalar("train/loss", 2, 0.25).unwrap();
        w.histogram("train/reward", 2, &[0.0, 1.0, 1.0, f32::NAN]).unwrap();
        w.histogram("train/empty", 2, &[]).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let log = read(&path).unwrap();
        assert_eq!(log.version.as_deref(), Some("brain.Event:2"));
        assert_eq!(log.scalars, vec![("train/loss".into(), 1, 0.5), ("train/loss".into(), 2, 0.25)]);
        assert_eq!(log.histograms, vec![("train/reward".into(), 2, 3.0)]);
        // A second writer in the same second gets its own file.
        let other = EventWriter::create(dir.path()).unwrap();
        assert_ne!(other.path(), path);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("checksum"));
        std::fs::write(&path, &bytes[..n - 3]).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("truncated"));
    }
}
