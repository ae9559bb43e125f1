//! On a GPU: decode in both layouts (ETAP KV-on-M, the wide heads-on-M kernel) against the
//! f64 CPU reference, on poisoned inputs (cache rows past each seqlen and unused pages are NaN,
//! unused block-table slots junk, non-contiguous block tables), with out and lse poisoned with NaN
//! before every launch. Pass (`etap::check`): every compared (request, token) row of out within
//! its dtype's bound of the reference relative to the row's own norm (bf16 2.93e-3, fp16
//! 3.66e-4), lse within 1e-4 (and -inf exactly where the reference has it), and every row of the
//! whole batch, compared or not, written and finite.
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::stream::{Stream, StreamFlags};
use etap::gpu::decoder_or_skip;
use etap::{Bf16, Decoder, Element, Layout, F16};
use etap_tests::{compare_packed, pack_q, read_back, Case, CaseSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Largest request rows compared in full; longer batches are checked on sampled requests.
const FULL_CHECK_ROWS: usize = 40_000;

/// Every layout runs every case (the plan's own choice is one of them).
const LAYOUTS: [Layout; 2] = [Layout::KvOnM, Layout::HeadsOnM];

/// Calls of `decode_into` per case with one plan: the plan is reused across a model's layers,
/// and the split merge's counters carry over from call to call (kernels/src/merge.rs).
const CALLS_PER_PLAN: usize = 3;

/// Decode `case` on the GPU with the given layout, [`CALLS_PER_PLAN`] times with one plan, the
/// outputs poisoned with NaN before each call; every call must give the same bits. Returns out
/// and lse as f32.
fn decode_gpu<T: Element>(dec: &Decoder, case: &Case<T>, layout: Layout) -> (Vec<f32>, Vec<f32>) {
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let q = DeviceBuffer::from_slice(&case.q).unwrap();
    let kv = DeviceBuffer::from_slice(&case.cache).unwrap();
    let bt = DeviceBuffer::from_slice(&case.block_table).unwrap();
    let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
    let shape = case.shape;
    let out_poison = vec![T::nan(); shape.out_len()];
    let lse_poison = vec![f32::NAN; shape.lse_len()];
    let mut out = DeviceBuffer::from_slice(&out_poison).unwrap();
    let mut lse = DeviceBuffer::from_slice(&lse_poison).unwrap();
    dec.check_tables(&shape, &bt, &sl).unwrap();
    let plan = dec.plan_with_layout(&shape, &sl, &stream, layout).unwrap();
    let mut first: Option<(Vec<T>, Vec<f32>)> = None;
    for call in 0..CALLS_PER_PLAN {
        if call > 0 {
            out.copy_from(&out_poison[..]).unwrap();
            lse.copy_from(&lse_poison[..]).unwrap();
        }
        dec.decode_into(
            &plan,
            &q,
            &kv,
            &bt,
            &sl,
            Some(case.softmax_scale),
            &mut out,
            &mut lse,
            &stream,
        )
        .unwrap();
        let (o, l) = read_back(&stream, &out, &lse);
        match &first {
            None => first = Some((o, l)),
            Some((o0, l0)) => {
                let same_out = bytemuck::cast_slice::<T, u8>(o0) == bytemuck::cast_slice::<T, u8>(&o);
                let same_lse = bytemuck::cast_slice::<f32, u8>(l0) == bytemuck::cast_slice::<f32, u8>(&l);
                assert!(
                    same_out && same_lse,
                    "{layout:?}: call {call} with the same plan differs from call 0 (seed {})",
                    case.seed
                );
            }
        }
    }
    let (o, l) = first.unwrap();
    (o.iter().map(|x| x.to_f32()).collect(), l)
}

/// Run `case` with each of `layouts` and check each against one CPU reference (every request,
/// or for long batches the first, the last, the longest and two random ones; every request's
/// rows are checked for being written and finite either way).
fn check_layouts<T: Element>(dec: &Decoder, case: &Case<T>, what: &str, layouts: &[Layout]) {
    let shape = case.shape;
    let total_rows: i64 = case.seqlens.iter().map(|&s| s.max(0) as i64).sum();
    let per_out = shape.s_q * shape.h_q * shape.d_v;
    let per_lse = shape.s_q * shape.h_q;
    let picks: Vec<usize> = if (total_rows as usize) * shape.h_q <= FULL_CHECK_ROWS * 16 {
        (0..shape.batch).collect()
    } else {
        let mut rng = StdRng::seed_from_u64(case.seed ^ 0x5eed);
        let longest = (0..shape.batch).max_by_key(|&r| case.seqlens[r]).unwrap();
        let mut picks = vec![
            0,
            shape.batch - 1,
            longest,
            rng.gen_range(0..shape.batch),
            rng.gen_range(0..shape.batch),
        ];
        picks.sort_unstable();
        picks.dedup();
        picks
    };
    let references: Vec<(usize, Vec<f32>, Vec<f32>)> = if picks.len() == shape.batch {
        let (ro, rl) = case.reference();
        (0..shape.batch)
            .map(|r| {
                (
                    r,
                    ro[r * per_out..(r + 1) * per_out].to_vec(),
                    rl[r * per_lse..(r + 1) * per_lse].to_vec(),
                )
            })
            .collect()
    } else {
        picks
            .iter()
            .map(|&r| {
                let (o, l) = case.reference_request(r);
                (r, o, l)
            })
            .collect()
    };
    let refs: Vec<(usize, &[f32], &[f32])> = references.iter().map(|(r, o, l)| (*r, &o[..], &l[..])).collect();
    for &layout in layouts {
        let (o, l) = decode_gpu(dec, case, layout);
        let outcome = etap::check::compare(T::DTYPE, shape.s_q, shape.h_q, &case.seqlens, &o, &l, &refs);
        println!(
            "{what:<10} {:<8} {:>5} b={:<3} s_q={} h_q={:<3} page={:<3} rows={:<7} row_err={:.2e} (request {} token {}) request_err={:.2e} lse_diff={:.2e}",
            format!("{layout:?}"),
            format!("{:?}", T::DTYPE),
            shape.batch,
            shape.s_q,
            shape.h_q,
            shape.page_size,
            total_rows,
            outcome.row_err,
            outcome.worst_row.0,
            outcome.worst_row.1,
            outcome.request_err,
            outcome.lse_diff
        );
        if let Some(why) = outcome.failure() {
            panic!(
                "{what} {layout:?} {}: {why} (seed {}, seqlens {:?})",
                T::DTYPE,
                case.seed,
                case.seqlens
            );
        }
    }
}

/// [`check_layouts`] with every layout.
fn check<T: Element>(dec: &Decoder, case: &Case<T>, what: &str) {
    check_layouts(dec, case, what, &LAYOUTS);
}

#[test]
fn fixed_seed_cases() {
    let Some(dec) = decoder_or_skip("gpu_decode fixed cases") else {
        return;
    };
    // Every head count, s_q 1..4, lengths around page boundaries, zero and short requests.
    let cases: &[(usize, usize, &[i32])] = &[
        (1, 16, &[1]),
        (1, 16, &[64]),
        (1, 16, &[65, 130, 4096]),
        (1, 8, &[777, 0, 3]),
        (2, 16, &[1, 2, 1000]),
        (1, 32, &[2000, 129]),
        (3, 8, &[500, 1]),
        (1, 64, &[1500, 64]),
        (4, 16, &[900, 3]),
        (2, 32, &[700]),
        (1, 128, &[1100, 50]),
        (3, 32, &[300]),
        (4, 128, &[260]),
        (1, 16, &[0, 0]),
    ];
    for (k, (s_q, h_q, seqlens)) in cases.iter().enumerate() {
        let seed = 1000 + k as u64;
        check(&dec, &Case::<Bf16>::new(*s_q, *h_q, seqlens, seed), "fixed");
        check(&dec, &Case::<F16>::new(*s_q, *h_q, seqlens, seed + 500), "fixed");
    }
}

/// Issue 13's shapes: odd head counts (tensor-parallel shards), up to 8 query tokens, pages of
/// 16, 32 and 128 rows, each with lengths around page and tile boundaries, empty and one-row
/// requests, in both layouts.
#[test]
fn shapes_heads_tokens_pages() {
    let Some(dec) = decoder_or_skip("gpu_decode heads, tokens and pages") else {
        return;
    };
    let lens: &[i32] = &[1, 0, 15, 16, 17, 63, 64, 65, 200, 1300];
    // (s_q, h_q, page size)
    let cases: &[(usize, usize, usize)] = &[
        (1, 1, 64),
        (2, 3, 64),
        (3, 6, 16),
        (1, 12, 32),
        (2, 20, 128),
        (1, 22, 64),
        (4, 24, 64),
        (1, 48, 16),
        (1, 96, 32),
        (1, 127, 64),
        (5, 16, 64),
        (6, 10, 128),
        (7, 2, 32),
        (8, 16, 16),
        (8, 5, 64),
        (3, 128, 128),
        (1, 16, 16),
        (1, 16, 32),
        (1, 16, 128),
    ];
    for (k, &(s_q, h_q, page)) in cases.iter().enumerate() {
        let seed = 3000 + k as u64;
        let spec = CaseSpec {
            page_size: page,
            ..CaseSpec::new(s_q, h_q, lens, seed)
        };
        check(&dec, &Case::<Bf16>::from_spec(&spec), "shapes");
        if k % 3 == 0 {
            check(
                &dec,
                &Case::<F16>::from_spec(&CaseSpec {
                    seed: seed + 500,
                    ..spec
                }),
                "shapes",
            );
        }
    }
}

/// Proptest-driven cases: b 1-64, s_q 1-8, h_q 1-128 (the powers of two weighted up), every
/// page size, seqlens 0-20000 mixed in one batch (a
/// third of the cases up to 20000, the rest up to 3000 to keep the CPU reference fast), random
/// block-table slack, both dtypes. `ETAP_SEED` fixes the generator (the seed is printed);
/// `ETAP_CASES` sets the number of cases (default 24). A failure is shrunk by proptest.
#[test]
fn random_cases() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let Some(dec) = decoder_or_skip("gpu_decode random cases") else {
        return;
    };
    let seed0: u64 = std::env::var("ETAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("random_cases: ETAP_SEED={seed0}");
    let cases: u32 = std::env::var("ETAP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed0.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let strategy = (
        prop_oneof![
            1 => prop::sample::select(vec![8usize, 16, 32, 64, 128]),
            1 => 1usize..=128
        ],
        prop_oneof![3 => 1usize..=4, 1 => 5usize..=8],
        prop_oneof![2 => Just(3_000i32), 1 => Just(20_000i32)],
        prop::collection::vec(0.0f64..1.0, 1..=64),
        (0usize..3, prop::sample::select(etap_core::PAGE_SIZES.to_vec())),
        any::<bool>(),
        any::<u64>(),
    );
    runner
        .run(
            &strategy,
            |(h_q, s_q, max_len, fractions, (extra_slots, page_size), f16, seed)| {
                // Mixed lengths: a tenth empty or tiny, the rest spread up to max_len.
                let seqlens: Vec<i32> = fractions
                    .iter()
                    .map(|&u| {
                        if u < 0.05 {
                            0
                        } else if u < 0.1 {
                            (u * 100.0) as i32
                        } else {
                            (u * max_len as f64) as i32
                        }
                    })
                    .collect();
                let mut spec = CaseSpec::new(s_q, h_q, &seqlens, seed);
                spec.extra_slots = extra_slots;
                spec.page_size = page_size;
                if f16 {
                    check(&dec, &Case::<F16>::from_spec(&spec), "random");
                } else {
                    check(&dec, &Case::<Bf16>::from_spec(&spec), "random");
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("ETAP_SEED={seed0}: {e}"));
}

/// A few small cases for compute-sanitizer (`run.sh --sanitize`: memcheck, racecheck,
/// synccheck), fast enough for racecheck: both layouts the plan picks (KV-on-M up to 16
/// columns, heads-on-M from 32, each case run in both), the c16 and c32 kernels and column
/// groups, split requests (and so the split merge) and unsplit ones (one page), partial pages,
/// an empty request, s_q 1, 2, 3 and 8, odd head counts, pages of 16 and 128 rows, both dtypes.
#[test]
fn sanitizer_cases() {
    let Some(dec) = decoder_or_skip("gpu_decode sanitizer cases") else {
        return;
    };
    let cases: &[(usize, usize, &[i32])] = &[
        (1, 16, &[700, 0, 65, 40]),
        (2, 16, &[300, 10]),
        (3, 16, &[300]),
        (1, 32, &[200, 130, 64]),
        (2, 32, &[150]),
        (1, 128, &[100]),
    ];
    for (k, (s_q, h_q, seqlens)) in cases.iter().enumerate() {
        check(
            &dec,
            &Case::<Bf16>::new(*s_q, *h_q, seqlens, 77 + k as u64),
            "sanitizer",
        );
    }
    // Issue 13's shapes: (s_q, h_q, page size).
    for (k, &(s_q, h_q, page)) in [(3usize, 6usize, 16usize), (1, 20, 128), (8, 5, 32)].iter().enumerate() {
        let spec = CaseSpec {
            page_size: page,
            ..CaseSpec::new(s_q, h_q, &[150, 0, 17, 64], 85 + k as u64)
        };
        check(&dec, &Case::<Bf16>::from_spec(&spec), "sanitizer");
    }
    // One fp16 case: the other dtype's instantiation of both kernels.
    check(&dec, &Case::<F16>::new(2, 16, &[200, 1], 90), "sanitizer");
}

/// The packed query layout (issue 13): each request its own token count (0 to `s_q`) through
/// device `q_offsets`, q / out / lse in rows of the batch's tokens. Each request's q is the last
/// tokens of a uniform case's (so its causal bounds are the uniform case's), out and lse are
/// poisoned with NaN before the call, and every request is checked on its own against the
/// packed reference, in both layouts, for bf16 and fp16, pages of 16, 64 and 128 rows.
#[test]
fn packed_query_layout() {
    let Some(dec) = decoder_or_skip("gpu_decode packed layout") else {
        return;
    };
    /// (s_q, h_q, page size, tokens per request, seqlens)
    type PackedCase = (usize, usize, usize, &'static [usize], &'static [i32]);
    let cases: &[PackedCase] = &[
        (2, 16, 64, &[1, 2, 0, 2, 1], &[300, 65, 900, 1, 4000]),
        (8, 6, 16, &[8, 1, 5, 0, 3, 8], &[70, 2000, 8, 640, 0, 129]),
        (4, 20, 128, &[3, 4, 1], &[1000, 5, 257]),
        (8, 16, 64, &[1, 8, 2, 7, 4], &[6000, 300, 64, 3, 1200]),
        (3, 128, 32, &[3, 1, 2], &[500, 90, 33]),
    ];
    for (k, &(s_q, h_q, page, lens, seqlens)) in cases.iter().enumerate() {
        let spec = CaseSpec {
            page_size: page,
            ..CaseSpec::new(s_q, h_q, seqlens, 7000 + k as u64)
        };
        check_packed(&dec, &Case::<Bf16>::from_spec(&spec), lens);
        check_packed(
            &dec,
            &Case::<F16>::from_spec(&CaseSpec {
                seed: spec.seed + 1,
                ..spec
            }),
            lens,
        );
    }
}

/// [`packed_query_layout`]'s check of one case with `lens` tokens per request.
fn check_packed<T: Element>(dec: &Decoder, case: &Case<T>, lens: &[usize]) {
    let (s_q, h_q) = (case.shape.s_q, case.shape.h_q);
    let (offsets, q) = pack_q(&case.q, s_q, h_q, lens);
    let total = *offsets.last().unwrap() as usize;
    let shape = case.shape.with_packed_q(total);
    let (ro, rl) = etap::reference::mla_decode_packed(
        &shape,
        &q,
        &offsets,
        &case.cache,
        &case.block_table,
        &case.seqlens,
        case.softmax_scale,
    )
    .unwrap();
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let q_d = DeviceBuffer::from_slice(&q).unwrap();
    let off_d = DeviceBuffer::from_slice(&offsets).unwrap();
    let kv = DeviceBuffer::from_slice(&case.cache).unwrap();
    let bt = DeviceBuffer::from_slice(&case.block_table).unwrap();
    let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
    dec.check_q_offsets(&shape, &off_d).unwrap();
    for layout in LAYOUTS {
        let mut out = DeviceBuffer::from_slice(&vec![T::nan(); shape.out_len()]).unwrap();
        let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()]).unwrap();
        let plan = dec.plan_with_layout(&shape, &sl, &stream, layout).unwrap();
        dec.decode_packed_into(
            &plan,
            &q_d,
            &off_d,
            &kv,
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
                "packed {layout:?} {} s_q={s_q} h_q={h_q} page={} {why} (seed {})",
                T::DTYPE,
                shape.page_size,
                case.seed
            )
        });
        println!(
            "packed     {:<8} {:>5} b={:<3} s_q<={} h_q={:<3} page={:<3} tokens={lens:?} row_err={worst:.2e}",
            format!("{layout:?}"),
            format!("{:?}", T::DTYPE),
            shape.batch,
            s_q,
            h_q,
            shape.page_size
        );
    }
}
