//! The embedded task is scored by the same BFCL checker as real data: every reference
//! completion earns reward 1, and broken ones earn 0.

use fcgpu::data::synth;
use fcgpu::fc::decode::AnswerFormat;
use fcgpu::fc::reward::{reward, RewardKind};

#[test]
fn reference_completions_earn_full_reward() {
    let (train, eval) = synth::generate(3, 400, 100);
    for s in train.iter().chain(&eval) {
        let c = fcgpu::fc::prompt::render_target(s);
        let r = reward(s, &format!("{c}<|im_end|>"), RewardKind::Binary, AnswerFormat::Python);
        assert_eq!(r.reward, 1.0, "{}: {c}\n{r:?}", s.id);
        let no_think = c.split("</think>").nth(1).unwrap().to_string();
        assert_eq!(
            reward(s, &no_think, RewardKind::Binary, AnswerFormat::Python).reward,
            0.0,
            "{}: no think block must fail",
            s.id
        );
    }
}
