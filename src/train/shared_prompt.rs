//! Micro-batches of completions that share their prompt (a GRPO group): each prompt is computed
//! once per micro-batch and every completion attends to it as a shared prefix
//! ([`Batch::from_groups`]), and only the completion rows reach the LM head. Exact: a completion's
//! log-probs are those of `prompt ++ completion` scored alone, to float rounding.

use std::ops::Range;

use anyhow::{ensure, Result};

use crate::model::{Batch, Group};

/// One micro-batch: the batch, the rows whose log-probs are wanted (every completion token of
/// every member, in member order), and per member its index in the caller's list and the range of
/// its log-probs among those rows.
pub struct SharedChunk {
    pub batch: Batch,
    pub rows: Vec<usize>,
    pub members: Vec<(usize, Range<usize>)>,
}

/// Splits `items` (token ids, prompt length), in order, into micro-batches of at most `per`
/// completions. Consecutive items with the same prompt share it; a run of more than `per` is cut
/// into pieces that each carry the prompt, so every completion stays with its prompt.
pub fn shared_chunks(items: &[(&[u32], usize)], per: usize) -> Result<Vec<SharedChunk>> {
    let per = per.max(1);
    for (i, &(ids, pl)) in items.iter().enumerate() {
        ensure!(
            pl >= 1 && pl <= ids.len(),
            "sequence {i}: a prompt of {pl} tokens in a sequence of {}",
            ids.len()
        );
    }
    // Runs of one prompt, cut to at most `per`, then packed in order.
    let mut pieces: Vec<Vec<usize>> = Vec::new();
    for i in 0..items.len() {
        let same = i > 0 && prompt(items[i]) == prompt(items[i - 1]);
        match pieces.last_mut() {
            Some(p) if same && p.len() < per => p.push(i),
            _ => pieces.push(vec![i]),
        }
    }
    let mut chunks: Vec<Vec<Vec<usize>>> = Vec::new();
    let mut count = 0;
    for p in pieces {
        if chunks.is_empty() || count + p.len() > per {
            chunks.push(Vec::new());
            count = 0;
        }
        count += p.len();
        chunks.last_mut().expect("pushed above").push(p);
    }
    chunks.iter().map(|c| chunk(items, c)).collect()
}

fn prompt((ids, pl): (&[u32], usize)) -> &[u32] {
    &ids[..pl]
}

fn chunk(items: &[(&[u32], usize)], groups: &[Vec<usize>]) -> Result<SharedChunk> {
    let gs: Vec<Group> = groups
        .iter()
        .map(|g| Group {
            prompt: prompt(items[g[0]]),
            completions: g.iter().map(|&i| &items[i].0[items[i].1..]).collect(),
        })
        .collect();
    let batch = Batch::from_groups(&gs)?;
    let (mut rows, mut members) = (Vec::new(), Vec::new());
    let mut seq = 0;
    for g in groups {
        // The prompt's sequence, when it has more than one token, precedes its completions.
        seq += usize::from(items[g[0]].1 > 1);
        for &i in g {
            let r = batch.prediction_rows(seq);
            members.push((i, rows.len()..rows.len() + r.len()));
            rows.extend(r);
            seq += 1;
        }
    }
    Ok(SharedChunk { batch, rows, members })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_one_prompt_stay_together_and_split_at_the_limit() {
        let (a, b) = ([1u32, 2, 3, 4], [1u32, 2, 3, 5, 6]);
        let c = [9u32, 8, 7];
        let items: Vec<(&[u32], usize)> = vec![(&a, 3), (&b, 3), (&a, 3), (&c, 1), (&c, 1)];
        let chunks = shared_chunks(&items, 2).unwrap();
        let members: Vec<Vec<usize>> =
            chunks.iter().map(|c| c.members.iter().map(|m| m.0).collect()).collect();
        assert_eq!(members, vec![vec![0, 1], vec![2], vec![3, 4]]);
        // Chunk 0: prompt [1, 2] then [3, 4] and [3, 5, 6] at positions 2..
        let b0 = &chunks[0].batch;
        assert_eq!(b0.ids, vec![1, 2, 3, 4, 3, 5, 6]);
        assert_eq!(b0.positions, vec![0, 1, 2, 3, 2, 3, 4]);
        assert_eq!(b0.prefix, vec![None, Some(0), Some(0)]);
        // Rows predicting 4, then 5 and 6.
        assert_eq!(chunks[0].rows, vec![2, 4, 5]);
        let next = b0.next_tokens();
        assert_eq!(chunks[0].rows.iter().map(|&r| next[r]).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(chunks[0].members[1].1, 1..3);
        // A one-token prompt has no prefix sequence.
        assert!(chunks[2].batch.prefix.is_empty());
        assert_eq!(chunks[2].batch.ids, vec![9, 8, 7, 9, 8, 7]);
    }
}
