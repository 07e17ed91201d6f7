//! `--style bfcl` and `--style qwen-fc` prompts are byte-identical to what BFCL's own Qwen
//! handlers build (expectations in tests/data/bfcl/prompts.jsonl, from tools/bfcl_compare.py).

mod fc_common;

use fcgpu::data::load_bfcl_dir;
use fcgpu::fc::prompt::{render_prompt, render_target, PromptStyle, REASONING_INSTRUCTION};
use std::collections::HashMap;

#[test]
fn prompts_match_bfcl_byte_for_byte() {
    let samples: HashMap<String, _> =
        load_bfcl_dir(&fc_common::subset_dir()).unwrap().into_iter().map(|s| (s.id.clone(), s)).collect();
    let expected = fc_common::read_jsonl(&fc_common::data_file("prompts.jsonl"));
    let mut cats = std::collections::HashSet::new();
    for e in &expected {
        let s = &samples[e["id"].as_str().unwrap()];
        assert_eq!(
            render_prompt(s, PromptStyle::Bfcl).unwrap(),
            e["bfcl"].as_str().unwrap(),
            "bfcl prompt of {}",
            s.id
        );
        assert_eq!(
            render_prompt(s, PromptStyle::QwenFc).unwrap(),
            e["qwen_fc"].as_str().unwrap(),
            "qwen-fc prompt of {}",
            s.id
        );
        cats.insert(s.category.clone());
    }
    assert_eq!(cats.len(), 13, "every category covered");
}

#[test]
fn reasoning_style_adds_the_instruction_and_target_has_think() {
    let samples = load_bfcl_dir(&fc_common::subset_dir()).unwrap();
    let s = samples.iter().find(|s| s.category == "simple_python").unwrap();
    let p = render_prompt(s, PromptStyle::Reasoning).unwrap();
    assert!(p.contains(REASONING_INSTRUCTION));
    assert!(p.ends_with("<|im_start|>assistant\n"));
    let mut s2 = s.clone();
    s2.reasoning = Some("why".into());
    let t = render_target(&s2);
    assert!(t.starts_with("<think>why</think>\n\n[") && t.ends_with(")]"), "{t}");
}
