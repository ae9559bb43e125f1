//! `etap-bench`: etap's MLA decode on an H100/H200, against the roof of a device-to-device copy.
//!
//! For each configuration: generate inputs (random q, a paged cache on shuffled pages with NaN
//! past every length), check the GPU's output against the CPU reference on sampled requests,
//! then time `decode_into` (one decode kernel, the split merge fused into it) with CUDA events, the plan made once
//! outside the timed region, rotating over enough copies of the inputs that the L2 holds none
//! of them. Prints a table and writes results.csv, results.json and results.svg.
mod check;
mod configs;
mod gen;
mod metrics;
mod opts;
mod report;
mod serving;

use configs::Config;
use cust::device::{Device, DeviceAttribute};
use cust::event::{Event, EventFlags};
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::stream::{Stream, StreamFlags};
use etap::{fp8, Bf16, DecodeShape, Decoder, Dtype, Element, EtapError, KvFormat, Layout, F16};
use opts::{Options, USAGE};
use report::{Row, RunInfo};
use std::error::Error;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

type BoxResult<T> = Result<T, Box<dyn Error>>;

/// Bytes of the roof copy.
const COPY_BYTES: usize = 1 << 30;
const COPY_ITERS: usize = 30;
/// The inputs rotated through span at least this many times the L2.
const L2_FACTOR: u64 = 4;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("etap-bench: {e}\n\n{USAGE}");
            return ExitCode::from(1);
        }
    };
    if o.help {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let configs = o.configs();
    if o.list {
        for c in &configs {
            println!("{}", c.name);
        }
        return ExitCode::SUCCESS;
    }
    if configs.is_empty() {
        eprintln!("etap-bench: no configuration matches --only {:?} (see --list)", o.only);
        return ExitCode::from(1);
    }
    let dec = match Decoder::new() {
        Ok(d) => d,
        Err(EtapError::NoDevice) => {
            eprintln!("no CUDA device: the benchmark needs an H100/H200");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("etap-bench: a CUDA device is present but unusable: {e}");
            return ExitCode::from(1);
        }
    };
    match run(&dec, &o, &configs) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("etap-bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn flush() {
    let _ = std::io::stdout().flush();
}

/// A fixed seed per configuration (FNV-1a of its name).
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn run(dec: &Decoder, o: &Options, configs: &[Config]) -> BoxResult<bool> {
    let device = Device::get_device(0)?;
    let card = device.name()?;
    let l2 = device.get_attribute(DeviceAttribute::L2CacheSize)?.max(0) as u64;
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None)?;
    println!(
        "etap-bench on {card}: {} SMs, L2 {:.0} MiB",
        dec.num_sms(),
        l2 as f64 / (1u64 << 20) as f64
    );
    flush();
    let copy_us = measure_copy(&stream)?;
    let copy_gbps = metrics::copy_gbps(COPY_BYTES as u64, copy_us);
    println!("copy roof: 1 GiB device-to-device copy (cuMemcpyDtoDAsync), {copy_gbps:.0} GB/s counting bytes read + written ({copy_us:.1} us, median of {COPY_ITERS})");
    let info = RunInfo {
        card,
        sms: dec.num_sms(),
        l2_bytes: l2,
        copy_gbps,
        copy_us,
        iters: o.iters,
        warmup: o.warmup,
    };
    println!(
        "timing: decode_into (one decode kernel, split merge included), CUDA events per iteration, median of {} after at least {} warm-up runs;\n  \
         the plan is made once per configuration, outside the timed region (serving engines reuse it across layers);\n  \
         inputs rotate over copies spanning >= {L2_FACTOR}x the L2, so it holds none of them",
        o.iters, o.warmup
    );
    let dtypes: Vec<String> = o.dtypes.iter().map(|d| d.to_string()).collect();
    println!(
        "dtype: {}{}",
        dtypes.join(", "),
        if o.dtypes == [Dtype::Bf16] {
            " (the default, to keep the run short; --dtype both adds f16)"
        } else {
            ""
        }
    );
    println!(
        "bytes = (sum(seqlens)*576 + b*s_q*h*(576+512))*2, FLOPs = 2*s_q*h*sum(seqlens)*(576+512), % copy = GB/s over the copy's"
    );
    println!(
        "check: first, last, longest and one random request vs the CPU reference, before and after timing: rel err of every (request, token) row <= {:.2e} (bf16) / {:.2e} (f16), lse within {:.0e}; every row of the batch written and finite",
        etap::check::MAX_REL_ERR_BF16,
        etap::check::MAX_REL_ERR_F16,
        etap::check::MAX_LSE_DIFF
    );
    println!();
    println!("{}", report::TABLE_HEADER);
    flush();

    let mut rows = Vec::new();
    for cfg in configs {
        for &dt in &o.dtypes {
            for &layout in &o.layouts {
                let row = match dt {
                    Dtype::Bf16 => bench_config::<Bf16>(dec, &stream, &info, cfg, o, layout),
                    Dtype::F16 => bench_config::<F16>(dec, &stream, &info, cfg, o, layout),
                };
                println!("{}", report::table_line(&row));
                flush();
                rows.push(row);
            }
        }
    }

    std::fs::create_dir_all(&o.out).map_err(|e| format!("creating {}: {e}", o.out.display()))?;
    for (name, text) in [
        ("results.csv", report::csv(&info, &rows)),
        ("results.json", report::json(&info, &rows)),
        ("results.svg", report::svg(&info, &rows)),
    ] {
        let path = o.out.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.ok())
        .map(|r| format!("{} {} ({})", r.config, r.dtype, r.status))
        .collect();
    println!();
    println!("wrote {}/results.{{csv,json,svg}}", o.out.display());
    if bad.is_empty() {
        println!("all {} checks passed", rows.len());
        Ok(true)
    } else {
        println!(
            "{} of {} configurations FAILED: {}",
            bad.len(),
            rows.len(),
            bad.join(", ")
        );
        Ok(false)
    }
}

/// Median time of a 1 GiB device-to-device copy, in us.
fn measure_copy(stream: &Stream) -> BoxResult<f64> {
    // SAFETY: the copy only moves bytes; their values do not matter.
    let src = unsafe { DeviceBuffer::<u8>::uninitialized(COPY_BYTES)? };
    let dst = unsafe { DeviceBuffer::<u8>::uninitialized(COPY_BYTES)? };
    let copy = || -> BoxResult<()> {
        // SAFETY: both buffers are live allocations of COPY_BYTES bytes that do not overlap.
        let rc = unsafe {
            cust::sys::cuMemcpyDtoDAsync_v2(
                dst.as_device_ptr().as_raw(),
                src.as_device_ptr().as_raw(),
                COPY_BYTES,
                stream.as_inner(),
            )
        };
        if rc != cust::sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuMemcpyDtoDAsync failed: {rc:?}").into());
        }
        Ok(())
    };
    for _ in 0..3 {
        copy()?;
    }
    let times = timed(stream, COPY_ITERS, |_| copy())?;
    stream.synchronize()?;
    Ok(metrics::median(&times.per_iter))
}

struct Times {
    per_iter: Vec<f64>,
    /// First start to last stop, over the iterations.
    loop_mean: f64,
}

/// Enqueue `n` runs of `f(i)`, each between its own pair of events, synchronize once and
/// return the times in us. Nothing waits between runs, so the GPU runs them back to back and
/// the host's launch time is not counted (as long as the host keeps ahead).
fn timed(stream: &Stream, n: usize, mut f: impl FnMut(usize) -> BoxResult<()>) -> BoxResult<Times> {
    let starts: Vec<Event> = (0..n)
        .map(|_| Event::new(EventFlags::DEFAULT))
        .collect::<Result<_, _>>()?;
    let stops: Vec<Event> = (0..n)
        .map(|_| Event::new(EventFlags::DEFAULT))
        .collect::<Result<_, _>>()?;
    for i in 0..n {
        starts[i].record(stream)?;
        f(i)?;
        stops[i].record(stream)?;
    }
    stream.synchronize()?;
    let per_iter = (0..n)
        .map(|i| Ok(stops[i].elapsed_time_f32(&starts[i])? as f64 * 1e3))
        .collect::<Result<Vec<f64>, cust::error::CudaError>>()?;
    let loop_mean = stops[n - 1].elapsed_time_f32(&starts[0])? as f64 * 1e3 / n as f64;
    Ok(Times { per_iter, loop_mean })
}

fn layout_name(l: Layout) -> &'static str {
    match l {
        Layout::KvOnM => "kv",
        Layout::HeadsOnM => "heads",
    }
}

fn bench_config<T: Element>(
    dec: &Decoder,
    stream: &Stream,
    info: &RunInfo,
    cfg: &Config,
    o: &Options,
    layout: Option<Layout>,
) -> Row {
    // The plan's own choice for the configuration's cache (an FP8 cache: KV on M at any width).
    let layout = layout.unwrap_or_else(|| {
        Layout::for_shape(&DecodeShape::new(cfg.batch, cfg.s_q, cfg.h_q, 1, 1).with_kv_format(cfg.kv))
    });
    let bytes = match cfg.kv.fp8_row_bytes() {
        None => metrics::bytes_moved(&cfg.seqlens, cfg.batch, cfg.s_q, cfg.h_q),
        Some(row) => metrics::bytes_moved_kv(&cfg.seqlens, cfg.batch, cfg.s_q, cfg.h_q, row as f64),
    };
    let flops = metrics::flops(&cfg.seqlens, cfg.s_q, cfg.h_q);
    let mut row = Row {
        config: cfg.name.clone(),
        dtype: T::DTYPE.to_string(),
        layout: layout_name(layout).into(),
        batch: cfg.batch,
        s_q: cfg.s_q,
        h_q: cfg.h_q,
        s_k_max: cfg.max_len(),
        seqlens: cfg.seqlens.clone(),
        total_rows: metrics::total_rows(&cfg.seqlens),
        sweep: cfg.in_sweep(),
        sets: 0,
        bytes,
        flops,
        us: f64::NAN,
        us_min: f64::NAN,
        us_loop: f64::NAN,
        gbps: f64::NAN,
        tflops: f64::NAN,
        pct_copy: f64::NAN,
        rel_err: f64::NAN,
        lse_diff: f64::NAN,
        checked_requests: vec![],
        status: "ERROR".into(),
        note: String::new(),
        serve_us: f64::NAN,
        serve_us_contig: f64::NAN,
        serve_pct: f64::NAN,
        serve_pct_contig: f64::NAN,
        layers: 0,
    };
    if cfg.kv != KvFormat::Elem16 {
        if let Err(e) = bench_fp8::<T>(dec, info, cfg, o, layout, &mut row) {
            row.status = "ERROR".into();
            row.note = e.to_string();
        }
        return row;
    }
    match bench_inner::<T>(dec, stream, info, cfg, o, layout, &mut row) {
        Err(e) => {
            row.status = "ERROR".into();
            row.note = e.to_string();
            // Let whatever was launched finish before the buffers go.
            let _ = stream.synchronize();
        }
        Ok((x, checked)) if o.layers > 0 => {
            let inputs = ServeInputs {
                shape: &x.shape,
                q: &x.q,
                cache: &x.cache,
                kv_scale: None,
                block_table: &x.block_table,
                seqlens: &x.seqlens,
            };
            if let Err(e) = bench_serving(dec, info, inputs, &checked, layout, o.layers, o.shared_cache, &mut row) {
                row.status = "ERROR".into();
                row.note = format!("serving mode: {e}");
            }
        }
        Ok(_) => {}
    }
    row
}

/// What serving mode times: q and the cache (16-bit, or an FP8 format's bytes with its
/// per-tensor scale) with their shape, block table and lengths.
struct ServeInputs<'a, T, C> {
    shape: &'a DecodeShape,
    q: &'a [T],
    cache: &'a [C],
    kv_scale: Option<f32>,
    block_table: &'a [i32],
    seqlens: &'a [i32],
}

/// Serving mode (see `serving`) with the shuffled and the contiguous block table. Each run's
/// last output must equal, bit for bit, the per-call output that was checked against the
/// reference (the same rows, the same arithmetic).
#[allow(clippy::too_many_arguments)]
fn bench_serving<T: Element, C: cust::memory::DeviceCopy>(
    dec: &Decoder,
    info: &RunInfo,
    x: ServeInputs<T, C>,
    checked: &(Vec<f32>, Vec<f32>),
    layout: Layout,
    layers: usize,
    shared_cache: bool,
    row: &mut Row,
) -> BoxResult<()> {
    let shape = x.shape;
    let same = |s: &serving::Serving| {
        s.out.iter().zip(&checked.0).all(|(a, b)| a.to_bits() == b.to_bits())
            && s.lse.iter().zip(&checked.1).all(|(a, b)| a.to_bits() == b.to_bits())
    };
    let shuffled = serving::time(
        dec,
        shape,
        layout,
        x.q,
        x.cache,
        x.kv_scale,
        x.block_table,
        x.seqlens,
        layers,
        shared_cache,
    )?;
    let (table, cache) = serving::contiguous(shape, x.block_table, x.seqlens, x.cache);
    let contig = serving::time(
        dec,
        shape,
        layout,
        x.q,
        &cache,
        x.kv_scale,
        &table,
        x.seqlens,
        layers,
        shared_cache,
    )?;
    row.layers = shuffled.layers.min(contig.layers);
    row.serve_us = shuffled.us;
    row.serve_us_contig = contig.us;
    row.serve_pct = metrics::gbps(row.bytes, shuffled.us) / info.copy_gbps * 100.0;
    row.serve_pct_contig = metrics::gbps(row.bytes, contig.us) / info.copy_gbps * 100.0;
    if row.layers < layers {
        if !row.note.is_empty() {
            row.note.push_str("; ");
        }
        row.note.push_str(&format!("serving: {} layers fit", row.layers));
    }
    if !same(&shuffled) || !same(&contig) {
        row.status = "FAILED".into();
        if !row.note.is_empty() {
            row.note.push_str("; ");
        }
        row.note
            .push_str("serving-mode output differs from the checked per-call output");
    }
    Ok(())
}

/// The per-call timing and the checks; returns the inputs and the checked output (out as f32,
/// lse) for serving mode.
#[allow(clippy::type_complexity)]
fn bench_inner<T: Element>(
    dec: &Decoder,
    stream: &Stream,
    info: &RunInfo,
    cfg: &Config,
    o: &Options,
    layout: Layout,
    row: &mut Row,
) -> BoxResult<(gen::HostInputs<T>, (Vec<f32>, Vec<f32>))> {
    let tag = format!("[{} {} {}]", cfg.name, T::DTYPE, layout_name(layout));
    let t0 = Instant::now();
    let seed = seed_of(&cfg.name);
    let mut x = gen::generate::<T>(cfg.batch, cfg.s_q, cfg.h_q, &cfg.seqlens, cfg.page_size, seed);
    // The reference reads the uniform shape; the kernels run `shape` (packed with `--packed`).
    let uniform = x.shape;
    let shape = if cfg.packed {
        uniform.with_packed_q(uniform.batch * uniform.s_q)
    } else {
        uniform
    };
    let offsets = DeviceBuffer::from_slice(&packed_offsets(&shape))?;
    let set_bytes = ((x.q.len() + x.cache.len()) * std::mem::size_of::<T>()) as u64;
    let cache_bytes = (x.cache.len() * std::mem::size_of::<T>()) as u64;
    let mut sets = if cache_bytes < L2_FACTOR * info.l2_bytes {
        (L2_FACTOR * info.l2_bytes).div_ceil(set_bytes.max(1)) as usize
    } else {
        1
    };
    let (free, _) = cust::memory::mem_get_info()?;
    let fit = ((free as f64 * 0.8) / set_bytes as f64) as usize;
    if fit < sets {
        row.note = format!("only {fit} input set(s) fit in device memory");
        sets = fit.max(1);
    }
    row.sets = sets;
    eprintln!(
        "{tag} inputs: {:.1} MB a set, generated in {:.2} s; {sets} set(s) rotated",
        set_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );

    let bt = DeviceBuffer::from_slice(&x.block_table)?;
    let sl = DeviceBuffer::from_slice(&x.seqlens)?;
    let mut qs = Vec::with_capacity(sets);
    let mut caches = Vec::with_capacity(sets);
    for _ in 0..sets {
        qs.push(DeviceBuffer::from_slice(&x.q)?);
        caches.push(DeviceBuffer::from_slice(&x.cache)?);
    }
    dec.check_tables(&shape, &bt, &sl)?;
    // One plan per input set, made here, outside the timed region: each plan keeps the tensor
    // maps of its own buffers, so the timed calls upload nothing.
    let plans = (0..sets)
        .map(|_| dec.plan_with_layout(&shape, &sl, stream, layout))
        .collect::<Result<Vec<_>, _>>()?;
    let t = plans[0].tiling();
    eprintln!(
        "{tag} plan: {} parts x {} column groups of {} columns ({:?})",
        plans[0].parts(),
        t.groups,
        t.cols_per_cta,
        t.layout
    );
    let nan_out = vec![T::nan(); shape.out_len()];
    let nan_lse = vec![f32::NAN; shape.lse_len()];
    let mut out = DeviceBuffer::from_slice(&nan_out)?;
    let mut lse = DeviceBuffer::from_slice(&nan_lse)?;

    let decode = |k: usize, out: &mut DeviceBuffer<T>, lse: &mut DeviceBuffer<f32>| {
        if cfg.packed {
            dec.decode_packed_into(
                &plans[k], &qs[k], &offsets, &caches[k], &bt, &sl, None, out, lse, stream,
            )
        } else {
            dec.decode_into(&plans[k], &qs[k], &caches[k], &bt, &sl, None, out, lse, stream)
        }
    };
    // Correctness first.
    decode(0, &mut out, &mut lse)?;
    stream.synchronize()?;
    let picks = check::pick_requests(&x.seqlens, cfg.s_q, cfg.h_q, seed ^ 0x5eed);
    let t1 = Instant::now();
    let reference = check::reference(&x, &picks, None)?;
    let ref_s = t1.elapsed().as_secs_f64();
    let fetch = |out: &DeviceBuffer<T>, lse: &DeviceBuffer<f32>| -> BoxResult<(Vec<f32>, Vec<f32>)> {
        let mut o = vec![T::default(); shape.out_len()];
        let mut l = vec![0f32; shape.lse_len()];
        out.copy_to(&mut o[..])?;
        lse.copy_to(&mut l[..])?;
        Ok((o.iter().map(|v| v.to_f32()).collect(), lse_to_uniform(&shape, l)))
    };
    let (go, gl) = fetch(&out, &lse)?;
    let first = check::compare(&reference, shape.cols(), &go, &gl);
    let checked = (go, gl);
    row.checked_requests = picks.clone();
    eprintln!(
        "{tag} check of requests {picks:?} (reference {ref_s:.1} s): rel err {:.2e}, lse diff {:.2e}{}",
        first.rel_err,
        first.lse_diff,
        if first.nan {
            ", a row unwritten, not finite or wrongly empty"
        } else {
            ""
        }
    );

    // Timing. Poison the outputs again: the check after timing sees only the timed runs' writes.
    out.copy_from(&nan_out[..])?;
    lse.copy_from(&nan_lse[..])?;
    let warmup = o.warmup.max(sets);
    let mut call = |i: usize| -> BoxResult<()> {
        decode(i % sets, &mut out, &mut lse)?;
        Ok(())
    };
    for i in 0..warmup {
        call(i)?;
    }
    let times = timed(stream, o.iters, |i| call(warmup + i))?;
    let (go, gl) = fetch(&out, &lse)?;
    let second = check::compare(&reference, shape.cols(), &go, &gl);
    if second != first {
        eprintln!(
            "{tag} after timing: rel err {:.2e}, lse diff {:.2e}{}",
            second.rel_err,
            second.lse_diff,
            if second.nan {
                ", a row unwritten, not finite or wrongly empty"
            } else {
                ""
            }
        );
    }

    let us = metrics::median(&times.per_iter);
    row.us = us;
    row.us_min = times.per_iter.iter().copied().fold(f64::INFINITY, f64::min);
    row.us_loop = times.loop_mean;
    row.gbps = metrics::gbps(row.bytes, us);
    row.tflops = metrics::tflops(row.flops, us);
    row.pct_copy = row.gbps / info.copy_gbps * 100.0;
    row.rel_err = first.rel_err.max(second.rel_err);
    row.lse_diff = first.lse_diff.max(second.lse_diff);
    let passed = first.passes() && second.passes();
    row.status = if passed { "ok" } else { "FAILED" }.into();
    if !passed {
        let mut why: Vec<&str> = vec![];
        // The check's own reason (a row over its bound, a row unwritten or not finite, a wrong
        // -inf), from the first failing check.
        if let Some(f) = first.failure.as_deref().or(second.failure.as_deref()) {
            why.push(f);
        }
        if !first.passes() && second.passes() {
            why.push("before timing only");
        }
        if first.passes() && !second.passes() {
            why.push("after timing only");
        }
        if !why.is_empty() {
            if !row.note.is_empty() {
                row.note.push_str("; ");
            }
            row.note.push_str(&why.join(", "));
        }
    }
    drop(plans);
    x.shape = shape;
    Ok((x, checked))
}

/// An FP8 cache (`--kv`): the bf16 inputs quantized to `cfg.kv` (q and out in `T`: bf16 or
/// fp16), one call checked against the reference over the dequantized cache, then serving mode
/// (shuffled and contiguous), whose last output must equal the checked call's bit for bit. No
/// per-call timing.
fn bench_fp8<T: Element>(
    dec: &Decoder,
    info: &RunInfo,
    cfg: &Config,
    o: &Options,
    layout: Layout,
    row: &mut Row,
) -> BoxResult<()> {
    let tag = format!("[{} {}]", cfg.name, T::DTYPE);
    let t0 = Instant::now();
    let x = gen::generate::<Bf16>(
        cfg.batch,
        cfg.s_q,
        cfg.h_q,
        &cfg.seqlens,
        cfg.page_size,
        seed_of(&cfg.name),
    );
    let shape = x.shape.with_kv_format(cfg.kv);
    let pages = x.shape.num_pages;
    let kv_scale = match cfg.kv {
        KvFormat::Fp8Flashmla656 => None,
        _ => Some(fp8::per_tensor_scale(&x.cache)),
    };
    // Quantized, and for the reference dequantized (656: exact in bf16) or read as stored
    // (per-tensor: the reference applies the scale, as the kernel), in page-aligned chunks on
    // every core.
    let bf_page = x.cache.len() / pages;
    let chunk = pages.div_ceil(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let parts: Vec<(Vec<u8>, Vec<Bf16>)> = std::thread::scope(|sc| {
        x.cache
            .chunks(chunk * bf_page)
            .map(|c| {
                sc.spawn(move || {
                    let n = c.len() / bf_page;
                    match kv_scale {
                        None => {
                            let b = fp8::quantize_fp8_656(c, n);
                            let d = fp8::dequantize_fp8_656(&b, n);
                            (b, d)
                        }
                        Some(s) => {
                            let b = fp8::quantize_e4m3_per_tensor(c, s);
                            let d = fp8::e4m3_values(&b);
                            (b, d)
                        }
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("a quantizer thread"))
            .collect()
    });
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.0.iter().copied()).collect();
    // The reference reads the dequantized (or stored) cache and q in `T`, q's type (the values
    // are exact in bf16, and in fp16 within its range, where the kernels compute: the
    // conversion changes none of them). The bf16 cache goes first: held as a field of the
    // shadowed inputs, it would stay until the function returns (1.2 GB at b16 64K).
    drop(x.cache);
    let x = gen::HostInputs::<T> {
        q: x.q.into_iter().map(|v| T::from_f32(v.to_f32())).collect(),
        cache: parts
            .into_iter()
            .flat_map(|p| p.1)
            .map(|v| T::from_f32(v.to_f32()))
            .collect(),
        shape: x.shape,
        block_table: x.block_table,
        seqlens: x.seqlens,
    };
    eprintln!("{tag} inputs quantized in {:.2} s", t0.elapsed().as_secs_f64());
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None)?;
    let q = DeviceBuffer::from_slice(&x.q)?;
    let kv = DeviceBuffer::from_slice(&bytes)?;
    let bt = DeviceBuffer::from_slice(&x.block_table)?;
    let sl = DeviceBuffer::from_slice(&x.seqlens)?;
    let mut out = DeviceBuffer::from_slice(&vec![T::nan(); shape.out_len()])?;
    let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()])?;
    let plan = dec.plan_with_layout(&shape, &sl, &stream, layout)?;
    dec.decode_fp8_into(&plan, &q, &kv, kv_scale, &bt, &sl, None, &mut out, &mut lse, &stream)?;
    stream.synchronize()?;
    let mut go = vec![T::default(); shape.out_len()];
    let mut gl = vec![0f32; shape.lse_len()];
    out.copy_to(&mut go[..])?;
    lse.copy_to(&mut gl[..])?;
    let go: Vec<f32> = go.iter().map(|v| v.to_f32()).collect();
    let picks = check::pick_requests(&x.seqlens, cfg.s_q, cfg.h_q, seed_of(&cfg.name) ^ 0x5eed);
    let reference = check::reference(&x, &picks, kv_scale)?;
    let outcome = check::compare(&reference, shape.cols(), &go, &gl);
    row.checked_requests = picks;
    row.rel_err = outcome.rel_err;
    row.lse_diff = outcome.lse_diff;
    row.status = if outcome.passes() { "ok" } else { "FAILED" }.into();
    if let Some(f) = outcome.failure.as_deref() {
        row.note = f.to_string();
    }
    eprintln!(
        "{tag} check: rel err {:.2e}, lse diff {:.2e}",
        outcome.rel_err, outcome.lse_diff
    );
    if o.layers == 0 {
        return Ok(());
    }
    let inputs = ServeInputs {
        shape: &shape,
        q: &x.q,
        cache: &bytes,
        kv_scale,
        block_table: &x.block_table,
        seqlens: &x.seqlens,
    };
    bench_serving(dec, info, inputs, &(go, gl), layout, o.layers, o.shared_cache, row)
}

/// The packed layout's offsets for a batch of `s_q` tokens a request (`r * s_q`); empty for a
/// uniform shape.
pub(crate) fn packed_offsets(shape: &DecodeShape) -> Vec<i32> {
    match shape.packed_q {
        Some(_) => (0..=shape.batch).map(|r| (r * shape.s_q) as i32).collect(),
        None => vec![0],
    }
}

/// lse as the uniform layout has it (`[b, h_q, s_q]`), from the packed layout's
/// `[b * s_q, h_q]` when `shape` is packed (every request at `s_q` tokens).
pub(crate) fn lse_to_uniform(shape: &DecodeShape, lse: Vec<f32>) -> Vec<f32> {
    if shape.packed_q.is_none() {
        return lse;
    }
    let (b, s, h) = (shape.batch, shape.s_q, shape.h_q);
    let mut u = vec![0f32; lse.len()];
    for r in 0..b {
        for t in 0..s {
            for hd in 0..h {
                u[(r * h + hd) * s + t] = lse[(r * s + t) * h + hd];
            }
        }
    }
    u
}
