//! PNG plots of a run. Each chart is drawn as SVG by plotters and rasterised by resvg with the
//! system fonts, so no C font stack (fontconfig, freetype) has to be present or linked.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};
use plotters::{
    coord::{
        Shift,
        combinators::LogCoord,
        ranged1d::{AsRangedCoord, ValueFormatter},
    },
    element::DashedPathElement,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use resvg::{tiny_skia, usvg};

use crate::results::{Contender, Results, median};

/// Image size in pixels; the SVG is drawn at this size and rasterised 1:1.
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 700;

/// A generic family, so that the rasteriser picks whatever sans-serif font the machine has.
const FONT: &str = "sans-serif";
/// Families tried, in order, as the meaning of "sans-serif": fontdb's own default (Arial) is
/// rarely installed on Linux, and without a match usvg silently drops the text.
const PREFERRED_FAMILIES: [&str; 4] = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial"];
/// What to install when no font at all is found (the one `cargo xtask bench` installs).
const FONT_PACKAGE: &str = "fonts-dejavu-core";

/// Font sizes as plotters takes them (its SVG backend writes `size / 1.24` as the font size).
const TITLE_SIZE: u32 = 30;
const AXIS_TITLE_SIZE: u32 = 22;
const TICK_LABEL_SIZE: u32 = 18;
const LEGEND_SIZE: u32 = 18;

/// Space around and inside the chart, pixels.
const MARGIN: u32 = 20;
const X_LABEL_AREA: u32 = 60;
const Y_LABEL_AREA: u32 = 100;

const LINE_WIDTH: u32 = 3;
const POINT_RADIUS: u32 = 5;
/// Dash and gap of the dashed lines, pixels.
const DASH: u32 = 12;
const DASH_GAP: u32 = 8;
/// The legend's column on the right, pixels: wide enough for "floor (parse, XDP_PASS)".
const LEGEND_WIDTH: u32 = 280;
/// From the top of the legend's column to its first row (level with the plot's top), between
/// rows, the length of a row's line sample and the gap to its text, pixels.
const LEGEND_TOP: i32 = 30;
const LEGEND_ROW: i32 = 28;
const LEGEND_SAMPLE: i32 = 36;
const LEGEND_TEXT_GAP: i32 = 10;
/// Opacity of the grid lines.
const BOLD_GRID_OPACITY: f64 = 0.25;
const LIGHT_GRID_OPACITY: f64 = 0.08;

/// The x axis spans 1 to 30,000 Services; the ends are padded so that the points at 1 and at
/// the largest size are not cut by the frame.
const X_MIN: f64 = 0.7;
const X_MAX_SERVICES: f64 = 30_000.0;
const X_END_PADDING: f64 = 1.5;
/// Room above the highest point of a linear y axis, as a factor.
const Y_HEADROOM: f64 = 1.15;
/// Widens a log axis a hair past its end decades: rounding in plotters' tick placement would
/// otherwise drop the tick at the very end.
const LOG_EDGE_SLACK: f64 = 1e-9;
/// Significant digits of a tick label below 1,000.
const SIGNIFICANT_DIGITS: i32 = 3;
/// Most decimals a tick label gets, whatever its size.
const MAX_DECIMALS: i32 = 6;

/// One colour per contender, the same in every chart (Tableau 10).
const LB_COLOUR: RGBColor = RGBColor(31, 119, 180);
const IPTABLES_COLOUR: RGBColor = RGBColor(214, 39, 40);
const NFTABLES_COLOUR: RGBColor = RGBColor(44, 160, 44);
const DIRECT_COLOUR: RGBColor = RGBColor(255, 127, 14);
/// Colours of the packet cases, in the order of `CASE_ORDER` then by name: Tableau 10 without
/// its grey, which is the floor's.
const CASE_COLOURS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
/// The floor is a reference, not a contender: grey.
const FLOOR_COLOUR: RGBColor = RGBColor(128, 128, 128);
/// The legend's key to the line styles, which stand for no single series.
const KEY_COLOUR: RGBColor = RGBColor(60, 60, 60);
/// The packet cases in the order they are read (simplest path first).
const CASE_ORDER: [&str; 7] = [
    "no_service",
    "tcp_new",
    "tcp_established",
    "tcp_reply",
    "udp_established",
    "tcp_established_hot",
    "tcp_reply_hot",
];

/// Draws every chart `results` has data for into `dir` (created if missing) as PNG, and returns
/// the files written. A chart without a single finite point is skipped, so empty results write
/// nothing; the system fonts are only loaded when there is something to draw.
pub fn write_plots(results: &Results, dir: &Path) -> Result<Vec<PathBuf>> {
    let charts: Vec<Chart> = [
        connection_rate(results),
        latency(results),
        packet_cost(results),
        programming(results),
    ]
    .into_iter()
    .filter(Chart::has_data)
    .collect();
    if charts.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let rasteriser = Rasteriser::new()?;
    let mut written = Vec::with_capacity(charts.len());
    for chart in &charts {
        let path = dir.join(chart.file);
        rasteriser
            .render(chart)?
            .save_png(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// How a line is drawn; the legend's key says what each style means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stroke {
    Solid,
    Dashed,
}

/// One line with its points.
struct Line {
    /// Its legend entry; none for a line whose colour is already in the legend and whose style
    /// the key explains.
    label: Option<String>,
    colour: RGBColor,
    stroke: Stroke,
    /// (Services, value), sorted by Services, all finite and positive in x.
    points: Vec<(f64, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scale {
    Linear,
    Log,
}

/// One chart, independent of how it is drawn.
struct Chart {
    file: &'static str,
    title: String,
    y_title: &'static str,
    y_scale: Scale,
    lines: Vec<Line>,
    /// The legend's key to the line styles: what solid and dashed mean.
    keys: Vec<(String, Stroke)>,
}

/// One row of the legend.
struct LegendEntry {
    label: String,
    colour: RGBColor,
    stroke: Stroke,
}

impl Chart {
    /// The labelled lines, then the key to the line styles.
    fn legend(&self) -> Vec<LegendEntry> {
        let lines = self.lines.iter().filter_map(|line| {
            line.label.as_ref().map(|label| LegendEntry {
                label: label.clone(),
                colour: line.colour,
                stroke: line.stroke,
            })
        });
        let keys = self.keys.iter().map(|(label, stroke)| LegendEntry {
            label: label.clone(),
            colour: KEY_COLOUR,
            stroke: *stroke,
        });
        lines.chain(keys).collect()
    }

    fn has_data(&self) -> bool {
        self.lines.iter().any(|line| !line.points.is_empty())
    }

    /// The y range covering every point; a log axis spans whole decades.
    fn y_range(&self) -> (f64, f64) {
        let values = self
            .lines
            .iter()
            .flat_map(|line| line.points.iter().map(|&(_, y)| y))
            .filter(|y| self.y_scale == Scale::Linear || *y > 0.0);
        let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), y| {
            (low.min(y), high.max(y))
        });
        match self.y_scale {
            Scale::Linear => {
                let high = high * Y_HEADROOM;
                if high.is_finite() && high > 0.0 {
                    (0.0, high)
                } else {
                    (0.0, 1.0)
                }
            }
            Scale::Log => {
                if !(low.is_finite() && high.is_finite()) {
                    return (1.0, 10.0);
                }
                let low = 10f64.powf(low.log10().floor());
                let high = 10f64.powf(high.log10().ceil());
                let high = if high > low { high } else { low * 10.0 };
                (low * (1.0 - LOG_EDGE_SLACK), high * (1.0 + LOG_EDGE_SLACK))
            }
        }
    }

    /// The x range: 1 to 30,000 Services, widened if a run went further.
    fn x_range(&self) -> (f64, f64) {
        let largest = self
            .lines
            .iter()
            .flat_map(|line| line.points.iter().map(|&(x, _)| x))
            .fold(X_MAX_SERVICES, f64::max);
        (X_MIN, largest * X_END_PADDING)
    }
}

fn contender_colour(contender: Contender) -> RGBColor {
    match contender {
        Contender::Lb => LB_COLOUR,
        Contender::Iptables => IPTABLES_COLOUR,
        Contender::Nftables => NFTABLES_COLOUR,
        Contender::Direct => DIRECT_COLOUR,
    }
}

/// Sorted (Services, value) points from rows; several rows at one size (a repeated scale)
/// become their median, and NaN (a skipped measurement) is left out rather than drawn as 0.
fn points(rows: impl Iterator<Item = (usize, f64)>) -> Vec<(f64, f64)> {
    let mut by_size: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (services, value) in rows {
        // Zero Services has no place on a log axis.
        if services > 0 && value.is_finite() {
            by_size.entry(services).or_default().push(value);
        }
    }
    by_size
        .into_iter()
        .map(|(services, values)| (services as f64, median(&values)))
        .collect()
}

/// One solid, labelled line per contender that has points.
fn per_contender(rows: impl Fn(Contender) -> Vec<(f64, f64)>) -> Vec<Line> {
    Contender::ALL
        .into_iter()
        .map(|contender| Line {
            label: Some(contender.label().to_owned()),
            colour: contender_colour(contender),
            stroke: Stroke::Solid,
            points: rows(contender),
        })
        .filter(|line| !line.points.is_empty())
        .collect()
}

fn connection_rate(results: &Results) -> Chart {
    // Rows with failed connections are drawn too: the report lists the failures, and a handful
    // among tens of thousands must not hide a contender's line.
    let lines = per_contender(|contender| {
        points(
            results
                .end_to_end
                .iter()
                .filter(|row| row.contender == contender)
                .map(|row| (row.services, row.connections_per_second.median)),
        )
    });
    Chart {
        file: "connection_rate.png",
        title: "New connections per second (median)".to_owned(),
        y_title: "Connections per second",
        y_scale: Scale::Linear,
        lines,
        keys: Vec::new(),
    }
}

fn latency(results: &Results) -> Chart {
    let rows = |contender: Contender| {
        results
            .end_to_end
            .iter()
            .filter(move |row| row.contender == contender)
    };
    let mut lines = per_contender(|contender| {
        points(rows(contender).map(|row| (row.services, row.latency_p50_us.median)))
    });
    let p99: Vec<Line> = Contender::ALL
        .into_iter()
        .map(|contender| Line {
            label: None,
            colour: contender_colour(contender),
            stroke: Stroke::Dashed,
            points: points(rows(contender).map(|row| (row.services, row.latency_p99_us.median))),
        })
        .filter(|line| !line.points.is_empty())
        .collect();
    let keys = if p99.is_empty() {
        Vec::new()
    } else {
        vec![
            ("median".to_owned(), Stroke::Solid),
            ("p99".to_owned(), Stroke::Dashed),
        ]
    };
    lines.extend(p99);
    Chart {
        file: "latency.png",
        title: "Connection latency, connect to response".to_owned(),
        y_title: "Latency (µs)",
        y_scale: Scale::Linear,
        lines,
        keys,
    }
}

/// The cases in reading order: the known ones first, then any other by name.
fn case_names(results: &Results) -> Vec<&str> {
    let mut names: Vec<&str> = results.packet.iter().map(|row| row.case.as_str()).collect();
    names.sort_by_key(|name| {
        let known = CASE_ORDER.iter().position(|case| case == name);
        (known.unwrap_or(CASE_ORDER.len()), *name)
    });
    names.dedup();
    names
}

fn packet_cost(results: &Results) -> Chart {
    let cases = case_names(results);
    let mut lines = Vec::new();
    let mut flow_counts: Vec<usize> = results
        .packet
        .iter()
        .map(|row| row.tracked_flows)
        .filter(|&flows| flows > 0)
        .collect();
    flow_counts.sort_unstable();
    flow_counts.dedup();
    for (index, case) in cases.iter().enumerate() {
        let colour = CASE_COLOURS[index % CASE_COLOURS.len()];
        let cost_with = |flows: usize| {
            points(
                results
                    .packet
                    .iter()
                    .filter(|row| row.case == *case && row.tracked_flows == flows)
                    .map(|row| (row.services, row.ns_per_packet.median)),
            )
        };
        let solid = cost_with(0);
        // Same colour, dashed: how the case changes with a full conntrack map is read off
        // directly against its solid line.
        let mut dashed: Vec<Line> = flow_counts
            .iter()
            .map(|&flows| Line {
                label: None,
                colour,
                stroke: Stroke::Dashed,
                points: cost_with(flows),
            })
            .filter(|line| !line.points.is_empty())
            .collect();
        let label = Some((*case).to_owned());
        if !solid.is_empty() {
            lines.push(Line {
                label,
                colour,
                stroke: Stroke::Solid,
                points: solid,
            });
        } else if let Some(first) = dashed.first_mut() {
            // A case measured only with tracked flows still needs its colour in the legend.
            first.label = label;
        }
        lines.append(&mut dashed);
    }
    let has_lb = !lines.is_empty();
    let floor = points(
        results
            .packet
            .iter()
            .map(|row| (row.services, row.floor_ns.median)),
    );
    if has_lb && !floor.is_empty() {
        lines.push(Line {
            label: Some("floor (parse, XDP_PASS)".to_owned()),
            colour: FLOOR_COLOUR,
            stroke: Stroke::Solid,
            points: floor,
        });
    }
    let has_flows = lines.iter().any(|line| line.stroke == Stroke::Dashed);
    let keys = if has_flows {
        let counts: Vec<String> = flow_counts.iter().map(|&n| thousands(n as f64)).collect();
        vec![
            ("no tracked flows".to_owned(), Stroke::Solid),
            (
                format!("{} tracked flows", counts.join(" / ")),
                Stroke::Dashed,
            ),
        ]
    } else {
        Vec::new()
    };
    Chart {
        file: "packet_cost.png",
        title: "lb_xdp cost per packet (BPF_PROG_TEST_RUN, median)".to_owned(),
        y_title: "ns per packet",
        y_scale: Scale::Linear,
        lines,
        keys,
    }
}

fn programming(results: &Results) -> Chart {
    let lines = per_contender(|contender| {
        points(
            results
                .programming
                .iter()
                .filter(|row| row.contender == contender)
                .map(|row| (row.services, row.load_ms.median)),
        )
    });
    let mut endpoints: Vec<usize> = results
        .programming
        .iter()
        .map(|row| row.endpoints_per_service)
        .collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    let title = match endpoints.as_slice() {
        [endpoints] => format!("Loading the rules or maps, {endpoints} endpoints per Service"),
        _ => "Loading the rules or maps".to_owned(),
    };
    Chart {
        file: "programming.png",
        title,
        y_title: "Load time (ms)",
        y_scale: Scale::Log,
        lines,
        keys: Vec::new(),
    }
}

/// `12345.0` as `12,345`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::with_capacity(digits.len() * 4 / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 && digits.chars().any(|digit| digit != '0') {
        grouped.insert(0, '-');
    }
    grouped
}

/// A tick label: thousands grouped, small values to a few significant digits, no trailing zeros.
fn tick_label(value: f64) -> String {
    if !value.is_finite() {
        return String::new();
    }
    if value.abs() >= 1000.0 {
        return thousands(value);
    }
    if value == 0.0 {
        return "0".to_owned();
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (SIGNIFICANT_DIGITS - 1 - magnitude).clamp(0, MAX_DECIMALS) as usize;
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// Draws `chart` as an SVG document: the title across the top, the plot, and the legend in a
/// column of its own on the right, where it can never hide a line.
fn svg(chart: &Chart) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let below_title = root
            .margin(MARGIN, 0, 0, 0)
            .titled(&chart.title, (FONT, TITLE_SIZE))?;
        let (plot, legend) = below_title.split_horizontally(WIDTH - LEGEND_WIDTH);
        let (x_low, x_high) = chart.x_range();
        let x: LogCoord<f64> = (x_low..x_high).log_scale().into();
        let (y_low, y_high) = chart.y_range();
        match chart.y_scale {
            Scale::Linear => draw(&plot, chart, x, y_low..y_high)?,
            Scale::Log => draw(&plot, chart, x, (y_low..y_high).log_scale())?,
        }
        draw_legend(&legend, &chart.legend())?;
        root.present()?;
    }
    Ok(svg)
}

/// Draws `chart`'s axes and lines on `area`, with a log x axis and the y axis `y` (linear or
/// log).
fn draw<Y>(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    chart: &Chart,
    x: LogCoord<f64>,
    y: Y,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut context = ChartBuilder::on(area)
        .margin(MARGIN)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(Y_LABEL_AREA)
        .build_cartesian_2d(x, y)?;
    context
        .configure_mesh()
        .x_desc("Services")
        .y_desc(chart.y_title)
        .x_label_formatter(&|value| tick_label(*value))
        .y_label_formatter(&|value| tick_label(*value))
        .label_style((FONT, TICK_LABEL_SIZE))
        .axis_desc_style((FONT, AXIS_TITLE_SIZE))
        .bold_line_style(BLACK.mix(BOLD_GRID_OPACITY))
        .light_line_style(BLACK.mix(LIGHT_GRID_OPACITY))
        .draw()?;
    for line in &chart.lines {
        let style = line.colour.stroke_width(LINE_WIDTH);
        let points = line.points.iter().copied();
        // Filled points on solid lines and hollow ones on dashed lines, so that the two stay
        // apart where they cross or overlap.
        let marker = match line.stroke {
            Stroke::Solid => {
                context.draw_series(LineSeries::new(points, style))?;
                line.colour.filled()
            }
            Stroke::Dashed => {
                context.draw_series(DashedLineSeries::new(points, DASH, DASH_GAP, style))?;
                style
            }
        };
        context.draw_series(
            line.points
                .iter()
                .map(|&point| Circle::new(point, POINT_RADIUS, marker)),
        )?;
    }
    Ok(())
}

/// Draws the legend's entries one under the other, each a short line sample and its text.
fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>, entries: &[LegendEntry]) -> Result<()> {
    let text = (FONT, LEGEND_SIZE)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (row, entry) in (0i32..).zip(entries) {
        let y = LEGEND_TOP + row * LEGEND_ROW;
        let ends = [(0, y), (LEGEND_SAMPLE, y)];
        let style = entry.colour.stroke_width(LINE_WIDTH);
        match entry.stroke {
            Stroke::Solid => area.draw(&PathElement::new(ends, style))?,
            Stroke::Dashed => {
                area.draw(&DashedPathElement::new(ends, DASH / 2, DASH_GAP / 2, style))?
            }
        }
        area.draw(&Text::new(
            entry.label.as_str(),
            (LEGEND_SAMPLE + LEGEND_TEXT_GAP, y),
            text.clone(),
        ))?;
    }
    Ok(())
}

/// Turns SVG into pixels with the system fonts.
struct Rasteriser {
    options: usvg::Options<'static>,
}

impl Rasteriser {
    fn new() -> Result<Self> {
        let mut fonts = usvg::fontdb::Database::new();
        fonts.load_system_fonts();
        let family = sans_serif_family(&fonts)?;
        fonts.set_sans_serif_family(family.clone());
        // usvg falls back to serif when a family is missing; any text is better than none.
        fonts.set_serif_family(family.clone());
        let options = usvg::Options {
            font_family: family,
            fontdb: Arc::new(fonts),
            ..usvg::Options::default()
        };
        Ok(Self { options })
    }

    fn render(&self, chart: &Chart) -> Result<tiny_skia::Pixmap> {
        let svg = svg(chart).with_context(|| format!("drawing {}", chart.file))?;
        let tree = usvg::Tree::from_str(&svg, &self.options)
            .with_context(|| format!("parsing the SVG of {}", chart.file))?;
        let size = tree.size().to_int_size();
        let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
            .with_context(|| format!("allocating {}x{} pixels", size.width(), size.height()))?;
        resvg::render(
            &tree,
            tiny_skia::Transform::identity(),
            &mut pixmap.as_mut(),
        );
        Ok(pixmap)
    }
}

/// The family to use for "sans-serif": a preferred one if installed, else any.
fn sans_serif_family(fonts: &usvg::fontdb::Database) -> Result<String> {
    let installed: Vec<&str> = fonts
        .faces()
        .flat_map(|face| face.families.iter().map(|(name, _)| name.as_str()))
        .collect();
    if let Some(preferred) = PREFERRED_FAMILIES
        .iter()
        .find(|preferred| installed.contains(preferred))
    {
        return Ok((*preferred).to_owned());
    }
    match installed.first() {
        Some(any) => Ok((*any).to_owned()),
        None => bail!(
            "no system fonts found, so the plots would have no text: install the Debian \
             package {FONT_PACKAGE} (cargo xtask bench installs it)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{EndToEnd, PacketCost, Programming, Sample};

    /// The sizes of the synthetic run.
    const SIZES: [usize; 5] = [1, 100, 1_000, 10_000, 30_000];
    /// A pixel this dark is text, an axis or a frame, not a line colour or the grid.
    const DARK: u8 = 80;
    /// The title sits in the top band of the image.
    const TITLE_BAND: u32 = 60;
    /// Far more than the antialiased edges of a single line produce.
    const MIN_COLOURS: usize = 20;
    const MIN_TITLE_PIXELS: usize = 200;
    /// Flows in the conntrack map for the packet cases measured with a full map.
    const FLOWS: usize = 1_000_000;

    fn sample(value: f64) -> Sample {
        Sample::from_rounds(vec![value * 0.98, value, value * 1.03])
    }

    fn synthetic() -> Results {
        let mut results = Results::default();
        for (size_index, &services) in SIZES.iter().enumerate() {
            let scale = services as f64;
            for contender in Contender::ALL {
                // nftables was skipped at the largest size, as a real run may do.
                if contender == Contender::Nftables && services == 30_000 {
                    continue;
                }
                let (rate, latency) = match contender {
                    Contender::Lb => (40_000.0, 50.0),
                    Contender::Iptables => {
                        (40_000.0 / (1.0 + scale / 2_000.0), 50.0 + scale / 40.0)
                    }
                    Contender::Nftables => (38_000.0, 55.0),
                    Contender::Direct => (42_000.0, 45.0),
                };
                // A NaN sample (a round that measured nothing) must be left out, not drawn.
                let p99 = if contender == Contender::Direct && size_index == 2 {
                    f64::NAN
                } else {
                    latency * 3.0
                };
                results.end_to_end.push(EndToEnd {
                    contender,
                    services,
                    connections_per_second: sample(rate),
                    latency_p50_us: sample(latency),
                    latency_p99_us: Sample {
                        median: p99,
                        rounds: vec![p99],
                    },
                    cpu_us_per_connection: sample(20.0),
                    iperf_gbps: sample(10.0),
                    in_situ_ns_per_packet: None,
                    failed_connections: 0,
                    lb_drops: Vec::new(),
                });
                if contender != Contender::Direct {
                    let load = match contender {
                        Contender::Lb => 0.05 + scale * 0.002,
                        _ => 2.0 + scale * 0.1,
                    };
                    results.programming.push(Programming {
                        contender,
                        services,
                        endpoints_per_service: 10,
                        load_ms: sample(load),
                        change_ms: sample(load / 10.0),
                    });
                }
            }
            for (case_index, case) in ["no_service", "tcp_new", "tcp_established", "tcp_reply"]
                .into_iter()
                .enumerate()
            {
                for flows in [0, FLOWS] {
                    // no_service tracks nothing; tcp_reply needs a tracked flow to answer.
                    let measured = match case {
                        "no_service" => flows == 0,
                        "tcp_reply" => flows > 0,
                        _ => true,
                    };
                    if !measured {
                        continue;
                    }
                    let cost = 30.0 + 20.0 * case_index as f64 + scale.log10() + flows as f64 / 1e5;
                    results.packet.push(PacketCost {
                        case: case.to_owned(),
                        services,
                        tracked_flows: flows,
                        ns_per_packet: sample(cost),
                        floor_ns: sample(18.0),
                        in_situ_ns: sample(cost * 0.8),
                        in_situ_floor_ns: sample(12.0),
                        ratio_to_floor: sample(cost / 18.0),
                        method: "repeat".to_owned(),
                    });
                }
            }
        }
        // A skipped contender: a row with nothing measured.
        results.programming.push(Programming {
            contender: Contender::Direct,
            services: 100,
            endpoints_per_service: 10,
            load_ms: Sample::from_rounds(Vec::new()),
            change_ms: Sample::from_rounds(Vec::new()),
        });
        results
    }

    /// A directory of its own under the system's temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos();
            Self(std::env::temp_dir().join(format!(
                "lb-bench-plot-{name}-{}-{nanos}",
                std::process::id()
            )))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn distinct_colours(pixmap: &tiny_skia::Pixmap) -> usize {
        let mut colours: Vec<[u8; 4]> = pixmap
            .pixels()
            .iter()
            .map(|pixel| [pixel.red(), pixel.green(), pixel.blue(), pixel.alpha()])
            .collect();
        colours.sort_unstable();
        colours.dedup();
        colours.len()
    }

    fn dark_pixels_in_title(pixmap: &tiny_skia::Pixmap) -> usize {
        pixmap
            .pixels()
            .iter()
            .take((pixmap.width() * TITLE_BAND) as usize)
            .filter(|pixel| pixel.red() < DARK && pixel.green() < DARK && pixel.blue() < DARK)
            .count()
    }

    #[test]
    fn plot_writes_readable_pngs() {
        let dir = TempDir::new("all");
        let written = write_plots(&synthetic(), &dir.0).expect("plots written");
        let names: Vec<String> = written
            .iter()
            .map(|path| {
                path.file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "connection_rate.png",
                "latency.png",
                "packet_cost.png",
                "programming.png"
            ]
        );
        for path in &written {
            let pixmap = tiny_skia::Pixmap::load_png(path).expect("a PNG");
            assert_eq!((pixmap.width(), pixmap.height()), (WIDTH, HEIGHT));
            let colours = distinct_colours(&pixmap);
            assert!(
                colours > MIN_COLOURS,
                "{}: {colours} colours",
                path.display()
            );
            let dark = dark_pixels_in_title(&pixmap);
            assert!(
                dark > MIN_TITLE_PIXELS,
                "{}: {dark} dark pixels in the title band: no text rendered?",
                path.display()
            );
        }
        if let Ok(keep) = std::env::var("LB_BENCH_KEEP_PLOTS") {
            for path in &written {
                let name = path.file_name().expect("a file name");
                std::fs::copy(path, Path::new(&keep).join(name)).expect("copied");
            }
        }
    }

    #[test]
    fn plot_title_text_is_rendered() {
        let rasteriser = Rasteriser::new().expect("system fonts");
        let mut chart = connection_rate(&synthetic());
        let with_title = rasteriser.render(&chart).expect("rendered");
        chart.title = String::new();
        let without_title = rasteriser.render(&chart).expect("rendered");
        assert_ne!(with_title.data(), without_title.data());
        assert!(dark_pixels_in_title(&with_title) > MIN_TITLE_PIXELS);
    }

    #[test]
    fn plot_nothing_for_empty_results() {
        let dir = TempDir::new("empty");
        let written = write_plots(&Results::default(), &dir.0).expect("no error");
        assert!(written.is_empty());
        assert!(!dir.0.exists());
    }

    #[test]
    fn plot_without_fonts_names_the_package() {
        let error = sans_serif_family(&usvg::fontdb::Database::new()).expect_err("no fonts");
        assert!(error.to_string().contains(FONT_PACKAGE), "{error}");
    }

    #[test]
    fn plot_packet_legend() {
        let legend: Vec<(String, Stroke)> = packet_cost(&synthetic())
            .legend()
            .into_iter()
            .map(|entry| (entry.label, entry.stroke))
            .collect();
        let expected = [
            ("no_service", Stroke::Solid),
            ("tcp_new", Stroke::Solid),
            ("tcp_established", Stroke::Solid),
            // Measured only with tracked flows: its legend entry is its dashed line.
            ("tcp_reply", Stroke::Dashed),
            ("floor (parse, XDP_PASS)", Stroke::Solid),
            ("no tracked flows", Stroke::Solid),
            ("1,000,000 tracked flows", Stroke::Dashed),
        ]
        .map(|(label, stroke)| (label.to_owned(), stroke));
        assert_eq!(legend, expected);
    }

    #[test]
    fn plot_tick_labels() {
        assert_eq!(tick_label(30_000.0), "30,000");
        assert_eq!(tick_label(1_000_000.0), "1,000,000");
        assert_eq!(tick_label(100.0), "100");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(0.001), "0.001");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(-1500.0), "-1,500");
    }

    #[test]
    fn plot_skips_nan_and_zero_services() {
        let got = points([(10, 1.0), (0, 2.0), (5, f64::NAN), (10, 3.0), (1, 4.0)].into_iter());
        assert_eq!(got, [(1.0, 4.0), (10.0, 2.0)]);
    }
}
