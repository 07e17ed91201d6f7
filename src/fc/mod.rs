//! Function calling: prompts, answer parsing, BFCL checker, rewards.
//!
//! The BFCL semantics (decoding quirks, checker order, error types) follow the `bfcl-eval`
//! package, version 2026.3.23; `tools/bfcl_compare.py` measures the agreement.

pub mod budget;
pub mod checker;
pub mod convert;
pub mod decode;
pub mod javajs;
pub mod json_py;
pub mod prompt;
pub mod pyexpr;
pub mod reward;
pub mod score;
pub mod value;

pub use checker::Verdict;
pub use decode::{decode, strip_reasoning, AnswerFormat, Call, DecodeError, Lang};
pub use prompt::{render_prompt, render_target, PromptStyle};
pub use reward::{reward, RewardDetails, RewardKind};
pub use score::{check_answer, score, Report};
