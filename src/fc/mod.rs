//! Function calling: prompts, answer parsing, BFCL AST checker, rewards.
