//! Bar plots a reader takes in at a glance: one row per scenario, one bar per measure, each
//! the scenario's figure as a percentage of the baseline (the first row), with the 100% line
//! drawn across. Plain SVG, no dependencies.

use std::fmt::Write as _;

/// One scenario's bars: a value (percent of the baseline) per measure.
pub struct Bar {
    pub label: String,
    pub values: Vec<f64>,
}

const COLORS: [&str; 4] = ["#4477aa", "#ee6677", "#228833", "#ccbb44"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal grouped bar chart of `rows` (values in percent) with a legend of `measures`.
pub fn bars(title: &str, measures: &[&str], rows: &[Bar]) -> String {
    let label_w = 330.0;
    let plot_w = 520.0;
    let bar_h = 9.0;
    let group_gap = 8.0;
    let top = 56.0;
    let group_h = bar_h * measures.len() as f64 + group_gap;
    let height = top + group_h * rows.len() as f64 + 30.0;
    let max = rows
        .iter()
        .flat_map(|r| r.values.iter().copied())
        .fold(110.0_f64, f64::max)
        .ceil();
    let x = |v: f64| label_w + plot_w * (v / max).clamp(0.0, 1.0);
    let width = label_w + plot_w + 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="18" font-size="13" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, m) in measures.iter().enumerate() {
        let lx = label_w + 170.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.0}" y="30" width="10" height="10" fill="{}"/><text x="{:.0}" y="39">{}</text>"#,
            COLORS[i % COLORS.len()],
            lx + 14.0,
            escape(m)
        );
    }
    for (gi, row) in rows.iter().enumerate() {
        let gy = top + group_h * gi as f64;
        let _ = writeln!(
            s,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"#,
            label_w - 6.0,
            gy + bar_h * measures.len() as f64 / 2.0 + 4.0,
            escape(&row.label)
        );
        for (mi, v) in row.values.iter().enumerate() {
            let y = gy + bar_h * mi as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{label_w:.0}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="8">{v:.0}%</text>"#,
                x(*v) - label_w,
                bar_h - 1.0,
                COLORS[mi % COLORS.len()],
                x(*v) + 3.0,
                y + bar_h - 2.0
            );
        }
    }
    let (x100, bottom) = (x(100.0), top + group_h * rows.len() as f64);
    let _ = writeln!(
        s,
        r##"<line x1="{x100:.1}" y1="{:.0}" x2="{x100:.1}" y2="{bottom:.0}" stroke="#333" stroke-dasharray="4 3"/><text x="{x100:.1}" y="{:.0}" text-anchor="middle">100%</text>"##,
        top - 4.0,
        bottom + 14.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plot_has_a_bar_per_value_and_the_baseline_line() {
        let svg = bars(
            "t <x>",
            &["a", "b"],
            &[
                Bar {
                    label: "plain".into(),
                    values: vec![100.0, 100.0],
                },
                Bar {
                    label: "fast & lean".into(),
                    values: vec![120.0, 90.0],
                },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("t &lt;x&gt;") && svg.contains("fast &amp; lean"));
        assert_eq!(svg.matches("<rect").count(), 1 + 2 + 4);
        assert!(svg.contains("120%") && svg.contains(">100%</text>"));
    }
}
