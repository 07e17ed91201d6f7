//! The prefix cache of `fcgpu serve`: the KV blocks of recent prompts, kept after their requests
//! end, so a request that starts like one of them (the same system prompt and tool schemas,
//! a chat's earlier turns) prefills only what follows the shared part.
//!
//! An entry is a prompt's tokens and a cache holding their blocks (a fork: the blocks are
//! reference-counted, so an entry and the running samples share them). A lookup finds the entry
//! with the longest common prefix and forks that many positions; a request writing into a
//! shared, partial block copies it first (`SeqCache::prepare`). Entries are dropped least
//! recently used first: past the cache's own budget of blocks, and whenever the scheduler needs
//! blocks for running samples or a new request ([`PrefixCache::evict_lru`]). A block is freed
//! once nothing else holds it.

use std::collections::{HashMap, VecDeque};

use crate::model::kv_cache::SeqCache;

struct Entry {
    tokens: Vec<u32>,
    cache: SeqCache,
}

/// Recent prompts' blocks, most recently used first.
pub struct PrefixCache {
    entries: VecDeque<Entry>,
    /// Most distinct blocks the entries may hold (0: the cache is off).
    budget: usize,
    /// Entries holding each block, by block id: its size is the blocks the cache holds.
    held: HashMap<u32, usize>,
}

/// Most entries kept whatever the budget (each lookup compares with every entry).
const MAX_ENTRIES: usize = 512;

impl PrefixCache {
    /// A cache holding at most `budget` blocks (0: off, nothing is kept).
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache { entries: VecDeque::new(), budget, held: HashMap::new() }
    }

    /// Blocks the entries hold (some may be shared with running samples).
    pub fn blocks(&self) -> usize {
        self.held.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A cache of the longest prefix of `prompt` an entry holds, at least `min` positions and
    /// at most `prompt.len() - 1` (the last prompt token is always computed: its logits draw
    /// the first new token). The entry becomes the most recently used.
    pub fn lookup(&mut self, prompt: &[u32], min: usize) -> Option<SeqCache> {
        let most = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(most)))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)))?;
        if len < min.max(1) {
            return None;
        }
        let e = self.entries.remove(best).expect("an entry");
        let fork = e.cache.fork_prefix(len);
        self.entries.push_front(e);
        Some(fork)
    }

    /// Keeps the blocks of `prompt` (`cache` holds exactly its positions), then drops the least
    /// recently used entries past the budget. A prompt already kept becomes the most recent.
    pub fn insert(&mut self, prompt: &[u32], cache: &SeqCache) {
        if self.budget == 0 || cache.len() != prompt.len() {
            return;
        }
        if let Some(i) = self.entries.iter().position(|e| e.tokens == prompt) {
            let e = self.entries.remove(i).expect("an entry");
            self.entries.push_front(e);
            return;
        }
        let e = Entry { tokens: prompt.to_vec(), cache: cache.fork() };
        for b in e.cache.blocks() {
            *self.held.entry(b.id).or_default() += 1;
        }
        self.entries.push_front(e);
        while self.held.len() > self.budget || self.entries.len() > MAX_ENTRIES {
            self.evict_lru();
        }
    }

    /// Drops the least recently used entry (its blocks are freed unless something else holds
    /// them); false when there is none.
    pub fn evict_lru(&mut self) -> bool {
        let Some(e) = self.entries.pop_back() else { return false };
        for b in e.cache.blocks() {
            if let Some(n) = self.held.get_mut(&b.id) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&b.id);
                }
            }
        }
        true
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_cache::{KvPool, KvShape};
    use crate::tensor::{DType, Device};

    fn pool() -> std::sync::Arc<KvPool> {
        let shape = KvShape { layers: 1, kv_heads: 1, head_dim: 2, device: Device::Cpu, dtype: DType::F32 };
        KvPool::new(shape, 4).unwrap()
    }

    fn cache_of(pool: &std::sync::Arc<KvPool>, n: usize) -> SeqCache {
        let mut c = SeqCache::new(pool);
        c.prepare(n).unwrap();
        c.commit(n);
        c
    }

    #[test]
    fn longest_prefix_wins_and_lru_goes_first() {
        let p = pool();
        let mut pc = PrefixCache::new(6);
        let a: Vec<u32> = (0..10).collect();
        let b: Vec<u32> = (0..6).chain(50..54).collect();
        pc.insert(&a, &cache_of(&p, 10));
        pc.insert(&b, &cache_of(&p, 10));
        assert_eq!((pc.len(), pc.blocks()), (2, 6));
        // 0..9 then 99: a shares 9 positions, b 6.
        let q: Vec<u32> = (0..9).chain([99]).collect();
        let hit = pc.lookup(&q, 4).unwrap();
        assert_eq!(hit.len(), 9);
        // The whole prompt matches: all but its last token come from the cache.
        assert_eq!(pc.lookup(&a, 4).unwrap().len(), 9);
        assert!(pc.lookup(&[7, 7, 7, 7, 7], 4).is_none(), "no common prefix");
        assert!(pc.lookup(&[0, 1, 2, 9], 4).is_none(), "3 positions are below the minimum");
        drop(hit);
        // a is the most recent (looked up): a third prompt pushes b out.
        let c: Vec<u32> = (100..108).collect();
        pc.insert(&c, &cache_of(&p, 8));
        assert_eq!(pc.len(), 2);
        assert_eq!(pc.lookup(&b, 4).map(|h| h.len()), Some(6), "b's first 6 are a's");
        assert!(pc.lookup(&c, 4).is_some());
        while pc.evict_lru() {}
        assert_eq!(pc.blocks(), 0);
        assert_eq!(p.stats().in_use, 0, "every block back in the pool");
    }

    #[test]
    fn off_keeps_nothing() {
        let p = pool();
        let mut pc = PrefixCache::new(0);
        pc.insert(&[1, 2, 3, 4, 5], &cache_of(&p, 5));
        assert!(pc.is_empty());
        assert_eq!(p.stats().in_use, 0);
    }
}
