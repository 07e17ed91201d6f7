//! The real-model task's split (scripts/get-bfcl.sh): every entry of the five task categories
//! lands in exactly one of train and held-out, the held-out side is exactly the committed id
//! list, and the rule (sha256 of "fcgpu-split-v1:" + id below 0.3 · 2^64) recomputed here gives
//! the same sides; train is fit + dev, dev by sha256("fcgpu-dev-v1:" + id) below 0.15 · 2^64. Runs on the cached BFCL data; skipped (and says so) when it is absent.

use std::collections::BTreeSet;
use std::path::PathBuf;

use fcgpu::data::load_bfcl_category;
use sha2::{Digest, Sha256};

const TASK: [&str; 5] = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"];

fn cache() -> PathBuf {
    match std::env::var_os("FCGPU_CACHE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fcgpu"),
    }
}

fn below(salt: &str, id: &str, share: f64) -> bool {
    let h = Sha256::digest(format!("{salt}:{id}").as_bytes());
    let x = u64::from_be_bytes(h[..8].try_into().unwrap());
    (x as f64) < share * 2f64.powi(64)
}

fn held_out_by_rule(id: &str) -> bool {
    below("fcgpu-split-v1", id, 0.3)
}

fn dev_by_rule(id: &str) -> bool {
    below("fcgpu-dev-v1", id, 0.15)
}

fn committed_ids() -> BTreeSet<String> {
    let text = std::fs::read_to_string("tests/data/real-task/heldout-ids.txt").unwrap();
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(str::to_string).collect()
}

#[test]
fn split_is_the_documented_hash_rule() {
    let root = cache().join("bfcl");
    if !root.join("split/heldout/BFCL_v4_simple_python.json").exists() {
        eprintln!("skipped: run scripts/get-bfcl.sh (no BFCL split under {})", root.display());
        return;
    }
    let mut heldout = BTreeSet::new();
    for cat in TASK {
        let all = load_bfcl_category(&root.join("v4"), cat).unwrap();
        let train = load_bfcl_category(&root.join("split/train"), cat).unwrap();
        let held = load_bfcl_category(&root.join("split/heldout"), cat).unwrap();
        let fit = load_bfcl_category(&root.join("split/fit"), cat).unwrap();
        let dev = load_bfcl_category(&root.join("split/dev"), cat).unwrap();
        // train = fit + dev, each side by its rule.
        let ids = |v: &[fcgpu::data::Sample]| v.iter().map(|s| s.id.clone()).collect::<BTreeSet<_>>();
        let (fit_ids, dev_ids) = (ids(&fit), ids(&dev));
        assert!(fit_ids.is_disjoint(&dev_ids), "{cat}: fit and dev overlap");
        assert_eq!(&fit_ids | &dev_ids, ids(&train), "{cat}: fit + dev is not train");
        assert!(dev.iter().all(|s| dev_by_rule(&s.id)) && fit.iter().all(|s| !dev_by_rule(&s.id)));
        assert_eq!(train.len() + held.len(), all.len(), "{cat}: sides do not add up");
        for s in &train {
            assert!(!held_out_by_rule(&s.id), "{} is in train but the rule holds it out", s.id);
        }
        for s in &held {
            assert!(held_out_by_rule(&s.id), "{} is held out but the rule keeps it", s.id);
            assert!(heldout.insert(s.id.clone()), "{} held out twice", s.id);
        }
        // Answers travel with their questions.
        if cat != "irrelevance" {
            assert!(held.iter().chain(&train).all(|s| !s.ground_truth.is_empty()), "{cat}: answer lost");
        }
        let share = held.len() as f64 / all.len() as f64;
        assert!((0.2..0.4).contains(&share), "{cat}: held-out share {share}");
    }
    assert_eq!(heldout, committed_ids(), "held-out ids differ from tests/data/real-task/heldout-ids.txt");
}
