//! JSON-lines files: every malformed line is reported with its file and line number, invalid
//! UTF-8 included, and line length can be bounded so one huge line cannot exhaust memory.

use std::io::{BufRead, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

/// Parses every non-blank line of `path` as a `T`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(read_numbered(path, usize::MAX)?.into_iter().map(|(_, v)| v).collect())
}

/// Every non-blank line of `path` parsed as a `T`, with its 1-based line number. A line longer
/// than `max_line_bytes` is an error naming it, raised before the rest of it is read.
pub fn read_numbered<T: DeserializeOwned>(path: &Path, max_line_bytes: usize) -> Result<Vec<(usize, T)>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for n in 1.. {
        buf.clear();
        let limit = max_line_bytes.saturating_add(2) as u64;
        let got = reader
            .by_ref()
            .take(limit)
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{}:{n}: cannot read line", path.display()))?;
        if got == 0 {
            break;
        }
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.len() > max_line_bytes {
            bail!("{}:{n}: line longer than {max_line_bytes} bytes", path.display());
        }
        let line = utf8_line(path, n, body)?;
        if line.trim().is_empty() {
            continue;
        }
        let v =
            serde_json::from_str(line).with_context(|| format!("{}:{n}: malformed line", path.display()))?;
        out.push((n, v));
    }
    Ok(out)
}

fn utf8_line<'a>(path: &Path, n: usize, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("{}:{n}: invalid UTF-8 at byte {} of the line", path.display(), e.valid_up_to() + 1)
    })
}

/// The whole file as text; invalid UTF-8 is an error naming the line (and byte in it).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let bad = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..bad];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = bad - before.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0) + 1;
        anyhow::anyhow!("{}:{line}: invalid UTF-8 at byte {col} of the line", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.jsonl");
        std::fs::write(&p, b"{\"a\": 1}\n\n{\"a\": \"\xff\"}\n").unwrap();
        let e = format!("{:#}", read::<serde_json::Value>(&p).unwrap_err());
        assert!(e.contains("x.jsonl:3: invalid UTF-8"), "{e}");
        let e = format!("{:#}", read_text(&p).unwrap_err());
        assert!(e.contains("x.jsonl:3: invalid UTF-8 at byte 8"), "{e}");
        std::fs::write(&p, "{\"a\": 1}\n\n{\"a\": 22222}\n").unwrap();
        let v: Vec<(usize, serde_json::Value)> = read_numbered(&p, 100).unwrap();
        assert_eq!(v.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let e = format!("{:#}", read_numbered::<serde_json::Value>(&p, 10).unwrap_err());
        assert!(e.contains("x.jsonl:3: line longer than 10 bytes"), "{e}");
    }
}
