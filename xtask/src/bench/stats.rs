//! Medians and ranges of interleaved rounds: what every benchmark table reports.

/// A measure over several rounds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 {
            s[mid]
        } else {
            f64::midpoint(s[mid - 1], s[mid])
        };
        Summary {
            median,
            min: s[0],
            max: s[s.len() - 1],
        }
    }

    /// `median (min–max)` with `digits` decimals, scaled by `scale`.
    pub fn show(&self, scale: f64, digits: usize) -> String {
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            self.median * scale,
            self.min * scale,
            self.max * scale
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert!((Summary::of(&[1.0, 2.0, 4.0, 3.0]).median - 2.5).abs() < 1e-9);
        assert_eq!(s.show(1.0, 1), "2.0 (1.0–3.0)");
    }
}
