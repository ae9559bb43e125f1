//! On a GPU: decode over FP8 caches (issue 14), FlashMLA's 656-byte format and per-tensor e4m3,
//! against the CPU reference over the dequantized cache (`etap::reference::mla_decode_fp8`), with
//! the bound of `etap::check` for q's dtype (bf16, or fp16 converted from the bf16 case's q),
//! every request on its own. The caches are quantized from the poisoned bf16 cases of the other
//! GPU tests (NaN past each seqlen and in unused pages, which quantize to e4m3 NaN; junk in unused
//! block-table slots; shuffled pages), and out and lse are poisoned with NaN before every call.
//! Also printed: the error against the unquantized bf16 reference (what the quantization costs).
//! The packed query layout over an FP8 cache is checked the same way, against
//! `etap::reference::mla_decode_fp8_packed`.
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::stream::{Stream, StreamFlags};
use etap::gpu::decoder_or_skip;
use etap::{Bf16, DecodeShape, Decoder, Element, EtapError, KvFormat, Layout, F16};
use etap_tests::{compare_packed, pack_q, quantize_case, read_back, spread_pages, Case};

/// Decode `case`'s cache in `format` on the GPU with q (and out) of `T` and check every request:
/// with `layout` `None` in the plan's layout (`Decoder::plan`: KV on M, the FP8 ETAP kernel, up to
/// 32 columns, heads on M from 33 in either format), with `Some(Layout::HeadsOnM)` heads on
/// M (`Decoder::plan_with_layout`: the wide FP8 kernel). With `page_stride` `Some(rows)` the
/// cache's pages lie `rows` rows apart (`DecodeShape::with_kv_page_stride`), the rows between
/// them NaN in every byte (read, they would poison the result).
fn check_fp8<T: Element>(
    dec: &Decoder,
    case: &Case<Bf16>,
    format: KvFormat,
    layout: Option<Layout>,
    page_stride: Option<usize>,
) {
    let mut shape = case.shape.with_kv_format(format);
    let (mut bytes, kv_scale) = quantize_case(case, format);
    if let Some(rows) = page_stride {
        (shape, bytes) = spread_pages(&shape, &bytes, rows);
    }
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let q_host: Vec<T> = case.q.iter().map(|x| T::from_f32(x.to_f32())).collect();
    let q = DeviceBuffer::from_slice(&q_host).unwrap();
    let kv = DeviceBuffer::from_slice(&bytes).unwrap();
    let bt = DeviceBuffer::from_slice(&case.block_table).unwrap();
    let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
    let mut out = DeviceBuffer::from_slice(&vec![T::nan(); shape.out_len()]).unwrap();
    let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()]).unwrap();
    let plan = match layout {
        None => dec.plan(&shape, &sl, &stream).unwrap(),
        Some(l) => dec.plan_with_layout(&shape, &sl, &stream, l).unwrap(),
    };
    let t = plan.tiling();
    match layout {
        // The plan's rule: heads on M from 33 columns in either format (the wide FP8 kernel,
        // 64 columns a CTA); otherwise CTAs of 16 columns up to 16, else column groups
        // of 32 (the FP8 ETAP kernel's CTAs).
        None => {
            let cols = shape.cols() as u32;
            let (want, cols_per_cta) = if cols >= 33 {
                (Layout::HeadsOnM, 64)
            } else {
                (Layout::KvOnM, fp8_cols_per_cta(cols))
            };
            assert_eq!(
                (t.layout, t.cols_per_cta, t.groups),
                (want, cols_per_cta, cols.div_ceil(cols_per_cta))
            );
        }
        // The wide FP8 kernel: 64 columns a CTA.
        Some(Layout::HeadsOnM) => assert_eq!(
            (t.layout, t.cols_per_cta, t.groups),
            (Layout::HeadsOnM, 64, (shape.cols() as u32).div_ceil(64))
        ),
        Some(l) => panic!("check_fp8 takes None or Some(Layout::HeadsOnM), not {l:?}"),
    }
    dec.decode_fp8_into(
        &plan,
        &q,
        &kv,
        kv_scale,
        &bt,
        &sl,
        Some(case.softmax_scale),
        &mut out,
        &mut lse,
        &stream,
    )
    .unwrap();
    let (o, l) = read_back(&stream, &out, &lse);
    let o: Vec<f32> = o.iter().map(|x| x.to_f32()).collect();
    let (ro, rl) = etap::reference::mla_decode_fp8(
        &shape,
        &q_host,
        &bytes,
        kv_scale,
        &case.block_table,
        &case.seqlens,
        case.softmax_scale,
    )
    .unwrap();
    let (per_out, per_lse) = (shape.s_q * shape.h_q * shape.d_v, shape.s_q * shape.h_q);
    let refs: Vec<(usize, &[f32], &[f32])> = (0..shape.batch)
        .map(|r| {
            (
                r,
                &ro[r * per_out..(r + 1) * per_out],
                &rl[r * per_lse..(r + 1) * per_lse],
            )
        })
        .collect();
    let outcome = etap::check::compare(T::DTYPE, shape.s_q, shape.h_q, &case.seqlens, &o, &l, &refs);
    // What quantization costs: the unquantized bf16 reference (not a pass criterion).
    let (bo, _) = case.reference();
    let vs_bf16 = etap::metrics::rel_err(&o, &bo);
    println!(
        "fp8 {format:?} q {:?} layout={:?} b={} s_q={} h_q={} groups={} parts={} page_stride={} row_err={:.2e} lse_diff={:.2e} (vs the unquantized bf16 reference: rel err {vs_bf16:.2e})",
        T::DTYPE, t.layout, shape.batch, shape.s_q, shape.h_q, t.groups, plan.parts(), shape.kv_page_stride_rows(), outcome.row_err, outcome.lse_diff
    );
    if let Some(why) = outcome.failure() {
        panic!(
            "fp8 {format:?} q {:?} layout {:?}: {why} (seed {}, seqlens {:?}, s_q {}, h_q {})",
            T::DTYPE,
            t.layout,
            case.seed,
            case.seqlens,
            shape.s_q,
            shape.h_q
        );
    }
}

#[test]
fn fp8_caches_match_the_reference() {
    let Some(dec) = decoder_or_skip("gpu_fp8") else {
        return;
    };
    // (s_q, h_q, seqlens): empty, one-row and page-boundary requests, a long one; up to 16
    // columns (the CTA of 16), then past 16 the CTA of 32, in column groups past 32 (2 to 4
    // CTAs a part, each with its own Q rows, merge counters and partials): DeepSeek MTP (s_q 2 x
    // h16), h32, h64, h128 (DP attention), s_q 4 x h8, and padding columns in a CTA of 32 (s_q 3
    // x h6: 18 of 32; s_q 3 x h16: the second group half empty). The longest request past 16
    // columns is a few thousand rows, so that it is split over parts (the merge per column
    // group) while the f64 CPU reference stays affordable. Every case past 16 columns also runs
    // heads on M (`plan_with_layout`): the wide FP8 kernel, 64 columns a CTA, each page converted
    // once for 64 columns.
    let cases: &[(usize, usize, &[i32])] = &[
        (1, 16, &[1, 0, 64, 65, 300, 4000]),
        (2, 8, &[129, 7, 2000]),
        (1, 1, &[5000, 33]),
        (1, 6, &[700, 64]),
        (4, 4, &[64, 1, 1000]),
        (1, 16, &[20_000, 3]),
        (2, 16, &[1, 0, 64, 65, 4000, 129]),
        (1, 32, &[65, 64, 0, 1, 3500]),
        (1, 64, &[3000, 1, 64, 0, 65]),
        (1, 128, &[0, 65, 1, 2900, 64]),
        (4, 8, &[64, 1, 0, 65, 2500, 3]),
        (3, 6, &[2, 700, 0]),
        (3, 16, &[3000, 0, 65, 1]),
    ];
    for (k, &(s_q, h_q, seqlens)) in cases.iter().enumerate() {
        let case = Case::<Bf16>::new(s_q, h_q, seqlens, 9000 + k as u64);
        for format in [KvFormat::Fp8Flashmla656, KvFormat::Fp8PerTensor] {
            check_fp8::<Bf16>(&dec, &case, format, None, None);
            check_fp8::<F16>(&dec, &case, format, None, None);
        }
        if s_q * h_q > 16 {
            for format in [KvFormat::Fp8Flashmla656, KvFormat::Fp8PerTensor] {
                check_fp8::<Bf16>(&dec, &case, format, Some(Layout::HeadsOnM), None);
                check_fp8::<F16>(&dec, &case, format, Some(Layout::HeadsOnM), None);
            }
        }
    }
}

/// Caches whose pages lie another number of rows apart than their format's own layout
/// (`DecodeShape::with_kv_page_stride`): 64, a contiguous `[num_blocks, 64, 656]` cache of
/// FlashMLA's format as vLLM allocates it, and 66; the rows between pages NaN. Both formats, in
/// the kernels of 16 and 32 columns and the wide FP8 kernel (column counts 16, 32 and 64 through
/// the plan), bf16 q, and fp16 q in the wide kernel.
#[test]
fn fp8_page_strides() {
    let Some(dec) = decoder_or_skip("gpu_fp8 page strides") else {
        return;
    };
    for (k, &(s_q, h_q, seqlens)) in [
        (1, 16, &[1, 0, 65, 3000][..]),
        (2, 16, &[700, 64, 1]),
        (1, 64, &[2000, 0, 65]),
    ]
    .iter()
    .enumerate()
    {
        let case = Case::<Bf16>::new(s_q, h_q, seqlens, 9100 + k as u64);
        for format in [KvFormat::Fp8Flashmla656, KvFormat::Fp8PerTensor] {
            for rows in [64, 66] {
                check_fp8::<Bf16>(&dec, &case, format, None, Some(rows));
                if s_q * h_q > 32 {
                    check_fp8::<F16>(&dec, &case, format, None, Some(rows));
                }
            }
        }
    }
}

/// The packed query layout over an FP8 cache: each request its own token count (0 to `s_q`)
/// through device `q_offsets`, q / out / lse in rows of the batch's tokens (each request's q
/// the last tokens of a uniform case's), against the packed reference over the dequantized
/// cache (`etap::reference::mla_decode_fp8_packed`), every request on its own, out and lse
/// poisoned first. Both formats, bf16 and fp16 q; 16, 32, 48 and 128 columns (the CTA of 16,
/// that of 32, column groups of 32).
#[test]
fn fp8_packed_query_layout() {
    let Some(dec) = decoder_or_skip("gpu_fp8 packed layout") else {
        return;
    };
    /// (s_q, h_q, tokens per request, seqlens)
    type PackedCase = (usize, usize, &'static [usize], &'static [i32]);
    let cases: &[PackedCase] = &[
        (4, 4, &[4, 1, 0, 3], &[64, 1000, 7, 129]),
        (2, 16, &[1, 2, 0, 2, 1], &[300, 65, 900, 1, 4000]),
        (3, 16, &[3, 1, 2], &[2000, 90, 65]),
        (8, 16, &[1, 8, 2, 7], &[3000, 300, 64, 3]),
    ];
    for (k, &(s_q, h_q, lens, seqlens)) in cases.iter().enumerate() {
        let case = Case::<Bf16>::new(s_q, h_q, seqlens, 9500 + k as u64);
        for format in [KvFormat::Fp8Flashmla656, KvFormat::Fp8PerTensor] {
            check_fp8_packed::<Bf16>(&dec, &case, format, lens);
            check_fp8_packed::<F16>(&dec, &case, format, lens);
        }
    }
}

/// [`fp8_packed_query_layout`]'s check of one case in `format` with q (and out) of `T`.
fn check_fp8_packed<T: Element>(dec: &Decoder, case: &Case<Bf16>, format: KvFormat, lens: &[usize]) {
    let (s_q, h_q) = (case.shape.s_q, case.shape.h_q);
    let q_uniform: Vec<T> = case.q.iter().map(|x| T::from_f32(x.to_f32())).collect();
    let (offsets, q_host) = pack_q(&q_uniform, s_q, h_q, lens);
    let shape = case
        .shape
        .with_kv_format(format)
        .with_packed_q(*offsets.last().unwrap() as usize);
    let (bytes, kv_scale) = quantize_case(case, format);
    let (ro, rl) = etap::reference::mla_decode_fp8_packed(
        &shape,
        &q_host,
        &offsets,
        &bytes,
        kv_scale,
        &case.block_table,
        &case.seqlens,
        case.softmax_scale,
    )
    .unwrap();
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let q = DeviceBuffer::from_slice(&q_host).unwrap();
    let off = DeviceBuffer::from_slice(&offsets).unwrap();
    let kv = DeviceBuffer::from_slice(&bytes).unwrap();
    let bt = DeviceBuffer::from_slice(&case.block_table).unwrap();
    let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
    let mut out = DeviceBuffer::from_slice(&vec![T::nan(); shape.out_len()]).unwrap();
    let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()]).unwrap();
    dec.check_q_offsets(&shape, &off).unwrap();
    let plan = dec.plan(&shape, &sl, &stream).unwrap();
    let t = plan.tiling();
    dec.decode_fp8_packed_into(
        &plan,
        &q,
        &off,
        &kv,
        kv_scale,
        &bt,
        &sl,
        Some(case.softmax_scale),
        &mut out,
        &mut lse,
        &stream,
    )
    .unwrap();
    let (o, l) = read_back(&stream, &out, &lse);
    let o: Vec<f32> = o.iter().map(|x| x.to_f32()).collect();
    let worst = compare_packed(T::DTYPE, h_q, &offsets, &case.seqlens, &o, &l, &ro, &rl).unwrap_or_else(|why| {
        panic!(
            "fp8 packed {format:?} q {:?} s_q={s_q} h_q={h_q} tokens={lens:?}: {why} (seed {})",
            T::DTYPE,
            case.seed
        )
    });
    println!(
        "fp8 packed {format:?} q {:?} b={} s_q<={s_q} h_q={h_q} groups={} tokens={lens:?} row_err={worst:.2e}",
        T::DTYPE,
        shape.batch,
        t.groups
    );
}

/// Rejected FP8 calls name the argument and write nothing.
#[test]
fn fp8_argument_errors() {
    let Some(dec) = decoder_or_skip("gpu_fp8 errors") else {
        return;
    };
    let case = Case::<Bf16>::new(1, 16, &[300, 70], 5);
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let q = DeviceBuffer::from_slice(&case.q).unwrap();
    let bt = DeviceBuffer::from_slice(&case.block_table).unwrap();
    let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
    let poison_o = vec![Bf16::nan(); case.shape.out_len()];
    let mut out = DeviceBuffer::from_slice(&poison_o).unwrap();
    let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; case.shape.lse_len()]).unwrap();
    for (format, bad_scale) in [
        (KvFormat::Fp8Flashmla656, Some(1.0f32)),
        (KvFormat::Fp8PerTensor, None),
        (KvFormat::Fp8PerTensor, Some(f32::NAN)),
        (KvFormat::Fp8PerTensor, Some(-1.0)),
    ] {
        let shape = case.shape.with_kv_format(format);
        let (bytes, scale) = quantize_case(&case, format);
        let kv = DeviceBuffer::from_slice(&bytes).unwrap();
        let plan = dec.plan(&shape, &sl, &stream).unwrap();
        let e = dec
            .decode_fp8_into(&plan, &q, &kv, bad_scale, &bt, &sl, None, &mut out, &mut lse, &stream)
            .unwrap_err();
        assert!(
            matches!(e, EtapError::Invalid { arg: "kv_scale", .. }),
            "{format:?} {bad_scale:?}: {e:?}"
        );
        // A cache of the wrong length.
        let short = DeviceBuffer::from_slice(&bytes[..bytes.len() - 16]).unwrap();
        let e = dec
            .decode_fp8_into(&plan, &q, &short, None, &bt, &sl, None, &mut out, &mut lse, &stream)
            .unwrap_err();
        assert!(
            matches!(e, EtapError::Length { arg: "kv_cache", .. }),
            "{format:?} short cache: {e:?}"
        );
        // The packed layout: q_offsets of the wrong length, a packed plan without them, and
        // q_offsets given to a uniform plan.
        let packed = dec.plan(&shape.with_packed_q(case.shape.batch), &sl, &stream).unwrap();
        let offsets: Vec<i32> = (0..=case.shape.batch as i32).collect();
        let short = DeviceBuffer::from_slice(&offsets[1..]).unwrap();
        let off = DeviceBuffer::from_slice(&offsets).unwrap();
        let e = dec
            .decode_fp8_packed_into(
                &packed, &q, &short, &kv, scale, &bt, &sl, None, &mut out, &mut lse, &stream,
            )
            .unwrap_err();
        assert!(
            matches!(e, EtapError::Length { arg: "q_offsets", .. }),
            "{format:?} short q_offsets: {e:?}"
        );
        let e = dec
            .decode_fp8_into(&packed, &q, &kv, scale, &bt, &sl, None, &mut out, &mut lse, &stream)
            .unwrap_err();
        assert!(
            matches!(e, EtapError::Invalid { arg: "q_offsets", .. }),
            "{format:?} packed plan without q_offsets: {e:?}"
        );
        let e = dec
            .decode_fp8_packed_into(&plan, &q, &off, &kv, scale, &bt, &sl, None, &mut out, &mut lse, &stream)
            .unwrap_err();
        assert!(
            matches!(e, EtapError::Invalid { arg: "q_offsets", .. }),
            "{format:?} q_offsets with a uniform plan: {e:?}"
        );
    }
    stream.synchronize().unwrap();
    let mut o = vec![Bf16::default(); case.shape.out_len()];
    out.copy_to(&mut o[..]).unwrap();
    assert!(o.iter().all(|x| x.to_f32().is_nan()), "a rejected call wrote out");
}

/// The FP8 kernel's CTA for `cols` (token, head) columns: 16 columns up to 16, else 32.
fn fp8_cols_per_cta(cols: u32) -> u32 {
    if cols <= 16 {
        16
    } else {
        32
    }
}

/// Plans over an FP8 cache. KV on M (`plan_with_layout`): CTAs of 16 columns up to 16 and column
/// groups of 32 past them, `num_sms / groups` parts (all CTAs resident for the cooperative
/// launch). Heads on M: the wide FP8 kernel, 64 columns a CTA, `ceil(s_q * h_q / 64)` groups,
/// `num_sms / groups` parts. `Decoder::plan` takes KV on M up to 32 columns and heads on M from
/// 33, in either format.
#[test]
fn fp8_plans_are_column_groups_of_16_or_32() {
    let Some(dec) = decoder_or_skip("gpu_fp8 plans") else {
        return;
    };
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let sl = DeviceBuffer::from_slice(&[300i32, 0, 65]).unwrap();
    for format in [KvFormat::Fp8Flashmla656, KvFormat::Fp8PerTensor] {
        for (s_q, h_q) in [
            (1, 16),
            (1, 17),
            (2, 16),
            (4, 8),
            (1, 32),
            (1, 33),
            (1, 64),
            (1, 128),
            (4, 128),
            (8, 128),
        ] {
            let shape = DecodeShape::new(3, s_q, h_q, 12, 6).with_kv_format(format);
            let cols = (s_q * h_q) as u32;
            let kv_cols = fp8_cols_per_cta(cols);
            let kv = (Layout::KvOnM, kv_cols, cols.div_ceil(kv_cols));
            let heads = (Layout::HeadsOnM, 64, cols.div_ceil(64));
            let default = if cols >= 33 { heads } else { kv };
            for (layout, want) in [
                (None, default),
                (Some(Layout::KvOnM), kv),
                (Some(Layout::HeadsOnM), heads),
            ] {
                let plan = match layout {
                    None => dec.plan(&shape, &sl, &stream),
                    Some(l) => dec.plan_with_layout(&shape, &sl, &stream, l),
                }
                .unwrap_or_else(|e| panic!("{format:?} {s_q} x {h_q} {layout:?}: {e:?}"));
                let t = plan.tiling();
                assert_eq!(
                    (t.layout, t.cols_per_cta, t.groups),
                    want,
                    "{format:?} {s_q} x {h_q} {layout:?}"
                );
                assert_eq!(plan.parts(), (dec.num_sms() / t.groups).max(1));
                assert!(
                    t.groups * plan.parts() <= dec.num_sms(),
                    "{format:?} {s_q} x {h_q} {layout:?}: more CTAs than SMs"
                );
            }
        }
    }
    stream.synchronize().unwrap();
}
