//! SVG line charts (plotters) and CSV files of scenario results.

use std::path::Path;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// One line of a chart: its legend and its points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart to draw.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Logarithmic x axis (cluster sizes).
    pub log_x: bool,
    pub series: &'a [Series],
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `chart` as an SVG file; the error is one line naming the file.
pub fn svg(path: &Path, chart: &Chart<'_>) -> Result<(), String> {
    draw(path, chart).map_err(|e| format!("cannot draw {}: {e}", path.display()))
}

fn draw(path: &Path, chart: &Chart<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let points = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err("no points to draw".into());
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.05 };
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(chart.title, ("sans-serif", 22)).margin(16).x_label_area_size(48).y_label_area_size(72);
    if chart.log_x {
        let c = builder.build_cartesian_2d((x0.max(1e-9)..x1).log_scale(), 0.0..y1)?;
        lines(c, chart, true, SeriesLabelPosition::UpperRight)?;
    } else {
        let c = builder.build_cartesian_2d(x0.min(0.0)..x1, 0.0..y1)?;
        lines(c, chart, false, SeriesLabelPosition::LowerRight)?;
    }
    root.present()?;
    Ok(())
}

/// Draws the mesh, one line per series (with a dot at each point if `dots`) and the legend.
fn lines<'a, X>(
    mut c: ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, RangedCoordf64>>,
    chart: &Chart<'_>,
    dots: bool,
    legend: SeriesLabelPosition,
) -> Result<(), String>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    let whole = |v: &f64| format!("{v:.0}");
    let mut mesh = c.configure_mesh();
    mesh.x_desc(chart.x_label).y_desc(chart.y_label);
    if chart.log_x {
        // Cluster sizes: whole numbers, few enough not to run into each other.
        mesh.x_labels(6).x_label_formatter(&whole);
    }
    mesh.draw().map_err(e)?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(e)?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if dots {
            c.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(e)?;
        }
    }
    c.configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)
}

/// The empirical CDF of `samples` (milliseconds or seconds), as a step curve starting at
/// (0, 0): the fraction of samples at or below each value.
pub fn cdf(mut samples: Vec<f64>) -> Vec<(f64, f64)> {
    samples.sort_by(f64::total_cmp);
    let n = samples.len() as f64;
    let mut out = vec![(0.0, 0.0)];
    for (i, &x) in samples.iter().enumerate() {
        let y = (i + 1) as f64 / n;
        let last = *out.last().expect("starts with a point");
        if last.0 < x {
            out.push((x, last.1));
            out.push((x, y));
        } else if let Some(p) = out.last_mut() {
            p.1 = y;
        }
    }
    out
}

/// Writes a CSV file: a header line and rows; the error is one line naming the file.
pub fn csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<(), String> {
    let mut out = header.join(",");
    out.push('\n');
    for r in rows {
        out.push_str(&r.join(","));
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdf_is_a_monotone_step_curve_ending_at_one() {
        let c = cdf(vec![3.0, 1.0, 2.0, 2.0]);
        assert_eq!(
            c,
            vec![(0.0, 0.0), (1.0, 0.0), (1.0, 0.25), (2.0, 0.25), (2.0, 0.75), (3.0, 0.75), (3.0, 1.0)]
        );
        assert!(c.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(cdf(vec![0.0]), vec![(0.0, 1.0)]);
    }

    #[test]
    fn charts_and_tables_are_written() {
        let dir = std::env::temp_dir().join(format!("weft-sim-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let series = [
            Series { label: "25 nodes".into(), points: cdf(vec![100.0, 200.0, 300.0]) },
            Series { label: "100 nodes".into(), points: cdf(vec![150.0, 400.0]) },
        ];
        let chart = Chart { title: "t", x_label: "ms", y_label: "fraction", log_x: false, series: &series };
        svg(&dir.join("a.svg"), &chart).unwrap();
        let text = std::fs::read_to_string(dir.join("a.svg")).unwrap();
        assert!(text.starts_with("<svg") && text.contains("25 nodes") && text.contains("100 nodes"));
        let log = Chart { log_x: true, ..chart.clone() };
        svg(&dir.join("b.svg"), &log).unwrap();
        let empty = Chart { series: &[], ..chart };
        assert!(svg(&dir.join("c.svg"), &empty).unwrap_err().contains("no points"));
        csv(&dir.join("t.csv"), &["a", "b"], &[vec!["1".into(), "2".into()]]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("t.csv")).unwrap(), "a,b\n1,2\n");
        assert!(
            csv(Path::new("/nonexistent-dir/x.csv"), &["a"], &[])
                .unwrap_err()
                .contains("/nonexistent-dir/x.csv")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
