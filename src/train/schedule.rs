//! Learning-rate schedule: linear warm-up, then cosine decay to `min_ratio · lr`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    pub lr: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub min_ratio: f32,
}

impl Schedule {
    /// Learning rate of optimizer step `step` (1-based).
    pub fn lr_at(&self, step: u64) -> f32 {
        if self.warmup_steps > 0 && step <= self.warmup_steps {
            return self.lr * step as f32 / self.warmup_steps as f32;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = (step.saturating_sub(self.warmup_steps) as f32 / decay as f32).min(1.0);
        let cos = 0.5 * (1.0 + (std::f32::consts::PI * t).cos());
        self.lr * (self.min_ratio + (1.0 - self.min_ratio) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule { lr: 1.0, warmup_steps: 4, total_steps: 14, min_ratio: 0.1 };
        assert!((s.lr_at(1) - 0.25).abs() < 1e-6);
        assert!((s.lr_at(4) - 1.0).abs() < 1e-6);
        assert!((s.lr_at(9) - 0.55).abs() < 1e-6);
        assert!((s.lr_at(14) - 0.1).abs() < 1e-6);
        assert!((s.lr_at(20) - 0.1).abs() < 1e-6);
        assert!(s.lr_at(6) > s.lr_at(7));
    }
}
