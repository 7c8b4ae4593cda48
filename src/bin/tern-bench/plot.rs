//! `--plot FILE`: a hand-written SVG with two panels — (a) latency distributions as percentile
//! curves over a log-scale time axis, (b) server RSS against established sessions during the ramp.
//! Plain SVG keeps the harness free of a plotting dependency and opens in any browser.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use tern::xmpp::framer::escape;

use crate::stats::Histogram;

/// One latency curve: (milliseconds, share of the population 0..=1) points, ascending.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// The histogram's distribution. With `population`, shares are of that many (e.g. storm
    /// participants, some of whom never came back), so the curve may end below 100 %.
    pub fn of_histogram(name: &str, h: &Histogram, population: Option<u64>) -> Series {
        let scale = match population {
            Some(n) if n > 0 => h.count() as f64 / n as f64,
            _ => 1.0,
        };
        Series {
            name: name.to_string(),
            points: h
                .cdf()
                .into_iter()
                .map(|(us, f)| (us as f64 / 1000.0, f * scale))
                .collect(),
        }
    }
}

const W: f64 = 1000.0;
const H: f64 = 420.0;
const PW: f64 = 380.0;
const PH: f64 = 290.0;
const TOP: f64 = 60.0;
const LEFT_A: f64 = 80.0;
const LEFT_B: f64 = 580.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Smallest 1, 2 or 5 × 10^k that is ≥ `v` (axis maxima).
fn nice_ceil(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|x| *x >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

/// Tick labels without float noise (0.30000000000000004).
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn ms_label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", ms / 1000.0)
    } else {
        format!("{ms} ms")
    }
}

/// Axes box, grid lines and tick labels of a panel; `xt`/`yt` are (position 0..=1, label).
fn frame(o: &mut String, left: f64, xt: &[(f64, String)], yt: &[(f64, String)], x: &str, y: &str) {
    let _ = write!(
        o,
        r##"<rect x="{left}" y="{TOP}" width="{PW}" height="{PH}" fill="none" stroke="#444"/>"##
    );
    for (f, label) in xt {
        let px = left + f * PW;
        let _ = write!(
            o,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{b}" stroke="#ddd"/><text x="{px:.1}" y="{ty}" font-size="11" text-anchor="middle">{l}</text>"##,
            b = TOP + PH,
            ty = TOP + PH + 15.0,
            l = escape(label)
        );
    }
    for (f, label) in yt {
        let py = TOP + PH - f * PH;
        let _ = write!(
            o,
            r##"<line x1="{left}" y1="{py:.1}" x2="{r}" y2="{py:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" font-size="11" text-anchor="end">{l}</text>"##,
            r = left + PW,
            tx = left - 6.0,
            ty = py + 4.0,
            l = escape(label)
        );
    }
    let _ = write!(
        o,
        r##"<text x="{cx}" y="{bx}" font-size="12" text-anchor="middle">{x}</text><text x="{yx}" y="{cy}" font-size="12" text-anchor="middle" transform="rotate(-90 {yx} {cy})">{y}</text>"##,
        cx = left + PW / 2.0,
        bx = TOP + PH + 35.0,
        x = escape(x),
        yx = left - 50.0,
        cy = TOP + PH / 2.0,
        y = escape(y)
    );
}

fn no_data(o: &mut String, left: f64, text: &str) {
    let _ = write!(
        o,
        r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">{}</text>"#,
        left + PW / 2.0,
        TOP + PH / 2.0,
        escape(text)
    );
}

/// The SVG document. `rss` holds (sessions, server RSS KiB) samples.
pub fn render(title: &str, latency_label: &str, series: &[Series], rss: &[(u64, u64)]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<?xml version="1.0" encoding="UTF-8"?><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif"><title>{t}</title><rect width="{W}" height="{H}" fill="white"/><text x="{cx}" y="24" font-size="16" text-anchor="middle">{t}</text>"#,
        t = escape(title),
        cx = W / 2.0
    );

    // (a) Latency: share of the population done by time t, t on a log scale.
    o.push_str(r#"<g id="latency">"#);
    let all = || series.iter().flat_map(|s| s.points.iter());
    let lo = all()
        .map(|p| p.0)
        .filter(|v| *v > 0.0)
        .fold(f64::MAX, f64::min);
    let hi = all().map(|p| p.0).fold(0.0, f64::max);
    if hi > 0.0 {
        let d0 = lo.log10().floor();
        let d1 = hi.log10().ceil().max(d0 + 1.0);
        let x = |ms: f64| ((ms.max(10f64.powf(d0)).log10() - d0) / (d1 - d0)).clamp(0.0, 1.0);
        let xt: Vec<(f64, String)> = (d0 as i32..=d1 as i32)
            .map(|d| {
                let v = 10f64.powi(d);
                (x(v), ms_label(v))
            })
            .collect();
        let yt: Vec<(f64, String)> = (0..=4)
            .map(|k| (k as f64 / 4.0, format!("{}%", k * 25)))
            .collect();
        frame(&mut o, LEFT_A, &xt, &yt, latency_label, "share done");
        for (k, s) in series.iter().enumerate() {
            let color = COLORS[k % COLORS.len()];
            o.push_str(r#"<polyline class="series" fill="none" stroke-width="1.5" "#);
            let _ = write!(
                o,
                r#"stroke="{color}" data-series="{}" points=""#,
                escape(&s.name)
            );
            for (i, (ms, f)) in s.points.iter().enumerate() {
                let sep = if i > 0 { " " } else { "" };
                let _ = write!(
                    o,
                    "{sep}{:.1},{:.1}",
                    LEFT_A + x(*ms) * PW,
                    TOP + PH - f.clamp(0.0, 1.0) * PH
                );
            }
            let _ = write!(
                o,
                r#""/><text x="{}" y="{}" font-size="11" fill="{color}">{}</text>"#,
                LEFT_A + 8.0,
                TOP + 16.0 + 14.0 * k as f64,
                escape(&s.name)
            );
        }
    } else {
        frame(&mut o, LEFT_A, &[], &[], latency_label, "share done");
        no_data(&mut o, LEFT_A, "no latency samples");
    }
    o.push_str("</g>");

    // (b) Server RSS against sessions established, sampled during the ramp.
    o.push_str(r#"<g id="rss">"#);
    if rss.is_empty() {
        frame(&mut o, LEFT_B, &[], &[], "sessions", "server RSS (MiB)");
        no_data(&mut o, LEFT_B, "no server RSS samples (--server-pid)");
    } else {
        let xmax = nice_ceil(rss.iter().map(|p| p.0).max().unwrap_or(0) as f64);
        // RSS from a round value below the lowest sample, so the growth per session shows.
        let mib = |kib: u64| kib as f64 / 1024.0;
        let lo = mib(rss.iter().map(|p| p.1).min().unwrap_or(0));
        let hi = mib(rss.iter().map(|p| p.1).max().unwrap_or(0));
        let step = nice_ceil(((hi - lo) / 4.0).max(hi / 100.0));
        let ymin = (lo / step).floor() * step;
        let yspan = (((hi - ymin) / step).ceil().max(1.0)) * step;
        let ticks = |min: f64, span: f64| -> Vec<(f64, String)> {
            (0..=4)
                .map(|k| {
                    (
                        k as f64 / 4.0,
                        format!("{}", round(min + span * k as f64 / 4.0)),
                    )
                })
                .collect()
        };
        frame(
            &mut o,
            LEFT_B,
            &ticks(0.0, xmax),
            &ticks(ymin, yspan),
            "sessions",
            "server RSS (MiB)",
        );
        o.push_str(r##"<polyline class="series" fill="none" stroke-width="1.5" stroke="#1f77b4" data-series="rss-vs-sessions" points=""##);
        for (i, (n, kib)) in rss.iter().enumerate() {
            let sep = if i > 0 { " " } else { "" };
            let _ = write!(
                o,
                "{sep}{:.1},{:.1}",
                LEFT_B + *n as f64 / xmax * PW,
                TOP + PH - (mib(*kib) - ymin) / yspan * PH
            );
        }
        o.push_str(r#""/>"#);
    }
    o.push_str("</g></svg>\n");
    o
}

/// Render and write the SVG to `path`.
pub fn write(
    path: &Path,
    title: &str,
    latency_label: &str,
    series: &[Series],
    rss: &[(u64, u64)],
) -> anyhow::Result<()> {
    std::fs::write(path, render(title, latency_label, series, rss))
        .with_context(|| format!("writing --plot {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::events::Event;

    /// Parse the whole document; return (data-series, number of points) of every polyline.
    fn polylines(svg: &str) -> Vec<(String, usize)> {
        let mut r = quick_xml::Reader::from_str(svg);
        let mut out = Vec::new();
        let mut depth = 0i32;
        loop {
            match r.read_event().expect("well-formed SVG") {
                Event::Eof => break,
                Event::Start(_) => depth += 1,
                Event::End(_) => depth -= 1,
                Event::Empty(e) if e.name().as_ref() == b"polyline" => {
                    let attr = |name: &[u8]| {
                        e.attributes()
                            .map(|a| a.expect("attribute"))
                            .find(|a| a.key.as_ref() == name)
                            .map(|a| a.unescape_value().expect("value").into_owned())
                    };
                    let points = attr(b"points").expect("points");
                    for p in points.split(' ') {
                        let (x, y) = p.split_once(',').expect("x,y");
                        let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                        assert!((0.0..=W).contains(&x) && (0.0..=H).contains(&y), "{p}");
                    }
                    out.push((
                        attr(b"data-series").expect("series"),
                        points.split(' ').count(),
                    ));
                }
                _ => {}
            }
        }
        assert_eq!(depth, 0, "unbalanced elements");
        out
    }

    #[test]
    fn svg_is_well_formed_and_has_the_series() {
        let mut h = Histogram::default();
        for v in [800u64, 1_500, 2_000, 40_000, 1_200_000] {
            h.record(v);
        }
        let series = [
            Series::of_histogram("login <all>", &h, None),
            Series::of_histogram("reconnect & cycle 1", &h, Some(10)),
        ];
        let rss = [(0, 20_000), (100, 21_000), (200, 23_500)];
        let svg = render("a \"title\" <x>", "login latency", &series, &rss);
        let lines = polylines(&svg);
        assert_eq!(
            lines,
            vec![
                ("login <all>".to_string(), 5),
                ("reconnect & cycle 1".to_string(), 5),
                ("rss-vs-sessions".to_string(), 3)
            ]
        );
        // With a population, the curve stops at the share that made it (5 of 10).
        let last = series[1].points.last().unwrap();
        assert_eq!(*last, (1200.0, 0.5));

        // No data at all is still a valid document.
        assert!(polylines(&render("empty", "x", &[], &[])).is_empty());
    }

    #[test]
    fn nice_axis_maxima() {
        assert_eq!(nice_ceil(0.0), 1.0);
        assert_eq!(nice_ceil(3.0), 5.0);
        assert_eq!(nice_ceil(10.0), 10.0);
        assert_eq!(nice_ceil(1234.0), 2000.0);
    }
}
