//! The results: the table on stdout, results.csv, results.json and results.svg.
use serde_json::json;
use std::fmt::Write as _;

/// The machine and run-wide figures.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub card: String,
    pub sms: u32,
    pub l2_bytes: u64,
    pub copy_gbps: f64,
    pub copy_us: f64,
    pub iters: usize,
    pub warmup: usize,
}

/// One configuration and dtype.
#[derive(Clone, Debug)]
pub struct Row {
    pub config: String,
    pub dtype: String,
    /// The decode layout used: "kv" (ETAP, KV rows on M), or "heads" (the wide kernel).
    pub layout: String,
    pub batch: usize,
    pub s_q: usize,
    pub h_q: usize,
    /// Longest request.
    pub s_k_max: i32,
    /// Every request's length (for the peers' script, which times the same batch).
    pub seqlens: Vec<i32>,
    pub total_rows: u64,
    /// Whether this is a point of the b16 s_q1 h16 sweep.
    pub sweep: bool,
    /// Input sets rotated through to defeat the L2.
    pub sets: usize,
    pub bytes: f64,
    pub flops: f64,
    /// Median of per-iteration event times.
    pub us: f64,
    pub us_min: f64,
    /// Whole timed loop (first start to last stop) over the iterations.
    pub us_loop: f64,
    pub gbps: f64,
    pub tflops: f64,
    pub pct_copy: f64,
    /// Worst over the checked requests and both checks (before and after timing).
    pub rel_err: f64,
    pub lse_diff: f64,
    pub checked_requests: Vec<usize>,
    /// `ok`, `FAILED` (check) or `ERROR` (CUDA or API error).
    pub status: String,
    pub note: String,
    /// Serving mode (bench/src/serving.rs): us per layer with the shuffled and the contiguous
    /// block table, and the layers in the graph (0 when not run).
    pub serve_us: f64,
    pub serve_us_contig: f64,
    /// The same as % of the copy roof.
    pub serve_pct: f64,
    pub serve_pct_contig: f64,
    pub layers: usize,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

fn fmt_f(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "-".into()
    }
}

fn fmt_e(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2e}")
    }
}

pub const TABLE_HEADER: &str =
    "config                     dtype layout  serve us  % copy  contig us  % copy   call us    GB/s  TFLOP/s  % copy   rel err  lse diff  status";

/// One line of the table.
pub fn table_line(r: &Row) -> String {
    format!(
        "{:<26} {:<5} {:<6} {:>9} {:>7} {:>10} {:>7} {:>9} {:>7} {:>8} {:>7} {:>9} {:>9}  {}{}",
        r.config,
        r.dtype,
        r.layout,
        fmt_f(r.serve_us, 1),
        fmt_f(r.serve_pct, 1),
        fmt_f(r.serve_us_contig, 1),
        fmt_f(r.serve_pct_contig, 1),
        fmt_f(r.us, 1),
        fmt_f(r.gbps, 0),
        fmt_f(r.tflops, 1),
        fmt_f(r.pct_copy, 1),
        fmt_e(r.rel_err),
        fmt_e(r.lse_diff),
        r.status,
        if r.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.note)
        }
    )
}

/// A CSV field, quoted when needed.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v.is_nan() {
        String::new()
    } else {
        "inf".into()
    }
}

pub const CSV_HEADER: &str =
    "card,copy_gbps,config,dtype,layout,batch,s_q,h_q,s_k_max,total_rows,sets,iters,bytes,flops,\
us_median,us_min,us_loop_mean,gbps,tflops,pct_copy,rel_err,lse_diff,serve_us_shuffled,serve_us_contiguous,serve_layers,\
status,note";

pub fn csv(info: &RunInfo, rows: &[Row]) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in rows {
        let fields = [
            csv_field(&info.card),
            csv_num(info.copy_gbps),
            csv_field(&r.config),
            csv_field(&r.dtype),
            csv_field(&r.layout),
            r.batch.to_string(),
            r.s_q.to_string(),
            r.h_q.to_string(),
            r.s_k_max.to_string(),
            r.total_rows.to_string(),
            r.sets.to_string(),
            info.iters.to_string(),
            csv_num(r.bytes),
            csv_num(r.flops),
            csv_num(r.us),
            csv_num(r.us_min),
            csv_num(r.us_loop),
            csv_num(r.gbps),
            csv_num(r.tflops),
            csv_num(r.pct_copy),
            csv_num(r.rel_err),
            csv_num(r.lse_diff),
            csv_num(r.serve_us),
            csv_num(r.serve_us_contig),
            r.layers.to_string(),
            csv_field(&r.status),
            csv_field(&r.note),
        ];
        s.push_str(&fields.join(","));
        s.push('\n');
    }
    s
}

/// A number for JSON: non-finite values become null.
fn jnum(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

pub fn json(info: &RunInfo, rows: &[Row]) -> String {
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "config": r.config, "dtype": r.dtype, "layout": r.layout, "batch": r.batch, "s_q": r.s_q, "h_q": r.h_q,
                "seqlens": r.seqlens,
                "s_k_max": r.s_k_max, "total_rows": r.total_rows, "sets": r.sets,
                "bytes": jnum(r.bytes), "flops": jnum(r.flops),
                "us_median": jnum(r.us), "us_min": jnum(r.us_min), "us_loop_mean": jnum(r.us_loop),
                "gbps": jnum(r.gbps), "tflops": jnum(r.tflops), "pct_copy": jnum(r.pct_copy),
                "rel_err": jnum(r.rel_err), "lse_diff": jnum(r.lse_diff),
                "serving_us_per_layer_shuffled": jnum(r.serve_us), "serving_us_per_layer_contiguous": jnum(r.serve_us_contig),
                "serving_pct_copy_shuffled": jnum(r.serve_pct), "serving_pct_copy_contiguous": jnum(r.serve_pct_contig),
                "serving_layers": r.layers,
                "checked_requests": r.checked_requests, "status": r.status, "note": r.note,
            })
        })
        .collect();
    let doc = json!({
        "card": info.card,
        "sms": info.sms,
        "l2_bytes": info.l2_bytes,
        "copy_gbps": jnum(info.copy_gbps),
        "copy_us_1gib": jnum(info.copy_us),
        "iters": info.iters,
        "warmup": info.warmup,
        "serving": "one CUDA graph of `serving_layers` decode calls, each layer its own cache, one plan; median of 20 replays / layers; \
                    block table shuffled and contiguous (same page data); the re-plan is outside the graph",
        "timing": "median of per-iteration CUDA event pairs around decode_into (one decode kernel, split merge included); \
                   plan made once per configuration outside the timed region; inputs rotated so the L2 is not reused",
        "formulas": {
            "bytes": "(sum(seqlens)*576 + b*s_q*h*(576+512))*2",
            "flops": "2*s_q*h*sum(seqlens)*(576+512)",
            "pct_copy": "bytes/us over a 1 GiB device-to-device copy's (read+write) bandwidth",
        },
        "results": results,
    });
    let mut s = serde_json::to_string_pretty(&doc).expect("JSON of plain values");
    s.push('\n');
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// 1-2-5 ticks covering [lo, hi] (positive).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut t = vec![];
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi * 10.0 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * decade;
            if v >= lo * 0.999 && v <= hi * 1.001 {
                t.push(v);
            }
        }
        decade *= 10.0;
    }
    t
}

/// The SVG dash pattern of a layout's lines: solid for ETAP (KV on M), dashed for the
/// heads-on-M kernel.
fn layout_dash(layout: &str) -> &'static str {
    match layout {
        "heads" => r#" stroke-dasharray="3 3""#,
        _ => "",
    }
}

fn dtype_color(dtype: &str) -> &'static str {
    match dtype {
        "bf16" => "#1f77b4",
        "f16" => "#ff7f0e",
        _ => "#2ca02c",
    }
}

/// The chart of the b16 s_q1 h16 sweep: time (log axis, with the copy roof's time for the same
/// bytes, dashed) and % of copy (with the 100% roof line) against s_k on a log2 axis.
pub fn svg(info: &RunInfo, rows: &[Row]) -> String {
    let pts: Vec<&Row> = rows
        .iter()
        .filter(|r| r.sweep && r.us.is_finite() && r.us > 0.0)
        .collect();
    let (w, h) = (820.0, 640.0);
    let (left, right) = (80.0, 790.0);
    let (t_top, t_bot) = (70.0, 300.0);
    let (p_top, p_bot) = (350.0, 570.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">etap MLA decode, b=16 s_q=1 h=16, on {}</text>"#,
        w / 2.0,
        xml_escape(&info.card)
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="44" text-anchor="middle">1 GiB device-to-device copy: {} GB/s (the roof); median of {} runs, plan outside the timed region</text>"#,
        w / 2.0,
        fmt_f(info.copy_gbps, 0),
        info.iters
    );

    let sks: Vec<f64> = pts.iter().map(|r| r.s_k_max.max(1) as f64).collect();
    let (kmin, kmax) = if sks.is_empty() {
        (1024.0, 65536.0)
    } else {
        let lo = sks.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = sks.iter().copied().fold(0.0, f64::max);
        (
            lo.log2().floor().exp2(),
            hi.log2().ceil().exp2().max(lo.log2().floor().exp2() * 2.0),
        )
    };
    let x = |sk: f64| left + (sk.log2() - kmin.log2()) / (kmax.log2() - kmin.log2()) * (right - left);

    // Roof times: the copy's bandwidth applied to each point's bytes.
    let roof_us: Vec<f64> = pts
        .iter()
        .map(|r| r.bytes / (info.copy_gbps * 1e9) * 1e6)
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let all_t: Vec<f64> = pts.iter().map(|r| r.us).chain(roof_us.iter().copied()).collect();
    let (tmin, tmax) = if all_t.is_empty() {
        (10.0, 1000.0)
    } else {
        let lo = all_t.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = all_t.iter().copied().fold(0.0, f64::max);
        (lo * 0.8, hi * 1.25)
    };
    let yt = |us: f64| t_bot - (us.ln() - tmin.ln()) / (tmax.ln() - tmin.ln()) * (t_bot - t_top);
    let pmax = pts
        .iter()
        .map(|r| r.pct_copy)
        .filter(|v| v.is_finite())
        .fold(110.0, f64::max);
    let pmax = (pmax / 20.0).ceil() * 20.0;
    let yp = |pct: f64| p_bot - pct / pmax * (p_bot - p_top);

    // Axes, grid and labels.
    for (top, bot) in [(t_top, t_bot), (p_top, p_bot)] {
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            right - left,
            bot - top
        );
        let mut k = kmin;
        while k <= kmax * 1.001 {
            let xx = x(k);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{bot}" stroke="#ddd"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
                bot + 16.0,
                crate::configs::len_label(k as usize)
            );
            k *= 2.0;
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">s_k (KV rows per request, log2 axis)</text>"#,
            (left + right) / 2.0,
            bot + 34.0
        );
    }
    for t in log_ticks(tmin, tmax) {
        let yy = yt(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{right}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{t}</text>"##,
            left - 6.0,
            yy + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">time (us, log axis)</text>"#,
        (t_top + t_bot) / 2.0
    );
    let mut pct = 0.0;
    while pct <= pmax + 1e-9 {
        let yy = yp(pct);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{right}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{pct}</text>"##,
            left - 6.0,
            yy + 4.0
        );
        pct += 20.0;
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">% of copy bandwidth</text>"#,
        (p_top + p_bot) / 2.0
    );

    // Roof lines: 100% of copy, and the time the copy's bandwidth would take.
    let _ = writeln!(
        s,
        r##"<line id="roof" class="roof" x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#d62728" stroke-width="2" stroke-dasharray="6 4"/>"##,
        y = yp(100.0)
    );
    let mut roof_pts: Vec<(f64, f64)> = pts
        .iter()
        .map(|r| (r.s_k_max.max(1) as f64, r.bytes / (info.copy_gbps * 1e9) * 1e6))
        .filter(|(_, t)| t.is_finite() && *t > 0.0)
        .collect();
    roof_pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    roof_pts.dedup_by(|a, b| a.0 == b.0);
    if !roof_pts.is_empty() {
        let p: Vec<String> = roof_pts
            .iter()
            .map(|&(k, t)| format!("{:.1},{:.1}", x(k), yt(t)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline id="roof-time" class="roof" points="{}" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="6 4"/>"##,
            p.join(" ")
        );
    }

    // One series per dtype and layout (the heads-on-M layouts' lines dashed).
    let mut keys: Vec<(&str, &str)> = pts.iter().map(|r| (r.dtype.as_str(), r.layout.as_str())).collect();
    keys.sort_unstable();
    keys.dedup();
    for (dt, layout) in &keys {
        let color = dtype_color(dt);
        let dash = layout_dash(layout);
        let mut series: Vec<&&Row> = pts.iter().filter(|r| r.dtype == *dt && r.layout == *layout).collect();
        series.sort_by_key(|r| r.s_k_max);
        let line_t: Vec<String> = series
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.s_k_max as f64), yt(r.us)))
            .collect();
        let line_p: Vec<String> = series
            .iter()
            .filter(|r| r.pct_copy.is_finite())
            .map(|r| format!("{:.1},{:.1}", x(r.s_k_max as f64), yp(r.pct_copy)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>"#,
            line_t.join(" ")
        );
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>"#,
            line_p.join(" ")
        );
        for r in series {
            let xx = x(r.s_k_max as f64);
            let fill = if r.ok() { color } else { "white" };
            let _ = writeln!(
                s,
                r#"<circle class="pt-time" cx="{xx:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="{color}"><title>{} {} {}: {:.1} us</title></circle>"#,
                yt(r.us),
                xml_escape(&r.config),
                r.dtype,
                r.layout,
                r.us
            );
            if r.pct_copy.is_finite() {
                let _ = writeln!(
                    s,
                    r#"<circle class="pt-pct" cx="{xx:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="{color}"><title>{} {} {}: {:.1}% of copy</title></circle>"#,
                    yp(r.pct_copy),
                    xml_escape(&r.config),
                    r.dtype,
                    r.layout,
                    r.pct_copy
                );
            }
        }
    }
    if pts.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#888">no b=16 s_q=1 h=16 configurations in this run</text>"##,
            (left + right) / 2.0,
            (t_top + t_bot) / 2.0
        );
    }

    // Legend, on white in the time panel's top left (short contexts are fast: nothing there).
    let (lx, mut ly) = (left + 12.0, t_top + 16.0);
    let _ = writeln!(
        s,
        r##"<rect x="{}" y="{}" width="330" height="{}" fill="white" fill-opacity="0.9" stroke="#ccc"/>"##,
        lx - 6.0,
        ly - 12.0,
        18.0 * (keys.len() + 2) as f64 + 6.0
    );
    for (dt, layout) in &keys {
        let c = dtype_color(dt);
        let dash = layout_dash(layout);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="1.5"{dash}/><circle cx="{}" cy="{ly}" r="4" fill="{c}"/><text x="{}" y="{}">etap {dt} ({layout} layout)</text>"#,
            lx + 24.0,
            lx + 12.0,
            lx + 30.0,
            ly + 4.0
        );
        ly += 18.0;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="#d62728" stroke-width="2" stroke-dasharray="6 4"/><text x="{}" y="{}">copy roof (time at copy bandwidth; 100% of copy)</text>"##,
        lx + 24.0,
        lx + 30.0,
        ly + 4.0
    );
    ly += 18.0;
    let _ = writeln!(
        s,
        r#"<circle cx="{}" cy="{ly}" r="4" fill="white" stroke="black"/><text x="{}" y="{}">hollow: check failed</text>"#,
        lx + 12.0,
        lx + 30.0,
        ly + 4.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            card: "NVIDIA H100 80GB HBM3 <test>".into(),
            sms: 132,
            l2_bytes: 50 << 20,
            copy_gbps: 3000.0,
            copy_us: 715.8,
            iters: 100,
            warmup: 10,
        }
    }

    fn row(config: &str, dtype: &str, s_k: i32, us: f64, sweep: bool) -> Row {
        let sl = vec![s_k; 16];
        let bytes = crate::metrics::bytes_moved(&sl, 16, 1, 16);
        let gbps = crate::metrics::gbps(bytes, us);
        Row {
            config: config.into(),
            dtype: dtype.into(),
            layout: "kv".into(),
            batch: 16,
            s_q: 1,
            h_q: 16,
            s_k_max: s_k,
            seqlens: sl.clone(),
            total_rows: crate::metrics::total_rows(&sl),
            sweep,
            sets: 1,
            bytes,
            flops: crate::metrics::flops(&sl, 1, 16),
            us,
            us_min: us,
            us_loop: us,
            gbps,
            tflops: 0.1,
            pct_copy: gbps / 3000.0 * 100.0,
            rel_err: 1.9e-3,
            lse_diff: 2e-6,
            checked_requests: vec![0, 15],
            status: "ok".into(),
            note: String::new(),
            serve_us: us * 0.97,
            serve_us_contig: us * 0.96,
            serve_pct: gbps / 0.97 / 3000.0 * 100.0,
            serve_pct_contig: gbps / 0.96 / 3000.0 * 100.0,
            layers: 61,
        }
    }

    fn rows() -> Vec<Row> {
        vec![
            row("b16-sq1-h16-sk1k", "bf16", 1024, 25.0, true),
            row("b16-sq1-h16-sk4k", "bf16", 4096, 50.0, true),
            row("b16-sq1-h16-sk64k", "bf16", 65536, 420.0, true),
            row("b16-sq1-h16-sk4k", "f16", 4096, 51.0, true),
            row("imbalanced-sq1-h16", "bf16", 45118, 49.0, false),
        ]
    }

    #[test]
    fn svg_draws_each_layout_as_its_own_series() {
        let mut r = rows();
        let mut heads = r[1].clone();
        heads.layout = "heads".into();
        heads.us = 60.0;
        r.push(heads);
        let s = svg(&info(), &r);
        assert!(s.contains("etap bf16 (kv layout)") && s.contains("etap bf16 (heads layout)"));
        assert_eq!(s.matches(r#"class="pt-time""#).count(), 5);
        assert!(s.contains(r#"stroke-dasharray="3 3""#));
    }

    #[test]
    fn svg_has_roof_and_one_point_per_sweep_config() {
        let s = svg(&info(), &rows());
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains(r#"id="roof""#) && s.contains(r#"id="roof-time""#));
        assert_eq!(s.matches(r#"class="pt-time""#).count(), 4);
        assert_eq!(s.matches(r#"class="pt-pct""#).count(), 4);
        assert!(s.contains("NVIDIA H100 80GB HBM3 &lt;test&gt;"));
        assert!(s.contains("etap bf16") && s.contains("etap f16"));
        assert!(s.contains("log2 axis") && s.contains("% of copy") && s.contains("time (us"));
        assert!(!s.contains("imbalanced") && !s.contains("NaN"));
        // The roof line sits at 100%: between the 80 and 120 grid labels of the % panel.
        let empty = svg(&info(), &[]);
        assert!(empty.contains(r#"id="roof""#) && empty.contains("no b=16"));
        assert_eq!(empty.matches("pt-time").count(), 0);
    }

    #[test]
    fn csv_has_a_header_and_one_line_per_row() {
        let mut r = rows();
        r[1].status = "FAILED".into();
        r[1].note = "rel err 1e-2, \"bad\"".into();
        r[2].rel_err = f64::INFINITY;
        r[2].us = f64::NAN;
        let c = csv(&info(), &r);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), 1 + r.len());
        assert_eq!(lines[0], CSV_HEADER);
        let ncols = CSV_HEADER.split(',').count();
        assert!(
            lines[3].starts_with("NVIDIA H100 80GB HBM3 <test>,3000,b16-sq1-h16-sk64k,bf16,kv,16,1,16,65536,1048576,")
        );
        assert_eq!(lines[3].split(',').count(), ncols);
        assert!(lines[3].contains(",inf,"));
        assert!(lines[2].ends_with(",FAILED,\"rel err 1e-2, \"\"bad\"\"\""));
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }

    #[test]
    fn json_round_trips() {
        let mut r = rows();
        r[0].us = f64::NAN;
        let j: serde_json::Value = serde_json::from_str(&json(&info(), &r)).unwrap();
        assert_eq!(j["card"], "NVIDIA H100 80GB HBM3 <test>");
        assert_eq!(j["results"].as_array().unwrap().len(), r.len());
        assert!(j["results"][0]["us_median"].is_null());
        assert_eq!(j["results"][1]["config"], "b16-sq1-h16-sk4k");
        assert_eq!(j["results"][1]["us_median"], 50.0);
    }

    #[test]
    fn table_lines() {
        let r = rows();
        // Serving mode (shuffled, contiguous) first, then the per-call figure.
        let line = table_line(&r[0]);
        assert!(line.starts_with("b16-sq1-h16-sk1k           bf16  kv"), "{line}");
        let nums: Vec<&str> = line.split_whitespace().skip(3).take(5).collect();
        assert_eq!(nums[0], format!("{:.1}", 25.0 * 0.97));
        assert_eq!(nums[2], format!("{:.1}", 25.0 * 0.96));
        assert_eq!(nums[4], "25.0");
        assert!(TABLE_HEADER.starts_with("config"));
        assert_eq!(log_ticks(15.0, 600.0), vec![20.0, 50.0, 100.0, 200.0, 500.0]);
    }
}
