//! PNG plots for run reports, drawn in Rust with `plotters`: curves over steps, scatters of 2-D
//! samples, critic reliability diagrams, and image grids / filmstrips of samples. Every file is
//! drawn to a temporary `.png` next to its destination and renamed into place, so readers never
//! see half-written plots; `check_png` validates the result.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// DejaVu Sans (Bitstream Vera licence, see `assets/DejaVuSans-LICENSE`), embedded so that plots
/// render the same on machines without system fonts.
const FONT: &[u8] = include_bytes!("assets/DejaVuSans.ttf");
/// Size of line charts, scatters and calibration plots.
const CHART_SIZE: (u32, u32) = (800, 600);
/// Pixels of white between tiles of an image grid or filmstrip, and around the outside.
pub const TILE_GAP: u32 = 2;
/// Refuse to allocate image grids larger than this many pixels (about 1 GB of RGB).
const MAX_GRID_PIXELS: u64 = 1 << 28;

/// matplotlib's "tab10": distinguishable, and familiar to readers of ML papers.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A line chart's series with at most this many points gets a dot at every point.
const SPARSE_POINTS: usize = 50;

/// A named series of (x, y) points.
pub struct Series<'a> {
    /// Legend entry.
    pub name: &'a str,
    /// Points in drawing order; non-finite points are skipped and break the line.
    pub points: &'a [(f64, f64)],
}

/// Line chart (800x600) with several series, optional horizontal reference lines `(label, y)`
/// drawn dashed across the whole x range, and axis labels.
///
/// Non-finite points are skipped and the line is broken there; isolated points are drawn as dots.
/// With no finite point in any series the file is still a valid PNG showing the title and
/// "no data", so a report on a run that has just started renders.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hlines: &[(&str, f64)],
) -> Result<()> {
    line_chart_dotted(path, title, x_label, y_label, series, hlines, SPARSE_POINTS)
}

/// [`line_chart`] with a dot at every point of each series of at most `dot_up_to` points.
fn line_chart_dotted(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hlines: &[(&str, f64)],
    dot_up_to: usize,
) -> Result<()> {
    write_atomic(path, |tmp| {
        let root = BitMapBackend::new(tmp, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let runs: Vec<Vec<Vec<(f64, f64)>>> =
            series.iter().map(|s| finite_runs(s.points)).collect();
        let all = || runs.iter().flatten().flatten().copied();
        let hline_ys = hlines.iter().map(|h| h.1).filter(|y| y.is_finite());
        let (Some(xr), Some(yr)) = (
            span(all().map(|p| p.0), 0.02),
            span(all().map(|p| p.1).chain(hline_ys), 0.05),
        ) else {
            return no_data(&root, title);
        };
        let legend_pos = legend_corner(all(), &xr, &yr);
        let (x0, x1) = (xr.start, xr.end);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 28))
            .margin(18)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(xr, yr)
            .map_err(plot_err)?;
        // Steps are whole numbers; don't label them "50.0".
        let integer_x = all().all(|p| p.0.fract() == 0.0);
        style_mesh(&mut chart, x_label, y_label, integer_x)?;

        for (i, (s, runs)) in series.iter().zip(&runs).enumerate() {
            let style = color(i).stroke_width(2);
            // All runs of one series are one plotters series, so the legend has one entry even
            // when the line is broken (or empty).
            chart
                .draw_series(
                    runs.iter()
                        .filter(|r| r.len() >= 2)
                        .map(|r| PathElement::new(r.clone(), style)),
                )
                .map_err(plot_err)?
                .label(s.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
            // A point that starts no line gets a dot; so does every point of a sparse series
            // (evaluations every few hundred steps), so the line between two evaluations does not
            // read as measured.
            let sparse = s.points.len() <= dot_up_to;
            chart
                .draw_series(
                    runs.iter()
                        .filter(|r| sparse || r.len() == 1)
                        .flatten()
                        .map(|&p| Circle::new(p, 4, color(i).filled())),
                )
                .map_err(plot_err)?;
        }
        for (j, &(label, y)) in hlines.iter().enumerate() {
            if !y.is_finite() {
                continue;
            }
            let style = color(series.len() + j).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new([(x0, y), (x1, y)], 10, 6, style))
                .map_err(plot_err)?
                .label(format!("{label} = {}", fmt_num(y)))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
        }
        if !series.is_empty() || !hlines.is_empty() {
            draw_legend(&mut chart, legend_pos)?;
        }
        root.present().map_err(plot_err)
    })
}

/// Scatter (800x600) of several 2-D point clouds `(name, points)`, e.g. reference, tuned policy and
/// target-weighted samples, later clouds drawn over earlier ones.
///
/// Non-finite points are dropped, then each cloud is thinned to at most `max_points` by taking
/// evenly spaced indices (deterministic, so re-rendering a report gives the same picture); the
/// legend says how many points of how many are shown. `max_points == 0` is an error. With no
/// points at all the PNG shows the title and "no data".
pub fn scatter(
    path: &Path,
    title: &str,
    clouds: &[(&str, &[(f64, f64)])],
    max_points: usize,
) -> Result<()> {
    write_atomic(path, |tmp| {
        ensure!(max_points > 0, "max_points must be at least 1");
        let finite: Vec<Vec<(f64, f64)>> = clouds
            .iter()
            .map(|(_, pts)| pts.iter().copied().filter(|p| is_finite(*p)).collect())
            .collect();
        let shown: Vec<Vec<(f64, f64)>> = finite.iter().map(|f| subsample(f, max_points)).collect();
        let root = BitMapBackend::new(tmp, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let all = || shown.iter().flatten().copied();
        let (Some(xr), Some(yr)) = (
            span(all().map(|p| p.0), 0.05),
            span(all().map(|p| p.1), 0.05),
        ) else {
            return no_data(&root, title);
        };
        let legend_pos = legend_corner(all(), &xr, &yr);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 28))
            .margin(18)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(xr, yr)
            .map_err(plot_err)?;
        style_mesh(&mut chart, "", "", false)?;
        for (i, ((name, pts), shown)) in clouds.iter().zip(&shown).enumerate() {
            // Dense clouds are drawn translucent so their overlap stays readable.
            let alpha = if shown.len() > 500 { 0.35 } else { 0.8 };
            let fill = color(i).mix(alpha).filled();
            let label = if shown.len() < pts.len() {
                format!("{name} ({} of {})", shown.len(), pts.len())
            } else {
                format!("{name} ({})", shown.len())
            };
            chart
                .draw_series(shown.iter().map(|&p| Circle::new(p, 2, fill)))
                .map_err(plot_err)?
                .label(label)
                .legend(move |p| Circle::new(p, 5, color(i).filled()));
        }
        if !clouds.is_empty() {
            draw_legend(&mut chart, legend_pos)?;
        }
        root.present().map_err(plot_err)
    })
}

/// Critic calibration as a reliability diagram (800x600). Input: pairs of a predicted CDF value
/// `F(c_m | x)` and the observed indicator `1{r <= c_m}`.
///
/// Predictions are grouped into `bins` equal-width bins over [0, 1] (values outside are clamped,
/// NaN predictions dropped); the top panel plots each non-empty bin's observed frequency against
/// its mean prediction next to the diagonal, with the expected calibration error in the legend;
/// the bottom panel shows how many pairs fell in each bin. `bins == 0` is an error; with no pairs
/// the PNG shows the title and "no data".
pub fn calibration(path: &Path, title: &str, pairs: &[(f64, bool)], bins: usize) -> Result<()> {
    write_atomic(path, |tmp| {
        ensure!(bins > 0, "bins must be at least 1");
        let table = reliability_bins(pairs, bins);
        let root = BitMapBackend::new(tmp, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let n: usize = table.iter().map(|b| b.count).sum();
        if n == 0 {
            return no_data(&root, title);
        }
        let (top, bottom) = root.split_vertically(430);

        let mut chart = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 28))
            .margin(18)
            .margin_bottom(4)
            .x_label_area_size(30)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(plot_err)?;
        style_mesh(&mut chart, "", "observed frequency", false)?;
        let diag = RGBColor(90, 90, 90).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], 8, 6, diag))
            .map_err(plot_err)?
            .label("perfectly calibrated")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], diag));
        let observed: Vec<(f64, f64)> = table
            .iter()
            .filter(|b| b.count > 0)
            .map(|b| (b.mean_pred, b.freq))
            .collect();
        let line = color(0).stroke_width(2);
        chart
            .draw_series(LineSeries::new(observed.iter().copied(), line))
            .map_err(plot_err)?
            .label(format!("critic (ECE {:.3}, n = {n})", ece(&table)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], line));
        chart
            .draw_series(
                observed
                    .iter()
                    .map(|&p| Circle::new(p, 4, color(0).filled())),
            )
            .map_err(plot_err)?;
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;

        let max_count = table.iter().map(|b| b.count).max().unwrap_or(1) as f64;
        let mut hist = ChartBuilder::on(&bottom)
            .margin(18)
            .margin_top(4)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..1f64, 0f64..max_count * 1.1)
            .map_err(plot_err)?;
        hist.configure_mesh()
            .x_desc("predicted CDF F(c | x)")
            .y_desc("pairs")
            .y_labels(4)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(plot_err)?;
        let bar = color(0).mix(0.5).filled();
        hist.draw_series(
            table
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| Rectangle::new([(b.lo, 0.0), (b.hi, b.count as f64)], bar)),
        )
        .map_err(plot_err)?;
        root.present().map_err(plot_err)
    })
}

/// A grid of images, `images[i]` being `[channels][h][w]` with 1 (grey) or 3 (RGB) channels and
/// values in `range` (e.g. `(-1.0, 1.0)`; values outside are clamped, NaN drawn at the low end).
///
/// Images are laid out row by row in `min(cols, images.len())` columns, each pixel scaled up to a
/// `scale` x `scale` block, with [`TILE_GAP`] white pixels between and around tiles. With tile
/// size `(th, tw) = (max h * scale, max w * scale)`, `c` columns and `r` rows the PNG is
/// `c * tw + (c + 1) * TILE_GAP` wide and `r * th + (r + 1) * TILE_GAP` high. An empty list, a
/// zero `cols`/`scale`, an empty or ragged image, or another channel count is an error.
pub fn image_grid(
    path: &Path,
    images: &[Vec<Vec<Vec<f32>>>],
    cols: usize,
    scale: u32,
    range: (f32, f32),
) -> Result<()> {
    write_atomic(path, |tmp| {
        ensure!(!images.is_empty(), "no images to draw");
        ensure!(cols > 0, "cols must be at least 1");
        let cols = cols.min(images.len());
        let rows = images.len().div_ceil(cols);
        let tiles: Vec<(usize, usize, &Image)> = images
            .iter()
            .enumerate()
            .map(|(i, img)| (i / cols, i % cols, img))
            .collect();
        let (w, h, rgb) = compose_tiles(&tiles, rows, cols, scale, range)?;
        save_rgb(tmp, w, h, &rgb)
    })
}

/// One filmstrip per clip, `clips[i]` being `[frames][channels][h][w]` (values as in
/// [`image_grid`]): one row per clip, one column per frame, laid out and sized like
/// [`image_grid`] with as many columns as the longest clip has frames. A clip without frames is
/// a blank row; no frames at all is an error.
pub fn filmstrips(
    path: &Path,
    clips: &[Vec<Vec<Vec<Vec<f32>>>>],
    scale: u32,
    range: (f32, f32),
) -> Result<()> {
    write_atomic(path, |tmp| {
        let cols = clips.iter().map(Vec::len).max().unwrap_or(0);
        ensure!(cols > 0, "no frames to draw ({} clips)", clips.len());
        let tiles: Vec<(usize, usize, &Image)> = clips
            .iter()
            .enumerate()
            .flat_map(|(r, clip)| clip.iter().enumerate().map(move |(c, f)| (r, c, f)))
            .collect();
        let (w, h, rgb) = compose_tiles(&tiles, clips.len(), cols, scale, range)?;
        save_rgb(tmp, w, h, &rgb)
    })
}

/// Check that `path` is a complete PNG of at least `min_bytes` and return its `(width, height)`.
///
/// Checks the signature, walks every chunk verifying lengths and CRCs, and requires `IHDR` first
/// and `IEND` last, so a truncated file is rejected even when its header is intact.
pub fn check_png(path: &Path, min_bytes: u64) -> Result<(u32, u32)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    png_dimensions(&bytes, min_bytes).with_context(|| format!("checking PNG {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Charts: helpers

/// Plotters' error types borrow the backend's generics; flatten them to text.
fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

fn is_finite(p: (f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite()
}

/// Maximal runs of consecutive finite points; a non-finite point ends a run.
fn finite_runs(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    points
        .split(|&p| !is_finite(p))
        .filter(|r| !r.is_empty())
        .map(<[_]>::to_vec)
        .collect()
}

/// `min..max` of the finite values, widened by `pad` of its width on each side; a single value
/// gets a small window around it so the axis is never degenerate. `None` without finite values.
fn span(values: impl Iterator<Item = f64>, pad: f64) -> Option<Range<f64>> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold(None, |acc: Option<(f64, f64)>, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })?;
    let width = hi - lo;
    if width > 0.0 && width.is_finite() {
        Some(lo - pad * width..hi + pad * width)
    } else {
        let half = (lo.abs() * 0.05).max(0.5);
        Some(lo - half..hi + half)
    }
}

/// Evenly spaced subsample of the finite points: all of them when there are at most `max`,
/// otherwise indices `i * n / max` for `i < max` (deterministic, order kept).
fn subsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    let finite: Vec<(f64, f64)> = points.iter().copied().filter(|&p| is_finite(p)).collect();
    let n = finite.len();
    if n <= max {
        return finite;
    }
    (0..max).map(|i| finite[i * n / max]).collect()
}

/// The legend goes in the corner whose quarter of the plot holds the fewest points.
fn legend_corner(
    points: impl Iterator<Item = (f64, f64)>,
    xr: &Range<f64>,
    yr: &Range<f64>,
) -> SeriesLabelPosition {
    // [upper left, upper right, lower left, lower right]
    let mut counts = [0usize; 4];
    let (xw, yw) = (xr.end - xr.start, yr.end - yr.start);
    for (x, y) in points {
        let (fx, fy) = ((x - xr.start) / xw, (y - yr.start) / yw);
        let left = fx < 0.4;
        let right = fx > 0.6;
        let upper = fy > 0.65;
        let lower = fy < 0.35;
        for (k, hit) in [upper && left, upper && right, lower && left, lower && right]
            .into_iter()
            .enumerate()
        {
            counts[k] += usize::from(hit);
        }
    }
    // Ties prefer upper right, the conventional place.
    let order = [1, 0, 3, 2];
    let best = order.into_iter().min_by_key(|&k| counts[k]).unwrap_or(1);
    match best {
        0 => SeriesLabelPosition::UpperLeft,
        2 => SeriesLabelPosition::LowerLeft,
        3 => SeriesLabelPosition::LowerRight,
        _ => SeriesLabelPosition::UpperRight,
    }
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Axes, grid and labels. `integer_x` (steps, epochs) prints whole x ticks without ".0".
fn style_mesh(chart: &mut Chart, x_label: &str, y_label: &str, integer_x: bool) -> Result<()> {
    let whole = |v: &f64| {
        if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            fmt_num(*v)
        }
    };
    let mut mesh = chart.configure_mesh();
    if integer_x {
        mesh.x_label_formatter(&whole);
    }
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(plot_err)
}

fn draw_legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, pos: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .margin(12)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(plot_err)
}

/// A chart with nothing to plot yet: the title and "no data", still a valid PNG.
fn no_data(root: &DrawingArea<BitMapBackend, Shift>, title: &str) -> Result<()> {
    let (w, h) = root.dim_in_pixel();
    let center = Pos::new(HPos::Center, VPos::Center);
    root.draw(&Text::new(
        title.to_string(),
        (w as i32 / 2, 40),
        ("sans-serif", 28).into_font().color(&BLACK).pos(center),
    ))
    .map_err(plot_err)?;
    root.draw(&Text::new(
        "no data",
        (w as i32 / 2, h as i32 / 2),
        ("sans-serif", 24)
            .into_font()
            .color(&RGBColor(110, 110, 110))
            .pos(center),
    ))
    .map_err(plot_err)?;
    root.present().map_err(plot_err)
}

/// Short tick-like rendering of a reference value: 0.85, 1.2e-5, 12000.
fn fmt_num(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) {
        format!("{v:.3e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// One reliability-diagram bin over predicted values `[lo, hi)`.
#[derive(Debug, Clone, PartialEq)]
struct Bin {
    lo: f64,
    hi: f64,
    count: usize,
    /// Mean predicted value of the pairs in the bin (bin centre when empty).
    mean_pred: f64,
    /// Share of the bin's pairs whose indicator is true (0 when empty).
    freq: f64,
}

/// Bins `pairs` by predicted value into `bins` equal-width bins over [0, 1]; predictions are
/// clamped into [0, 1] (1.0 falls in the last bin) and NaN predictions are skipped.
fn reliability_bins(pairs: &[(f64, bool)], bins: usize) -> Vec<Bin> {
    let mut sum_pred = vec![0.0; bins];
    let mut hits = vec![0usize; bins];
    let mut count = vec![0usize; bins];
    for &(p, hit) in pairs {
        if p.is_nan() {
            continue;
        }
        let p = p.clamp(0.0, 1.0);
        let k = ((p * bins as f64) as usize).min(bins - 1);
        sum_pred[k] += p;
        hits[k] += usize::from(hit);
        count[k] += 1;
    }
    (0..bins)
        .map(|k| {
            let (lo, hi) = (k as f64 / bins as f64, (k + 1) as f64 / bins as f64);
            let n = count[k];
            Bin {
                lo,
                hi,
                count: n,
                mean_pred: if n > 0 {
                    sum_pred[k] / n as f64
                } else {
                    0.5 * (lo + hi)
                },
                freq: if n > 0 {
                    hits[k] as f64 / n as f64
                } else {
                    0.0
                },
            }
        })
        .collect()
}

/// Expected calibration error: count-weighted mean of |observed frequency - mean prediction|.
fn ece(table: &[Bin]) -> f64 {
    let n: usize = table.iter().map(|b| b.count).sum();
    if n == 0 {
        return 0.0;
    }
    table
        .iter()
        .map(|b| b.count as f64 * (b.freq - b.mean_pred).abs())
        .sum::<f64>()
        / n as f64
}

// ---------------------------------------------------------------------------------------------
// Image grids

/// One image: `[channels][h][w]`.
type Image = Vec<Vec<Vec<f32>>>;

/// Check an image's shape and return `(h, w)`.
fn image_shape(img: &Image) -> Result<(usize, usize)> {
    ensure!(
        img.len() == 1 || img.len() == 3,
        "expected 1 or 3 channels, got {}",
        img.len()
    );
    let h = img[0].len();
    let w = img[0].first().map_or(0, Vec::len);
    ensure!(h > 0 && w > 0, "empty image ({h}x{w})");
    for (c, plane) in img.iter().enumerate() {
        ensure!(
            plane.len() == h,
            "channel {c} has {} rows, channel 0 has {h}",
            plane.len()
        );
        for (y, row) in plane.iter().enumerate() {
            ensure!(
                row.len() == w,
                "channel {c} row {y} has {} pixels, expected {w}",
                row.len()
            );
        }
    }
    Ok((h, w))
}

/// Lay out `(row, col, image)` tiles on a white `rows` x `cols` grid (see [`image_grid`] for the
/// geometry) and return `(width, height, rgb bytes)`.
fn compose_tiles(
    tiles: &[(usize, usize, &Image)],
    rows: usize,
    cols: usize,
    scale: u32,
    (lo, hi): (f32, f32),
) -> Result<(u32, u32, Vec<u8>)> {
    ensure!(scale > 0, "scale must be at least 1");
    ensure!(
        lo.is_finite() && hi.is_finite() && hi > lo,
        "value range ({lo}, {hi}) must be finite and increasing"
    );
    let mut th = 0;
    let mut tw = 0;
    for (i, (_, _, img)) in tiles.iter().enumerate() {
        let (h, w) = image_shape(img).with_context(|| format!("image {i}"))?;
        th = th.max(h);
        tw = tw.max(w);
    }
    let scale = scale as u64;
    let gap = TILE_GAP as u64;
    let (th, tw) = (th as u64 * scale, tw as u64 * scale);
    let width = cols as u64 * tw + (cols as u64 + 1) * gap;
    let height = rows as u64 * th + (rows as u64 + 1) * gap;
    ensure!(
        width * height <= MAX_GRID_PIXELS,
        "grid of {width}x{height} pixels is too large; lower scale or the number of images"
    );
    let (width, height) = (width as usize, height as usize);
    let mut rgb = vec![255u8; width * height * 3];
    let to_byte = |v: f32| -> u8 {
        if v.is_nan() {
            return 0;
        }
        (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let scale = scale as usize;
    for &(r, c, img) in tiles {
        let x0 = gap as usize + c * (tw as usize + gap as usize);
        let y0 = gap as usize + r * (th as usize + gap as usize);
        let (h, w) = (img[0].len(), img[0][0].len());
        for y in 0..h {
            for x in 0..w {
                let px = if img.len() == 3 {
                    [
                        to_byte(img[0][y][x]),
                        to_byte(img[1][y][x]),
                        to_byte(img[2][y][x]),
                    ]
                } else {
                    [to_byte(img[0][y][x]); 3]
                };
                for dy in 0..scale {
                    let row = (y0 + y * scale + dy) * width;
                    for dx in 0..scale {
                        let at = (row + x0 + x * scale + dx) * 3;
                        rgb[at..at + 3].copy_from_slice(&px);
                    }
                }
            }
        }
    }
    Ok((width as u32, height as u32, rgb))
}

/// Write an RGB buffer through plotters' bitmap backend (which encodes by file extension).
fn save_rgb(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<()> {
    let mut backend = BitMapBackend::new(path, (w, h));
    backend.blit_bitmap((0, 0), (w, h), rgb).map_err(plot_err)?;
    backend.present().map_err(plot_err)
}

// ---------------------------------------------------------------------------------------------
// Files

fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    ensure!(ok, "the embedded font DejaVuSans.ttf could not be parsed");
    Ok(())
}

/// A fresh temporary path next to `path`, ending in `.png` so the encoder picks PNG.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "plot".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}-{n}.tmp.png", std::process::id()))
}

/// Draw into a temporary file with `draw`, then rename it onto `path`; on failure nothing is left
/// behind and the error names `path`.
fn write_atomic(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let result = (|| {
        ensure_font()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating directory {}", dir.display()))?;
        }
        let tmp = temp_path(path);
        // The backend is dropped inside `draw`, so the temporary file is complete (or abandoned)
        // by the time it is renamed or removed.
        let drawn = draw(&tmp).and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} into place", tmp.display()))
        });
        if drawn.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        drawn
    })();
    result.with_context(|| format!("writing plot {}", path.display()))
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn png_dimensions(bytes: &[u8], min_bytes: u64) -> Result<(u32, u32)> {
    ensure!(
        bytes.len() as u64 >= min_bytes,
        "{} bytes, expected at least {min_bytes}",
        bytes.len()
    );
    ensure!(
        bytes.starts_with(&PNG_SIGNATURE),
        "not a PNG (bad signature)"
    );
    let be32 =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut at = PNG_SIGNATURE.len();
    let mut dims = None;
    loop {
        ensure!(
            at + 12 <= bytes.len(),
            "truncated: chunk header at byte {at} runs past the end"
        );
        let len = be32(at) as usize;
        let kind = &bytes[at + 4..at + 8];
        let end = at + 12 + len;
        ensure!(
            end <= bytes.len(),
            "truncated: chunk at byte {at} runs past the end"
        );
        let crc = be32(end - 4);
        ensure!(
            crc32(&bytes[at + 4..end - 4]) == crc,
            "CRC mismatch in {} chunk at byte {at}",
            String::from_utf8_lossy(kind)
        );
        if dims.is_none() {
            ensure!(
                kind == b"IHDR" && len == 13,
                "first chunk is not a 13-byte IHDR"
            );
            let (w, h) = (be32(at + 8), be32(at + 12));
            ensure!(w > 0 && h > 0, "zero-sized image ({w}x{h})");
            dims = Some((w, h));
        }
        at = end;
        if kind == b"IEND" {
            ensure!(at == bytes.len(), "{} bytes after IEND", bytes.len() - at);
            return dims.ok_or_else(|| anyhow!("no IHDR chunk"));
        }
    }
}

/// CRC-32 (ISO-HDLC, as used by PNG), bitwise: plots are small and this runs once per check.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unique scratch directory under the system temp dir, removed on drop unless
    /// `TILT_KEEP_PLOTS` is set (to look at the pictures).
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tilt-plots-{}-{}-{name}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Scratch(dir)
        }
        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&self.0)
                .expect("read scratch dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            if std::env::var_os("TILT_KEEP_PLOTS").is_none() {
                let _ = std::fs::remove_dir_all(&self.0);
            } else {
                eprintln!("plots kept in {}", self.0.display());
            }
        }
    }

    /// Deterministic pseudo-random numbers in [0, 1) (64-bit LCG, Knuth's MMIX constants).
    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A noisy ring of radius `r` around `(cx, cy)`.
    fn ring(n: usize, seed: u64, r: f64, (cx, cy): (f64, f64)) -> Vec<(f64, f64)> {
        let mut u = lcg(seed);
        (0..n)
            .map(|_| {
                let t = u() * std::f64::consts::TAU;
                let rr = r + 0.3 * (u() - 0.5);
                (cx + rr * t.cos(), cy + rr * t.sin())
            })
            .collect()
    }

    #[test]
    fn line_chart_writes_800x600_png_atomically() {
        let dir = Scratch::new("line");
        let loss: Vec<(f64, f64)> = (0..300)
            .map(|i| (i as f64, 0.7 * (-(i as f64) / 80.0).exp() + 0.05))
            .collect();
        let acc: Vec<(f64, f64)> = (0..300)
            .map(|i| (i as f64, 1.0 - 0.5 * (-(i as f64) / 60.0).exp()))
            .collect();
        let path = dir.file("loss.png");
        let render = || {
            line_chart(
                &path,
                "Loss and implicit accuracy",
                "learner step",
                "value",
                &[
                    Series {
                        name: "loss",
                        points: &loss,
                    },
                    Series {
                        name: "implicit accuracy",
                        points: &acc,
                    },
                ],
                &[("chance", 0.5)],
            )
        };
        render().expect("line chart");
        assert_eq!(check_png(&path, 2048).expect("valid png"), (800, 600));
        // No temporary files left next to the plot.
        assert_eq!(dir.entries(), vec!["loss.png".to_string()]);
        // Re-rendering replaces the file in place.
        render().expect("re-render");
        assert_eq!(dir.entries(), vec!["loss.png".to_string()]);
        check_png(&path, 2048).expect("valid png");
    }

    #[test]
    fn line_chart_skips_nan_and_handles_degenerate_series() {
        let dir = Scratch::new("line-nan");
        let gappy = [
            (0.0, 1.0),
            (1.0, f64::NAN),
            (2.0, 2.0),
            (3.0, 2.5),
            (f64::INFINITY, 3.0),
            (5.0, 1.5),
        ];
        let all_nan = [(f64::NAN, f64::NAN), (1.0, f64::NAN)];
        let single = [(4.0, 0.5)];
        let path = dir.file("gappy.png");
        line_chart(
            &path,
            "Reward",
            "step",
            "reward",
            &[
                Series {
                    name: "gappy",
                    points: &gappy,
                },
                Series {
                    name: "all NaN",
                    points: &all_nan,
                },
                Series {
                    name: "single",
                    points: &single,
                },
            ],
            &[("target", 2.2), ("nan line", f64::NAN)],
        )
        .expect("chart with NaN");
        assert_eq!(check_png(&path, 2048).expect("valid png"), (800, 600));

        // One point only, all at the same y: the axis ranges must not collapse.
        let flat = dir.file("flat.png");
        line_chart(
            &flat,
            "Flat",
            "x",
            "y",
            &[Series {
                name: "one",
                points: &[(3.0, 7.0)],
            }],
            &[],
        )
        .expect("single point chart");
        check_png(&flat, 2048).expect("valid png");
    }

    /// Pixels of the chart at `path` in palette colour `i`.
    fn pixels_of_color(path: &Path, i: usize) -> usize {
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(path).expect("open png"),
        ));
        let mut reader = decoder.read_info().expect("png info");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("png frame");
        let c = color(i);
        let step = info.color_type.samples();
        buf[..info.buffer_size()]
            .chunks(step)
            .filter(|px| px[..3] == [c.0, c.1, c.2])
            .count()
    }

    #[test]
    fn sparse_series_get_a_dot_at_every_point() {
        // Three evaluations on a line from (0, 0) to (1000, 1), drawn with and without dots: the
        // three dots of radius 4 (~50 pixels each, part of it under the line) add ~100 pixels of
        // the series' colour. The public chart dots them (3 <= SPARSE_POINTS); a dense series
        // is not dotted.
        let dir = Scratch::new("line-dots");
        let pts = [(0.0, 0.0), (500.0, 0.8), (1000.0, 1.0)];
        let series = [Series {
            name: "policy",
            points: &pts,
        }];
        let count = |name: &str, dot_up_to: usize| {
            let path = dir.file(name);
            line_chart_dotted(&path, "Reward", "step", "reward", &series, &[], dot_up_to)
                .expect("chart");
            pixels_of_color(&path, 0)
        };
        let (dotted, plain) = (count("dotted.png", 3), count("plain.png", 2));
        assert!(plain > 300, "the line itself is drawn: {plain}");
        assert!(
            dotted >= plain + 60,
            "3 dots add at least 60 pixels: dotted {dotted}, plain {plain}"
        );
        let public = dir.file("public.png");
        line_chart(&public, "Reward", "step", "reward", &series, &[]).expect("chart");
        assert_eq!(pixels_of_color(&public, 0), dotted);
    }

    #[test]
    fn line_chart_without_data_still_makes_a_png() {
        let dir = Scratch::new("line-empty");
        let path = dir.file("empty.png");
        line_chart(&path, "Loss", "step", "loss", &[], &[("target", 1.0)]).expect("empty chart");
        assert_eq!(check_png(&path, 1024).expect("valid png"), (800, 600));
        let nan = [(f64::NAN, 1.0)];
        line_chart(
            &path,
            "Loss",
            "step",
            "loss",
            &[Series {
                name: "nan",
                points: &nan,
            }],
            &[],
        )
        .expect("all-NaN chart");
        assert_eq!(check_png(&path, 1024).expect("valid png"), (800, 600));
    }

    #[test]
    fn scatter_of_large_clouds() {
        let dir = Scratch::new("scatter");
        let reference = ring(20_000, 1, 2.0, (0.0, 0.0));
        let tuned = ring(20_000, 2, 1.0, (1.5, 0.5));
        let target = ring(300, 3, 0.5, (2.0, 0.8));
        let path = dir.file("samples.png");
        scatter(
            &path,
            "Samples",
            &[
                ("reference", &reference),
                ("tuned policy", &tuned),
                ("target-weighted", &target),
            ],
            2000,
        )
        .expect("scatter");
        assert_eq!(check_png(&path, 2048).expect("valid png"), (800, 600));
        assert_eq!(dir.entries(), vec!["samples.png".to_string()]);
    }

    #[test]
    fn scatter_handles_nan_empty_and_zero_limit() {
        let dir = Scratch::new("scatter-nan");
        let pts = [
            (0.0, 0.0),
            (f64::NAN, 1.0),
            (1.0, f64::INFINITY),
            (1.0, 1.0),
        ];
        let path = dir.file("nan.png");
        scatter(&path, "NaN", &[("a", &pts), ("empty", &[])], 10).expect("scatter with NaN");
        check_png(&path, 2048).expect("valid png");

        let empty = dir.file("empty.png");
        scatter(&empty, "Nothing", &[], 10).expect("empty scatter");
        assert_eq!(check_png(&empty, 1024).expect("valid png"), (800, 600));

        let bad = dir.file("zero.png");
        let err = scatter(&bad, "zero", &[("a", &pts)], 0).expect_err("max_points 0");
        assert!(format!("{err:#}").contains("zero.png"), "{err:#}");
        assert!(!bad.exists());
        assert_eq!(
            dir.entries(),
            vec!["empty.png".to_string(), "nan.png".to_string()]
        );
    }

    #[test]
    fn subsample_is_deterministic_even_and_bounded() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 0.0)).collect();
        // Indices i * 10 / 4 for i = 0..4: 0, 2, 5, 7 (integer division by hand).
        let xs: Vec<f64> = subsample(&pts, 4).iter().map(|p| p.0).collect();
        assert_eq!(xs, vec![0.0, 2.0, 5.0, 7.0]);
        assert_eq!(subsample(&pts, 10), pts);
        assert_eq!(subsample(&pts, 50), pts);

        let big = ring(20_000, 7, 1.0, (0.0, 0.0));
        let a = subsample(&big, 1500);
        let b = subsample(&big, 1500);
        assert_eq!(a.len(), 1500);
        assert_eq!(a, b);

        // Non-finite points never survive, and don't count against the limit.
        let with_nan = [
            (f64::NAN, 0.0),
            (1.0, 1.0),
            (2.0, f64::NEG_INFINITY),
            (3.0, 3.0),
        ];
        assert_eq!(subsample(&with_nan, 2), vec![(1.0, 1.0), (3.0, 3.0)]);
    }

    #[test]
    fn reliability_bins_by_hand() {
        // 2 bins over [0, 1]: [0, 0.5) gets 0.1, 0.2, 0.3 (hits: no, yes, no) and the clamped
        // -0.5 -> 0.0 (no); [0.5, 1] gets 0.8, 1.0 and the clamped 1.7 -> 1.0 (all yes).
        let pairs = [
            (0.1, false),
            (0.2, true),
            (0.3, false),
            (-0.5, false),
            (0.8, true),
            (1.0, true),
            (1.7, true),
            (f64::NAN, true),
        ];
        let t = reliability_bins(&pairs, 2);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].lo, t[0].hi, t[0].count), (0.0, 0.5, 4));
        assert!((t[0].mean_pred - 0.6 / 4.0).abs() < 1e-12); // (0.1+0.2+0.3+0)/4
        assert!((t[0].freq - 0.25).abs() < 1e-12); // 1 of 4
        assert_eq!((t[1].lo, t[1].hi, t[1].count), (0.5, 1.0, 3));
        assert!((t[1].mean_pred - 2.8 / 3.0).abs() < 1e-12); // (0.8+1+1)/3
        assert_eq!(t[1].freq, 1.0);
        // ECE = (4 |0.25 - 0.15| + 3 |1 - 2.8/3|) / 7 = (0.4 + 0.2) / 7.
        assert!((ece(&t) - 0.6 / 7.0).abs() < 1e-12);

        // An empty bin reports its centre and zero frequency.
        let t = reliability_bins(&[(0.9, true)], 4);
        assert_eq!(t[0].count, 0);
        assert_eq!(t[0].mean_pred, 0.125);
        assert_eq!(t[3].count, 1);
    }

    #[test]
    fn calibration_writes_png() {
        let dir = Scratch::new("calibration");
        // A slightly over-confident critic: the observed frequency is p^1.3, not p.
        let mut u = lcg(11);
        let pairs: Vec<(f64, bool)> = (0..5000)
            .map(|_| {
                let p = u();
                (p, u() < p.powf(1.3))
            })
            .collect();
        let path = dir.file("calibration.png");
        calibration(&path, "Critic calibration", &pairs, 10).expect("calibration");
        assert_eq!(check_png(&path, 2048).expect("valid png"), (800, 600));

        let empty = dir.file("empty.png");
        calibration(&empty, "Critic calibration", &[(f64::NAN, true)], 10).expect("no data");
        assert_eq!(check_png(&empty, 1024).expect("valid png"), (800, 600));
        assert!(calibration(&dir.file("zero.png"), "t", &pairs, 0).is_err());
    }

    /// `[channels][h][w]` image with values `f(c, y, x)`.
    fn image(c: usize, h: usize, w: usize, f: impl Fn(usize, usize, usize) -> f32) -> Image {
        (0..c)
            .map(|c| {
                (0..h)
                    .map(|y| (0..w).map(|x| f(c, y, x)).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn image_grid_dimensions() {
        let dir = Scratch::new("grid");
        // 10 grey images of h 8, w 6, 4 columns, scale 3: tiles 18 wide and 24 high, 3 rows.
        // width = 4 * 18 + 5 * 2 = 82, height = 3 * 24 + 4 * 2 = 80.
        let images: Vec<Image> = (0..10)
            .map(|i| image(1, 8, 6, |_, y, x| ((x + y + i) % 7) as f32 / 3.0 - 1.0))
            .collect();
        let path = dir.file("grid.png");
        image_grid(&path, &images, 4, 3, (-1.0, 1.0)).expect("grid");
        assert_eq!(check_png(&path, 100).expect("valid png"), (82, 80));

        // Fewer images than columns: only 3 columns. RGB 5x5 in [0, 1] at scale 8: tiles 40.
        // width = 3 * 40 + 4 * 2 = 128, height = 40 + 2 * 2 = 44.
        let rgb: Vec<Image> = (0..3)
            .map(|i| {
                image(
                    3,
                    5,
                    5,
                    |c, y, x| if c == i { (x + y) as f32 / 8.0 } else { 0.0 },
                )
            })
            .collect();
        let path = dir.file("rgb.png");
        image_grid(&path, &rgb, 8, 8, (0.0, 1.0)).expect("rgb grid");
        assert_eq!(check_png(&path, 100).expect("valid png"), (128, 44));
    }

    #[test]
    fn tiles_map_values_and_positions() {
        // One 1x2 grey image [-1, 1] and one 1x1 image [0] in a 1x2 grid at scale 2: tiles are
        // 4 wide and 2 high; width = 2 * 4 + 3 * 2 = 14, height = 2 + 2 * 2 = 6.
        let a = image(1, 1, 2, |_, _, x| if x == 0 { -1.0 } else { 1.0 });
        let b = image(1, 1, 1, |_, _, _| f32::NAN);
        let c = image(1, 1, 1, |_, _, _| 0.0);
        let (w, h, rgb) =
            compose_tiles(&[(0, 0, &a), (0, 1, &c)], 1, 2, 2, (-1.0, 1.0)).expect("compose");
        assert_eq!((w, h), (14, 6));
        let px = |x: usize, y: usize| rgb[(y * w as usize + x) * 3];
        assert_eq!(px(0, 0), 255); // gap
        assert_eq!(px(2, 2), 0); // a[0][0] = -1 at (2..4, 2..4)
        assert_eq!(px(3, 3), 0);
        assert_eq!(px(4, 2), 255); // a[0][1] = 1
        assert_eq!(px(8, 2), 128); // c = 0 -> 127.5 rounds to 128, tile 2 starts at x = 2+4+2
        assert_eq!(px(10, 2), 255); // c is 1 pixel wide: the rest of its tile stays white
        let (_, _, rgb) = compose_tiles(&[(0, 0, &b)], 1, 1, 1, (-1.0, 1.0)).expect("NaN");
        assert_eq!(&rgb[(2 * 5 + 2) * 3..(2 * 5 + 2) * 3 + 3], &[0, 0, 0]); // NaN -> low end
    }

    #[test]
    fn filmstrip_dimensions() {
        let dir = Scratch::new("film");
        // 3 clips of 5 RGB frames, 4x4, scale 2: tiles 8x8.
        // width = 5 * 8 + 6 * 2 = 52, height = 3 * 8 + 4 * 2 = 32.
        let clips: Vec<Vec<Image>> = (0..3)
            .map(|k| {
                (0..5)
                    .map(|f| {
                        image(3, 4, 4, |c, y, x| {
                            ((c + y + x + f + k) % 5) as f32 / 2.0 - 1.0
                        })
                    })
                    .collect()
            })
            .collect();
        let path = dir.file("film.png");
        filmstrips(&path, &clips, 2, (-1.0, 1.0)).expect("filmstrips");
        assert_eq!(check_png(&path, 100).expect("valid png"), (52, 32));

        // An empty clip is a blank row: 4 rows now, height = 4 * 8 + 5 * 2 = 42.
        let mut with_empty = clips.clone();
        with_empty.push(Vec::new());
        filmstrips(&path, &with_empty, 2, (-1.0, 1.0)).expect("blank row");
        assert_eq!(check_png(&path, 100).expect("valid png"), (52, 42));
        assert!(filmstrips(&path, &[Vec::new()], 2, (-1.0, 1.0)).is_err());
    }

    #[test]
    fn image_errors_name_the_file_and_leave_nothing() {
        let dir = Scratch::new("grid-err");
        let path = dir.file("bad.png");
        let err = image_grid(&path, &[], 4, 2, (-1.0, 1.0)).expect_err("no images");
        assert!(format!("{err:#}").contains("bad.png"), "{err:#}");
        let two_channels = vec![image(2, 3, 3, |_, _, _| 0.0)];
        assert!(image_grid(&path, &two_channels, 1, 1, (-1.0, 1.0)).is_err());
        let mut ragged = image(1, 3, 3, |_, _, _| 0.0);
        ragged[0][1].pop();
        let err = image_grid(&path, &[ragged], 1, 1, (-1.0, 1.0)).expect_err("ragged");
        assert!(format!("{err:#}").contains("row 1"), "{err:#}");
        let ok = vec![image(1, 3, 3, |_, _, _| 0.0)];
        assert!(image_grid(&path, &ok, 0, 1, (-1.0, 1.0)).is_err());
        assert!(image_grid(&path, &ok, 1, 0, (-1.0, 1.0)).is_err());
        assert!(image_grid(&path, &ok, 1, 1, (1.0, 1.0)).is_err());
        assert!(dir.entries().is_empty(), "{:?}", dir.entries());
    }

    #[test]
    fn check_png_rejects_bad_files() {
        let dir = Scratch::new("check");
        let text = dir.file("text.png");
        std::fs::write(
            &text,
            "this is not a png, just text long enough to pass min_bytes",
        )
        .expect("write");
        let err = check_png(&text, 10).expect_err("text");
        assert!(format!("{err:#}").contains("text.png"), "{err:#}");
        assert!(format!("{err:#}").contains("signature"), "{err:#}");

        let good = dir.file("good.png");
        let images = vec![image(1, 16, 16, |_, y, x| ((x * y) % 5) as f32 / 4.0)];
        image_grid(&good, &images, 1, 4, (0.0, 1.0)).expect("grid");
        let bytes = std::fs::read(&good).expect("read");
        // 16 * 4 + 2 * 2 = 68 square.
        assert_eq!(check_png(&good, 0).expect("good"), (68, 68));
        let err = check_png(&good, bytes.len() as u64 + 1).expect_err("too small");
        assert!(format!("{err:#}").contains("at least"), "{err:#}");

        let cut = dir.file("cut.png");
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).expect("write");
        assert!(check_png(&cut, 0).is_err());
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
        let err = check_png(&cut, 0).expect_err("half");
        assert!(format!("{err:#}").contains("truncated"), "{err:#}");
        std::fs::write(&cut, &bytes[..8]).expect("write");
        assert!(check_png(&cut, 0).is_err());

        let mut flipped = bytes.clone();
        flipped[40] ^= 0xff;
        std::fs::write(&cut, &flipped).expect("write");
        assert!(check_png(&cut, 0).is_err());

        assert!(check_png(&dir.file("missing.png"), 0).is_err());
    }

    #[test]
    fn crc32_known_value() {
        // The standard CRC-32 check value for "123456789".
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
