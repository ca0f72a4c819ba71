//! `benchplot`: a small SVG writer for grouped bar charts (the research's figures: one
//! group per configuration, one bar per strategy, y = throughput).

#![deny(missing_docs)]

use std::fmt::Write as _;

/// One bar per group.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Value per group (`None`: no bar).
    pub values: Vec<Option<f64>>,
}

/// Y axis scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Linear from 0.
    Linear,
    /// Base-10 logarithmic, whole decades.
    Log,
    /// Log when the positive values span more than two decades.
    Auto,
}

/// A grouped bar chart.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// X axis label (what the groups are).
    pub x_label: String,
    /// Y axis label, with units.
    pub y_label: String,
    /// Group names, left to right.
    pub groups: Vec<String>,
    /// Bars within each group, in legend order.
    pub series: Vec<Series>,
    /// Y scale.
    pub scale: Scale,
}

const W: f64 = 980.0;
const H: f64 = 520.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;
/// One colour per series, distinct for up to 20 series (every strategy ×
/// flush policy plus the peers); past that they repeat.
const COLORS: [&str; 20] = [
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
    "#ccb974", "#64b5cd", "#1b3a6b", "#a34a00", "#2d6a37", "#7a1f22", "#4b3f7a", "#5a4634",
    "#a0457f", "#3d3d3d", "#8a7a2b", "#2b6f86",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.0e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').into()
    }
}

/// A step of 1, 2 or 5 × 10^k giving about `n` ticks up to `max`.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Map from value to the y pixel, plus tick values.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    fn new(c: &Chart) -> Axis {
        let vals: Vec<f64> = c
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let max = vals.iter().copied().fold(0.0, f64::max);
        let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let log = match c.scale {
            Scale::Linear => false,
            Scale::Log => !vals.is_empty(),
            Scale::Auto => !vals.is_empty() && max / min > 100.0,
        };
        if log {
            let lo = min.log10().floor() as i32;
            let hi = (max.log10().ceil() as i32).max(lo + 1);
            let ticks = (lo..=hi).map(|e| 10f64.powi(e)).collect();
            Axis {
                log,
                lo: 10f64.powi(lo),
                hi: 10f64.powi(hi),
                ticks,
            }
        } else {
            let step = nice_step(if max > 0.0 { max } else { 1.0 }, 5.0);
            let hi = (max / step).ceil().max(1.0) * step;
            let n = (hi / step).round() as usize;
            let ticks = (0..=n).map(|i| i as f64 * step).collect();
            Axis {
                log,
                lo: 0.0,
                hi,
                ticks,
            }
        }
    }

    /// Fraction of the plot height for `v` (0 = bottom).
    fn frac(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            v / self.hi
        };
        f.clamp(0.0, 1.0)
    }
}

/// Render `c` as a standalone SVG document.
pub fn svg(c: &Chart) -> String {
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let axis = Axis::new(c);
    let y = |v: f64| TOP + ph * (1.0 - axis.frac(v));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="28" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        LEFT + pw / 2.0,
        esc(&c.title)
    );
    // Grid and y ticks.
    for &t in &axis.ticks {
        let ty = y(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#dddddd"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            ty + 4.0,
            fmt_tick(t)
        );
    }
    // Bars.
    let ng = c.groups.len().max(1) as f64;
    let ns = c.series.len().max(1) as f64;
    let gw = pw / ng;
    let bw = gw * 0.8 / ns;
    for (gi, g) in c.groups.iter().enumerate() {
        let gx = LEFT + gw * gi as f64;
        for (si, ser) in c.series.iter().enumerate() {
            let Some(v) = ser.values.get(gi).copied().flatten() else {
                continue;
            };
            if !v.is_finite() {
                continue;
            }
            let top = y(v);
            let x = gx + gw * 0.1 + bw * si as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                (bw - 1.0).max(1.0),
                (TOP + ph - top).max(0.0),
                COLORS[si % COLORS.len()],
                esc(&ser.name),
                fmt_tick(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw / 2.0,
            TOP + ph + 20.0,
            esc(g)
        );
    }
    // Axes and labels.
    let _ = writeln!(
        s,
        r#"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="black"/>"#,
        TOP + ph,
        LEFT + pw
    );
    let _ = writeln!(
        s,
        r#"<text class="x-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 22.0,
        esc(&c.x_label)
    );
    let scale_note = if axis.log { " (log scale)" } else { "" };
    let _ = writeln!(
        s,
        r#"<text class="y-label" transform="translate(22,{:.1}) rotate(-90)" text-anchor="middle">{}{}</text>"#,
        TOP + ph / 2.0,
        esc(&c.y_label),
        scale_note
    );
    // Legend.
    let lx = LEFT + pw + 20.0;
    for (si, ser) in c.series.iter().enumerate() {
        let ly = TOP + 10.0 + 20.0 * si as f64;
        let _ = writeln!(
            s,
            r#"<g class="legend"><rect x="{lx:.1}" y="{ly:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text></g>"#,
            COLORS[si % COLORS.len()],
            lx + 18.0,
            ly + 11.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(scale: Scale) -> Chart {
        Chart {
            title: "map+unmap <1 thread>".into(),
            x_label: "pages per mapping".into(),
            y_label: "throughput (million pairs/s)".into(),
            groups: vec!["1".into(), "4".into(), "32".into()],
            series: vec![
                Series {
                    name: "limit/none".into(),
                    values: vec![Some(300.0), Some(100.0), Some(20.0)],
                },
                Series {
                    name: "vm-allocator/strict".into(),
                    values: vec![Some(0.5), None, Some(0.2)],
                },
            ],
            scale,
        }
    }

    /// Every `<tag` opened is closed (by `</tag>` or `/>`), in order.
    fn well_formed(doc: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = doc;
        while let Some(i) = rest.find('<') {
            let end = match rest[i..].find('>') {
                Some(e) => i + e,
                None => return false,
            };
            let tag = &rest[i + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap_or("");
                stack.push(name.to_string());
            }
            rest = &rest[end + 1..];
        }
        stack.is_empty()
    }

    #[test]
    fn svg_is_well_formed_with_labels_and_legend() {
        for scale in [Scale::Linear, Scale::Log, Scale::Auto] {
            let doc = svg(&chart(scale));
            assert!(doc.starts_with("<svg "));
            assert!(well_formed(&doc), "{doc}");
            assert!(doc.contains(">pages per mapping</text>"));
            assert!(doc.contains("throughput (million pairs/s)"));
            assert!(doc.contains("map+unmap &lt;1 thread&gt;"));
            assert_eq!(doc.matches(r#"<g class="legend">"#).count(), 2);
            assert!(doc.contains(">limit/none</text>"));
            assert!(doc.contains(">vm-allocator/strict</text>"));
            // 5 bars: one value is missing.
            assert_eq!(doc.matches("<title>").count(), 5);
        }
        assert!(svg(&chart(Scale::Auto)).contains("(log scale)"));
        assert!(!svg(&chart(Scale::Linear)).contains("(log scale)"));
        assert!(!well_formed("<svg><g></svg>"));
    }

    #[test]
    fn ticks() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(7.0, 5.0), 2.0);
        let a = Axis::new(&chart(Scale::Log));
        assert_eq!(a.ticks, vec![0.1, 1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(fmt_tick(0.5), "0.5");
        assert_eq!(fmt_tick(20.0), "20");
    }
}
