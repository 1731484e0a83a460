//! PNG charts drawn without system fonts (the font ships inside the binary): the training loss curve in
//! LLaMA-Factory's style (raw curve plus an EMA whose weight grows with the number of points) and bar charts
//! for evaluation reports.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bundled font is valid; if registration ever failed, charts would only lack text.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// LLaMA-Factory's smoothing: an EMA with weight `1.8·(sigmoid(0.05·n) − 0.5)` for n points.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    if values.is_empty() {
        return vec![];
    }
    let n = values.len() as f64;
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * n).exp()) - 0.5);
    let mut last = values[0];
    values
        .iter()
        .map(|&v| {
            last = last * weight + (1.0 - weight) * v;
            last
        })
        .collect()
}

/// Draws `series` (step, value) raw and smoothed into a PNG at `path`.
pub fn line_chart(path: &Path, title: &str, y_label: &str, series: &[(f64, f64)]) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    let (x0, x1) = series.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = series.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if series.is_empty() {
        (0.0, 1.0)
    } else if x0 == x1 {
        (x0 - 1.0, x1 + 1.0)
    } else {
        (x0, x1)
    };
    let (y0, y1) = if series.is_empty() {
        (0.0, 1.0)
    } else if y0 == y1 {
        (y0 - 1.0, y1 + 1.0)
    } else {
        (y0, y1)
    };
    let pad = (y1 - y0) * 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| anyhow!("chart mesh: {e}"))?;
    let raw = RGBColor(31, 119, 180).mix(0.4);
    chart
        .draw_series(LineSeries::new(series.iter().copied(), raw.stroke_width(1)))
        .map_err(|e| anyhow!("chart series: {e}"))?
        .label("original")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], raw));
    let ys: Vec<f64> = series.iter().map(|p| p.1).collect();
    let smoothed: Vec<(f64, f64)> = series.iter().map(|p| p.0).zip(smooth(&ys)).collect();
    let col = RGBColor(31, 119, 180);
    chart
        .draw_series(LineSeries::new(smoothed, col.stroke_width(2)))
        .map_err(|e| anyhow!("chart series: {e}"))?
        .label("smoothed")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("chart legend: {e}"))?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Grouped bar chart: one group per metric, one bar per model, values in [0, max].
pub fn bar_chart(path: &Path, title: &str, metrics: &[String], models: &[String], values: &[Vec<f64>]) -> Result<()> {
    ensure_font();
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    let max = values.iter().flatten().copied().fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let groups = metrics.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups as f64, 0f64..max)
        .map_err(|e| anyhow!("chart: {e}"))?;
    let names = metrics.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| anyhow!("chart mesh: {e}"))?;
    let palette = [RGBColor(150, 150, 150), RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];
    let n = models.len().max(1) as f64;
    for (mi, model) in models.iter().enumerate() {
        let color = palette[mi % palette.len()];
        let bars = (0..metrics.len()).map(|g| {
            let v = values.get(mi).and_then(|r| r.get(g)).copied().unwrap_or(0.0);
            let x = g as f64 + 0.1 + 0.8 * mi as f64 / n;
            Rectangle::new([(x, 0.0), (x + 0.8 / n, v)], color.filled())
        });
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("chart bars: {e}"))?
            .label(model.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("chart legend: {e}"))?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let series: Vec<(f64, f64)> = (1..50).map(|i| (i as f64, 3.0 / i as f64 + 0.1 * (i % 3) as f64)).collect();
        let p = dir.path().join("loss.png");
        line_chart(&p, "training loss", "loss", &series).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (800, 500));
        let b = dir.path().join("bars.png");
        bar_chart(
            &b,
            "metrics",
            &["bleu".into(), "rouge".into()],
            &["base".into(), "lora".into()],
            &[vec![0.1, 0.2], vec![0.5, 0.6]],
        )
        .unwrap();
        assert!(image::open(&b).is_ok());
        // Smoothing keeps the first value and stays within the data's range.
        let s = smooth(&[1.0, 0.0, 0.0]);
        assert_eq!(s[0], 1.0);
        assert!(s[2] > 0.0 && s[2] < 1.0);
    }
}
