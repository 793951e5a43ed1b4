//! A self-contained HTML report: the run's figures and two SVG plots
//! (latency percentiles per load step, achieved vs offered deliveries).
//! No scripts, no external assets.

use std::fmt::Write;

use crate::{Report, Step};

const W: f64 = 560.0;
const H: f64 = 300.0;
const PAD: f64 = 56.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One line of a chart: label, colour, points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart over x and y from 0.
fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let xmax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.05;
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let px = |x: f64| PAD + x / xmax * (W - 2.0 * PAD);
    let py = |y: f64| H - PAD + -(y / ymax) * (H - 2.0 * PAD);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="18" font-size="14" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="#333"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="#333"/>"##,
        b = H - PAD,
        r = W - PAD
    );
    for xv in ticks(xmax) {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            px(xv),
            H - PAD + 16.0,
            short(xv),
        );
    }
    for yv in ticks(ymax) {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{PAD}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/>"##,
            PAD - 6.0,
            py(yv) + 4.0,
            short(yv),
            W - PAD,
            y = py(yv)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        W / 2.0,
        H - 12.0,
        esc(x_label)
    );
    let _ = write!(
        svg,
        r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>"#,
        H / 2.0,
        H / 2.0,
        esc(y_label)
    );
    for (i, (label, colour, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        // Rings, the first series' widest: points that coincide (a run of
        // one step, a latency that is the same at two percentiles) stay
        // visible around one another.
        let r = 3.0 + 2.5 * (series.len() - 1 - i) as f64;
        for (x, y) in pts {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="{r}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                px(*x),
                py(*y)
            );
        }
        let ly = PAD + 14.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            W - PAD - 110.0,
            ly - 9.0,
            W - PAD - 95.0,
            ly,
            esc(label)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Round tick values from 0 to at most `max`: steps of 1, 2 or 5 times a
/// power of ten, at most 7 ticks.
fn ticks(max: f64) -> Vec<f64> {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow);
    (0..7)
        .map(|i| f64::from(i) * step)
        .take_while(|v| *v <= max * (1.0 + 1e-9))
        .collect()
}

/// "0", "0.2", "0.05", "50", "1 k", "2.5 k", "1.2 M".
fn short(v: f64) -> String {
    fn trim(x: f64) -> String {
        let s = format!("{x:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s.is_empty() {
            "0".into()
        } else {
            s.to_owned()
        }
    }
    if v >= 1e6 {
        format!("{} M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{} k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn offered_deliveries(s: &Step) -> f64 {
    if s.updates == 0 {
        0.0
    } else {
        s.offered_updates_per_s * s.expected_deliveries as f64 / s.updates as f64
    }
}

/// The whole page.
pub fn html(r: &Report) -> String {
    let x: Vec<f64> = r.steps.iter().map(offered_deliveries).collect();
    let pts = |f: &dyn Fn(&Step) -> f64| -> Vec<(f64, f64)> {
        r.steps.iter().zip(&x).map(|(s, x)| (*x, f(s))).collect()
    };
    let latency = chart(
        "Update-to-friend latency by offered load",
        "offered deliveries/s",
        "ms",
        &[
            ("p50", "#2563eb", pts(&|s| s.latency.p50_ms)),
            ("p99", "#dc2626", pts(&|s| s.latency.p99_ms)),
            ("p99.9", "#9333ea", pts(&|s| s.latency.p999_ms)),
        ],
    );
    let throughput = chart(
        "Deliveries achieved vs offered",
        "offered deliveries/s",
        "deliveries/s",
        &[
            ("achieved", "#16a34a", pts(&|s| s.deliveries_per_s)),
            ("offered", "#9ca3af", x.iter().map(|v| (*v, *v)).collect()),
        ],
    );
    let mut rows = String::new();
    for s in &r.steps {
        let _ = write!(
            rows,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.0}</td><td>{} / {}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if s.clean { "clean" } else { "failed" },
            if s.clean { "clean" } else { "FAILED" },
            s.errors,
            s.interval_ms,
            s.offered_updates_per_s,
            s.updates_per_s,
            s.deliveries_per_s,
            s.deliveries,
            s.expected_deliveries,
            s.latency.p50_ms,
            s.latency.p99_ms,
            s.latency.p999_ms,
            s.latency.max_ms,
            s.server_cpu_cores.map_or("–".into(), |c| format!("{c:.2}")),
            s.server_cpu_us_per_delivery
                .map_or("–".into(), |c| format!("{c:.2}")),
            s.machine_cpu_cores.map_or("–".into(), |c| format!("{c:.2}")),
        );
    }
    let capacity = r.capacity_deliveries_per_s.map_or_else(
        || format!("no step kept p99 ≤ {} ms", r.p99_bound_ms),
        |c| format!("{c:.0} deliveries/s with p99 ≤ {} ms", r.p99_bound_ms),
    );
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>nearby bench</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;margin:16px;color:#111}}svg{{max-width:100%;height:auto;display:block}}.scroll{{overflow-x:auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}tr.failed td{{background:#fee2e2}}tr.failed td:first-child{{color:#b91c1c;font-weight:bold}}</style></head><body>
<h1>nearby bench</h1>
<p>{users} users ({online} online) in {cities} cities, {friendships} friendships ({graph:?} graph, most friends of one user {maxf}), set-up {setup:.1} s. Capacity: <b>{capacity}</b>.
Server RSS at the end: {rss}; {memory}.
Only a clean step counts towards the capacity: no error frame, and at least {tolerance:.1} % of the expected deliveries received.</p>
{latency}
{throughput}
<div class="scroll"><table><tr><th>step</th><th>errors</th><th>interval ms</th><th>offered upd/s</th><th>upd/s</th><th>deliveries/s</th><th>received / expected</th><th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>server cores</th><th>server µs / delivery</th><th>machine busy cores</th></tr>
{rows}</table></div>
</body></html>
"#,
        users = r.users,
        online = r.online,
        friendships = r.friendships,
        cities = r.cities,
        graph = r.graph,
        maxf = r.max_friends,
        setup = r.setup_s,
        rss = r
            .last
            .server_rss_bytes
            .map_or("–".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
        memory = esc(&crate::memory_line(r)),
        tolerance = (1.0 - r.loss_tolerance) * 100.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Latency;

    fn step(interval_ms: u64, p99: f64) -> Step {
        Step {
            interval_ms,
            window_s: 10.0,
            offered_updates_per_s: 1000.0 * 1000.0 / interval_ms as f64,
            updates: 10_000,
            expected_deliveries: 200_000,
            deliveries: 199_000,
            updates_per_s: 1000.0,
            deliveries_per_s: 19_900.0,
            errors: 0,
            stranger_frames_per_s: 0.0,
            latency: Latency {
                count: 199_000,
                p50_ms: 1.0,
                p90_ms: 2.0,
                p99_ms: p99,
                p999_ms: p99 * 2.0,
                max_ms: 90.0,
            },
            server_cpu_cores: Some(0.5),
            server_cpu_cores_by_pid: vec![Some(0.4), Some(0.1)],
            server_cpu_us_per_delivery: Some(25.1),
            machine_cpu_cores: Some(1.9),
            server_rss_bytes: None,
            clean: true,
        }
    }

    #[test]
    fn the_page_has_both_plots_and_a_row_per_step() {
        let mut steps = vec![step(1000, 20.0), step(500, 80.0)];
        steps[1].errors = 3;
        steps[1].clean = false;
        let r = Report {
            users: 1000,
            online: 1000,
            clients_per_process: vec![1000],
            clients_on_measured_node: 1000,
            server_pids: vec![1, 2],
            friendships: 10_000,
            graph: crate::GraphModel::PowerLaw,
            cities: 2,
            max_friends: 310,
            idle_bytes_per_connection: Some(9000),
            setup_s: 3.0,
            disconnects: 0,
            reconnects: 0,
            reconnect_time: crate::latency(&crate::fleet::new_histogram()),
            max_delivery_gap_ms: 0.0,
            last: Step {
                server_rss_bytes: Some(10 << 20),
                ..steps[1].clone()
            },
            steps,
            capacity_deliveries_per_s: Some(19_900.0),
            unmatched_deliveries: 0,
            p99_bound_ms: 50.0,
            loss_tolerance: 0.005,
        };

        let page = html(&r);
        assert_eq!(page.matches("<svg").count(), 2);
        assert_eq!(page.matches("<tr class=").count(), 2);
        assert!(page.contains("19900 deliveries/s with p99 ≤ 50 ms"));
        assert!(page.contains("<polyline"));
        assert!(page.contains("in 2 cities"), "{page}");
        assert!(page.contains("<td>25.10</td><td>1.90</td>"), "{page}");
        assert!(page.contains("<th>errors</th>"), "{page}");
        assert!(
            page.contains(r#"<tr class="failed"><td>FAILED</td><td>3</td>"#),
            "{page}"
        );
        assert!(page.contains("name=\"viewport\""), "{page}");
        assert!(page.contains("9000 B per connection"), "{page}");
        assert!(!page.contains("NaN"), "{page}");
        assert!(!page.contains("<script"));
    }

    #[test]
    fn ticks_are_round_and_read_well() {
        assert_eq!(ticks(5500.0), vec![0.0, 2000.0, 4000.0]);
        assert_eq!(ticks(4000.0), vec![0.0, 1000.0, 2000.0, 3000.0, 4000.0]);
        assert_eq!(ticks(1.1), vec![0.0, 0.5, 1.0]);
        assert_eq!(ticks(0.55), vec![0.0, 0.2, 0.4]);
        let labels: Vec<String> = [0.0, 0.2, 0.05, 50.0, 1000.0, 2500.0, 1.2e6]
            .iter()
            .map(|v| short(*v))
            .collect();
        assert_eq!(labels, ["0", "0.2", "0.05", "50", "1 k", "2.5 k", "1.2 M"]);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(esc("a<b>&c"), "a&lt;b&gt;&amp;c");
    }
}
