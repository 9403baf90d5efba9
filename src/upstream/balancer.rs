//! Smooth weighted round-robin (nginx's algorithm), pure: spreads picks in proportion to the
//! weights without bursts — weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`.

/// Per-backend running weights.
#[derive(Debug, Default)]
pub struct SmoothWeighted {
    current: Vec<i64>,
}

impl SmoothWeighted {
    /// Picks among the backends for which `eligible(i)` holds, by `weights[i]`.
    pub fn pick(&mut self, weights: &[u32], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        self.current.resize(weights.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, &w) in weights.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let w = i64::from(w);
            self.current[i] += w;
            total += w;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        self.current[chosen] -= total;
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_sequence() {
        let mut b = SmoothWeighted::default();
        let seq: Vec<usize> = (0..7)
            .filter_map(|_| b.pick(&[5, 1, 1], |_| true))
            .collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn proportions_hold_and_ineligible_are_skipped() {
        let mut b = SmoothWeighted::default();
        let mut counts = [0usize; 3];
        for _ in 0..6000 {
            counts[b.pick(&[3, 2, 1], |i| i != 1).unwrap()] += 1;
        }
        assert_eq!(counts, [4500, 0, 1500]);
        assert_eq!(b.pick(&[1, 1], |_| false), None);
    }
}
