//! Transformer models from Hugging Face checkpoints.
