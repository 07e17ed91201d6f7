#![no_main]
//! Any byte string, decoded as a model answer in every mode, must not panic.

use fcgpu::fc::{decode, strip_reasoning, AnswerFormat, Lang};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let a = strip_reasoning(s);
        for lang in [Lang::Python, Lang::Java, Lang::JavaScript] {
            let _ = decode(a, lang, AnswerFormat::Python);
        }
        let _ = decode(a, Lang::Python, AnswerFormat::Json);
    }
});
