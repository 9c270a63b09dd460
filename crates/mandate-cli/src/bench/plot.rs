//! The PNG plot: throughput and p99 latency against clients, a line per workload. Text is
//! drawn with a TrueType font read at run time (`MANDATE_PLOT_FONT`, or DejaVu Sans where
//! Debian's fonts-dejavu-core puts it), so the build needs no font libraries.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

use crate::Failure;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
const WIDTH: u32 = 1400;
const HEIGHT: u32 = 600;

fn load_font() -> Result<(), Failure> {
    let candidates: Vec<String> = match std::env::var("MANDATE_PLOT_FONT") {
        Ok(p) => vec![p],
        Err(_) => FONT_PATHS.iter().map(|p| (*p).to_owned()).collect(),
    };
    for path in &candidates {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| Failure(format!("{path} is not a TrueType font")));
        }
    }
    Err(Failure(format!(
        "--plot needs a TrueType font: install fonts-dejavu-core or set MANDATE_PLOT_FONT (looked in {})",
        candidates.join(", ")
    )))
}

type Series = BTreeMap<String, Vec<(u32, f64, f64)>>;

fn series(phases: &[Value]) -> Series {
    let mut out = Series::new();
    for p in phases {
        let name = p["workload"].as_str().unwrap_or("?").to_owned();
        let clients = u32::try_from(p["clients"].as_u64().unwrap_or(1)).unwrap_or(u32::MAX);
        let rate = p["per_second"].as_f64().unwrap_or(0.0);
        let p99 = p["latency_ms"]["p99"].as_f64().unwrap_or(0.0);
        out.entry(name).or_default().push((clients, rate, p99));
    }
    out
}

fn draw_err(e: impl std::fmt::Display) -> Failure {
    Failure(format!("drawing the plot: {e}"))
}

pub fn write(path: &Path, phases: &[Value]) -> Result<(), Failure> {
    load_font()?;
    let data = series(phases);
    let max_clients = data
        .values()
        .flatten()
        .map(|(c, _, _)| *c)
        .max()
        .unwrap_or(1)
        .max(2);
    let max_rate = data
        .values()
        .flatten()
        .map(|(_, r, _)| *r)
        .fold(1.0, f64::max);
    let (min_p99, max_p99) = data
        .values()
        .flatten()
        .map(|(_, _, l)| l.max(0.01))
        .fold((f64::MAX, 0.01f64), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    let colour = |i: usize| Palette99::pick(i).to_rgba();

    let mut rate_chart = ChartBuilder::on(&left)
        .caption("throughput", ("sans-serif", 28))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d((1u32..max_clients).log_scale(), 0.0..max_rate * 1.1)
        .map_err(draw_err)?;
    rate_chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .y_desc("operations / s")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(draw_err)?;
    let mut p99_chart = ChartBuilder::on(&right)
        .caption("p99 latency", ("sans-serif", 28))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1u32..max_clients).log_scale(),
            (min_p99.min(max_p99) * 0.8..max_p99 * 1.25).log_scale(),
        )
        .map_err(draw_err)?;
    p99_chart
        .configure_mesh()
        .x_desc("concurrent clients")
        .y_desc("ms (log)")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(draw_err)?;
    for (i, (name, points)) in data.iter().enumerate() {
        let style = ShapeStyle::from(colour(i)).stroke_width(3);
        rate_chart
            .draw_series(LineSeries::new(
                points.iter().map(|(c, r, _)| (*c, *r)),
                style,
            ))
            .map_err(draw_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        rate_chart
            .draw_series(
                points
                    .iter()
                    .map(|(c, r, _)| Circle::new((*c, *r), 5, style.filled())),
            )
            .map_err(draw_err)?;
        p99_chart
            .draw_series(LineSeries::new(
                points.iter().map(|(c, _, l)| (*c, l.max(0.01))),
                style,
            ))
            .map_err(draw_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        p99_chart
            .draw_series(
                points
                    .iter()
                    .map(|(c, _, l)| Circle::new((*c, l.max(0.01)), 5, style.filled())),
            )
            .map_err(draw_err)?;
    }
    rate_chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    p99_chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}
