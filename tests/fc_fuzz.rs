//! Property test: the answer decoder and checker never panic, whatever the input (random
//! strings, mutations of real answers, deep nesting). FCGPU_FUZZ_N sets the input count
//! (default 200k) for a sustained run.

mod fc_common;

use fcgpu::data::load_bfcl_dir;
use fcgpu::fc::prompt::render_calls;
use fcgpu::fc::{check_answer, decode, strip_reasoning, AnswerFormat, Lang};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ALPHABET: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "=",
    ":",
    ".",
    "'",
    "\"",
    "\\",
    "\n",
    " ",
    "-",
    "+",
    "*",
    "**",
    "/",
    "//",
    "%",
    "a",
    "x",
    "f",
    "1",
    "0",
    "9",
    "e",
    "j",
    "_",
    "0x",
    "1e5",
    "True",
    "None",
    "lambda",
    "for",
    "in",
    "if",
    "else",
    "not",
    "'''",
    "b'",
    "r'",
    "f'",
    "u'",
    "#",
    "@",
    "~",
    "<",
    ">",
    "!",
    "&",
    "|",
    "^",
    "`",
    ";",
    "é",
    "😀",
    "\t",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<tool_call>\n",
    "\n</tool_call>",
    "{\"name\": \"f\", \"arguments\": {}}",
    "new int[]{",
    "new ArrayList<>(",
    "Arrays.asList(",
    "HashMap",
    "=>",
    "...",
    "*args",
    "**k",
    ":=",
    "yield",
    "await",
];

fn mutate(rng: &mut ChaCha8Rng, seed: &str) -> String {
    let mut s: Vec<char> = seed.chars().collect();
    for _ in 0..rng.random_range(1..6) {
        let pos = if s.is_empty() {
            0
        } else {
            rng.random_range(0..=s.len())
        };
        match rng.random_range(0..5) {
            0 => {
                let tok = ALPHABET[rng.random_range(0..ALPHABET.len())];
                s.splice(pos..pos, tok.chars());
            }
            1 if pos < s.len() => {
                let end = (pos + rng.random_range(1..8)).min(s.len());
                s.drain(pos..end);
            }
            2 if pos < s.len() => {
                let end = (pos + rng.random_range(1..20)).min(s.len());
                let dup: Vec<char> = s[pos..end].to_vec();
                s.splice(pos..pos, dup);
            }
            3 => {
                let n = rng.random_range(1..400);
                let open = ["(", "[", "{", "-", "not ", "f(a="][rng.random_range(0..6)];
                s.splice(pos..pos, open.repeat(n).chars());
            }
            _ => {
                let c = char::from_u32(rng.random_range(0..0x2FFF)).unwrap_or('?');
                s.insert(pos.min(s.len()), c);
            }
        }
    }
    s.into_iter().collect()
}

fn random_string(rng: &mut ChaCha8Rng) -> String {
    (0..rng.random_range(0..30))
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
        .collect()
}

#[test]
fn decoder_and_checker_never_panic() {
    let n: usize = std::env::var("FCGPU_FUZZ_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let samples = load_bfcl_dir(&fc_common::subset_dir()).unwrap();
    let seeds: Vec<String> = samples.iter().map(render_calls).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut ok, mut total) = (0usize, 0usize);
    for i in 0..n {
        let pick = rng.random_range(0..seeds.len());
        let input = if i % 4 == 0 {
            random_string(&mut rng)
        } else {
            mutate(&mut rng, &seeds[pick])
        };
        total += 1;
        ok += decode(strip_reasoning(&input), Lang::Python, AnswerFormat::Python).is_ok() as usize;
        let _ = decode(&input, Lang::Python, AnswerFormat::Json);
        // The full checker runs on every 8th input; tree-sitter (slower) on every 64th.
        if i % 8 == 0 {
            let s = &samples[rng.random_range(0..samples.len())];
            let _ = check_answer(s, strip_reasoning(&input), AnswerFormat::Python);
        }
        if i % 64 == 0 {
            let _ = decode(&input, Lang::Java, AnswerFormat::Python);
            let _ = decode(&input, Lang::JavaScript, AnswerFormat::Python);
        }
    }
    eprintln!("fuzz: {total} inputs, {ok} decoded as Python call lists");
    // Mutations of valid answers must still decode sometimes: the fuzzer reaches the resolver.
    assert!(ok > total / 20 && ok < total, "{ok} of {total} decoded");
}

#[test]
fn deep_nesting_is_an_error() {
    for open in ["[", "(", "{", "f(a=", "-", "not ", "1+"] {
        let s = format!("[f(a={}1)]", open.repeat(100_000));
        assert!(
            decode(&s, Lang::Python, AnswerFormat::Python).is_err(),
            "{open}"
        );
    }
}
