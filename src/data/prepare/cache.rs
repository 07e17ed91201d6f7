//! The judge's answers, kept in `<out>/judge_cache.jsonl`: one line per answer, appended and
//! fsync'd as each arrives, keyed by a hash of (prompt, model, round, attempt). A killed run
//! loses at most the requests in flight; `--resume` reads the file and asks nothing twice.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

pub const CACHE_FILE: &str = "judge_cache.jsonl";

pub struct Cache {
    path: PathBuf,
    answers: Mutex<HashMap<String, String>>,
    file: Mutex<File>,
}

/// The cache key of one judge request.
pub fn key(prompt: &str, model: &str, round: u32, attempt: u32) -> String {
    let mut h = Sha256::new();
    // Lengths first, so no two field lists hash the same text.
    for part in [prompt, model] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(round.to_le_bytes());
    h.update(attempt.to_le_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Cache {
    /// Opens (creating) the cache in `dir`, loading what an earlier run wrote. A line cut by a
    /// kill is skipped; it is the only line that can be.
    pub fn open(dir: &Path) -> Result<Cache> {
        let path = dir.join(CACHE_FILE);
        let mut answers = HashMap::new();
        if path.exists() {
            let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            for line in text.split(|&b| b == b'\n') {
                let Ok(v) = serde_json::from_slice::<Json>(line) else { continue };
                if let (Some(k), Some(a)) = (v["key"].as_str(), v["answer"].as_str()) {
                    answers.insert(k.to_string(), a.to_string());
                }
            }
            // A torn last line would glue itself to the next append: end it first.
            if text.last().is_some_and(|&b| b != b'\n') {
                std::fs::OpenOptions::new().append(true).open(&path)?.write_all(b"\n")?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Cache { path, answers: Mutex::new(answers), file: Mutex::new(file) })
    }

    pub fn len(&self) -> usize {
        self.answers.lock().expect("cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.answers.lock().expect("cache lock").get(key).cloned()
    }

    /// Records an answer: appended and synced before it counts as cached.
    pub fn put(&self, key: &str, model: &str, round: u32, answer: &str) -> Result<()> {
        let mut line = json!({"key": key, "model": model, "round": round, "answer": answer}).to_string();
        line.push('\n');
        {
            let mut f = self.file.lock().expect("cache lock");
            f.write_all(line.as_bytes())
                .and_then(|_| f.sync_data())
                .with_context(|| format!("cannot append to {}", self.path.display()))?;
        }
        self.answers.lock().expect("cache lock").insert(key.to_string(), answer.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_a_torn_line() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let k = key("p", "m", 1, 0);
        assert_ne!(k, key("p", "m", 2, 0));
        c.put(&k, "m", 1, "<judge>True</judge>").unwrap();
        drop(c);
        let p = d.path().join(CACHE_FILE);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"key\": \"torn").unwrap();
        let c = Cache::open(d.path()).unwrap();
        assert_eq!(c.get(&k).as_deref(), Some("<judge>True</judge>"));
        c.put("k2", "m", 1, "x").unwrap();
        assert_eq!(Cache::open(d.path()).unwrap().len(), 2);
    }
}
