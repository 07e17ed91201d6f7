#![no_main]
//! Any byte string, decoded as a model answer in every mode, must not panic and must stay
//! within the decoder's work budget. Inputs whose first byte is 0xFF instead pick an
//! adversarial answer (nested repetition, long concatenations, format specifiers, deep
//! nesting, many keys) with the remaining bytes as the choices.

#[path = "../../tests/fc_common/hostile.rs"]
mod hostile;

use fcgpu::fc::budget::MAX_WORK;
use fcgpu::fc::decode::decode_counted;
use fcgpu::fc::{strip_reasoning, AnswerFormat, Lang};
use libfuzzer_sys::fuzz_target;

fn decode_all(text: &str) {
    let a = strip_reasoning(text);
    for (lang, fmt) in [
        (Lang::Python, AnswerFormat::Python),
        (Lang::Java, AnswerFormat::Python),
        (Lang::JavaScript, AnswerFormat::Python),
        (Lang::Python, AnswerFormat::Json),
    ] {
        let (_, work) = decode_counted(a, lang, fmt);
        assert!(work <= MAX_WORK);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((&0xFF, rest)) = data.split_first() {
        let mut bytes = rest.iter().copied().cycle().take(64);
        let (answer, _) = hostile::hostile_answer(&mut |n| bytes.next().unwrap_or(0) as usize % n);
        decode_all(&answer);
    } else if let Ok(s) = std::str::from_utf8(data) {
        decode_all(s);
    }
});
