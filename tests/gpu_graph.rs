//! On a GPU: decode inside CUDA graphs (as serving engines run it), and the defined results of
//! inputs the host cannot check (a stale plan, block-table entries outside the cache).
//!
//! - `graph_replays_match_reference`: one graph holds a re-plan and two layers' decode calls
//!   (each layer its own cache); it is replayed many times with new q and new seqlens written
//!   into the same buffers between replays (uneven: one long request split over most SMs beside
//!   short ones, so a merge that does not wait reads stale partials), with eager calls of the
//!   same plan mixed in. Every output is poisoned with NaN first and checked against the CPU
//!   reference, request by request, every time.
//! - `stale_plan_reads_only_planned_pages`: a plan used with seqlens grown and shrunk since
//!   planning gives, for each request, attention over the rows of the pages the plan assigned
//!   it, up to its current length (zeros and lse = -inf for a request the plan saw empty).
//! - `bad_block_table_entries_read_zeros`: entries -1, num_pages, 2^25 and i32::MAX read as a
//!   page of zeros, never as another page.
use cust::memory::{CopyDestination, DeviceBuffer};
use etap::driver::{Graph, RawStream};
use etap::gpu::decoder_or_skip;
use etap::{Bf16, DecodeShape, Decoder, Element, Layout, Plan, RawBuffers};
use etap_core::{tiles_of, TILE_ROWS};
use etap_tests::{Case, CaseSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Both kernel layouts with the shape each is built for.
const CONFIGS: [(Layout, usize, usize); 2] = [(Layout::KvOnM, 1, 16), (Layout::HeadsOnM, 2, 32)];

/// Device copies of one layer's inputs and outputs.
struct Layer {
    q: DeviceBuffer<Bf16>,
    kv: DeviceBuffer<Bf16>,
    out: DeviceBuffer<Bf16>,
    lse: DeviceBuffer<f32>,
}

impl Layer {
    fn new(shape: &DecodeShape, cache: &[Bf16]) -> Layer {
        Layer {
            q: DeviceBuffer::from_slice(&vec![Bf16::from_f32(0.5); shape.q_len()]).unwrap(),
            kv: DeviceBuffer::from_slice(cache).unwrap(),
            out: DeviceBuffer::from_slice(&vec![Bf16::nan(); shape.out_len()]).unwrap(),
            lse: DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()]).unwrap(),
        }
    }

    /// The raw call's buffers, with the block table and seqlens at `bt` and `sl`.
    fn raw(&self, bt: u64, sl: u64) -> RawBuffers {
        RawBuffers {
            q: self.q.as_device_ptr().as_raw(),
            kv_cache: self.kv.as_device_ptr().as_raw(),
            block_table: bt,
            cache_seqlens: sl,
            out: self.out.as_device_ptr().as_raw(),
            lse: self.lse.as_device_ptr().as_raw(),
            q_offsets: 0,
        }
    }

    /// One eager decode of this layer with `plan` (default softmax scale) on `stream`.
    fn decode(&self, dec: &Decoder, plan: &Plan, bt: &DeviceBuffer<i32>, sl: &DeviceBuffer<i32>, stream: &RawStream) {
        let bufs = self.raw(bt.as_device_ptr().as_raw(), sl.as_device_ptr().as_raw());
        // SAFETY: the layer's, the table's and the seqlens' buffers are live allocations of the
        // plan's shape in this context; the callers synchronize the stream before they drop.
        unsafe { dec.decode_raw(plan, etap::Dtype::Bf16, bufs, None, stream.raw()) }.unwrap();
    }

    fn poison(&mut self, shape: &DecodeShape) {
        self.out.copy_from(&vec![Bf16::nan(); shape.out_len()][..]).unwrap();
        self.lse.copy_from(&vec![f32::NAN; shape.lse_len()][..]).unwrap();
    }

    fn fetch(&self, shape: &DecodeShape) -> (Vec<f32>, Vec<f32>) {
        let mut o = vec![Bf16::default(); shape.out_len()];
        let mut l = vec![0f32; shape.lse_len()];
        self.out.copy_to(&mut o[..]).unwrap();
        self.lse.copy_to(&mut l[..]).unwrap();
        (o.iter().map(|x| x.to_f32()).collect(), l)
    }
}

/// Compare every (request, token) row of `got` with `case`'s reference on its own (its own
/// norm, bf16's bound) and lse within 1e-4, and check every row for being written and finite
/// (zeros and -inf exactly where the token sees no row): `etap::check`, as gpu_decode.
fn check_requests(case: &Case<Bf16>, got: &(Vec<f32>, Vec<f32>), what: &str) {
    let shape = case.shape;
    let (ro, rl) = case.reference();
    let (per_out, per_lse) = (shape.cols() * shape.d_v, shape.cols());
    let refs: Vec<(usize, &[f32], &[f32])> = (0..shape.batch)
        .map(|r| (r, &ro[r * per_out..][..per_out], &rl[r * per_lse..][..per_lse]))
        .collect();
    let outcome = etap::check::compare(
        etap::Dtype::Bf16,
        shape.s_q,
        shape.h_q,
        &case.seqlens,
        &got.0,
        &got.1,
        &refs,
    );
    if let Some(why) = outcome.failure() {
        panic!("{what}: {why} (seqlens {:?})", case.seqlens);
    }
}

/// `base` with new seqlens (each at most base's) and new q: the cache rows past each new seqlen
/// become NaN, as the cache of a batch whose requests are that long.
fn step_case(base: &Case<Bf16>, seqlens: &[i32], rng: &mut StdRng) -> Case<Bf16> {
    let mut c = Case {
        shape: base.shape,
        q: (0..base.shape.q_len())
            .map(|_| Bf16::from_f32(rng.gen_range(-2.0f32..2.0)))
            .collect(),
        cache: base.cache.clone(),
        block_table: base.block_table.clone(),
        seqlens: seqlens.to_vec(),
        softmax_scale: base.softmax_scale,
        seed: base.seed,
    };
    let (mp, d) = (base.shape.max_pages, base.shape.d_qk);
    for (r, &s) in seqlens.iter().enumerate() {
        let old = base.seqlens[r].max(0) as usize;
        for row in s.max(0) as usize..old {
            let page = c.block_table[r * mp + row / TILE_ROWS] as usize;
            let at = (page * TILE_ROWS + row % TILE_ROWS) * d;
            c.cache[at..at + d].fill(Bf16::nan());
        }
    }
    c
}

#[test]
fn graph_replays_match_reference() {
    let Some(dec) = decoder_or_skip("graph_replays_match_reference") else {
        return;
    };
    for (layout, s_q, h_q) in CONFIGS {
        // Longest lengths; each step uses lengths up to these.
        let max = [9000, 2100, 700, 130];
        let base0 = Case::<Bf16>::from_spec(&CaseSpec::new(s_q, h_q, &max, 11));
        // The second layer: the same table and poison, another cache (negated).
        let base1 = Case {
            cache: base0.cache.iter().map(|x| Bf16::from_f32(-x.to_f32())).collect(),
            ..base0.clone()
        };
        let shape = base0.shape;
        let stream = RawStream::non_blocking().unwrap();
        let bt = DeviceBuffer::from_slice(&base0.block_table).unwrap();
        let mut sl = DeviceBuffer::from_slice(&max).unwrap();
        let (bt_addr, sl_addr) = (bt.as_device_ptr().as_raw(), sl.as_device_ptr().as_raw());
        let mut layers = [Layer::new(&shape, &base0.cache), Layer::new(&shape, &base1.cache)];
        // SAFETY (every raw call below): the buffers live until the end of this test, past the
        // last launch (the stream is synchronized before each read and at the end); their
        // lengths are the shape's, they are aligned (fresh allocations) and of this context.
        let mut plan: Plan = unsafe { dec.plan_raw(&shape, sl_addr, stream.raw(), Some(layout)) }.unwrap();
        let scale = Some(base0.softmax_scale);
        let step = |dec: &Decoder, plan: &mut Plan, layers: &[Layer; 2]| -> etap::Result<()> {
            unsafe {
                dec.replan_raw(plan, sl_addr, stream.raw())?;
                for l in layers {
                    dec.decode_raw(plan, etap::Dtype::Bf16, l.raw(bt_addr, sl_addr), scale, stream.raw())?;
                }
            }
            Ok(())
        };
        let graph = unsafe { Graph::capture(stream.raw(), || step(&dec, &mut plan, &layers)) }.unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for it in 0..12 {
            // New lengths: the long request varies most (its split count changes every step),
            // one request is sometimes empty.
            let seqlens = [
                rng.gen_range(4000..=max[0]),
                rng.gen_range(1..=max[1]),
                if it % 4 == 3 { 0 } else { rng.gen_range(1..=max[2]) },
                rng.gen_range(1..=max[3]),
            ];
            let cases = [
                step_case(&base0, &seqlens, &mut rng),
                step_case(&base1, &seqlens, &mut rng),
            ];
            stream.synchronize().unwrap();
            sl.copy_from(&seqlens[..]).unwrap();
            for (l, c) in layers.iter_mut().zip(&cases) {
                l.q.copy_from(&c.q[..]).unwrap();
                l.kv.copy_from(&c.cache[..]).unwrap();
                l.poison(&shape);
            }
            let eager = it % 3 == 2;
            if eager {
                step(&dec, &mut plan, &layers).unwrap();
            } else {
                unsafe { graph.launch(stream.raw()) }.unwrap();
            }
            stream.synchronize().unwrap();
            for (k, (l, c)) in layers.iter().zip(&cases).enumerate() {
                let what = format!(
                    "{layout:?} s_q={s_q} h_q={h_q} {} {it} layer {k} seqlens {seqlens:?}",
                    if eager { "eager call" } else { "replay" }
                );
                check_requests(c, &l.fetch(&shape), &what);
            }
        }
    }
}

/// The pages of request `r` that `plan`'s ranges assign it, clamped to `pages` now: the
/// kernels read a prefix `0..cover` of them (none when the plan gave it no split).
fn covered_pages(plan: &Plan, offsets: &[u32], r: usize, pages: u32) -> u32 {
    if offsets[r + 1] == offsets[r] {
        return 0;
    }
    let mut segs: Vec<(u32, u32)> = plan
        .ranges()
        .unwrap()
        .iter()
        .filter(|w| w.empty == 0 && w.begin_req as usize <= r && r <= w.end_req as usize)
        .map(|w| w.segment(r as u32, pages))
        .filter(|(lo, hi)| lo < hi)
        .collect();
    segs.sort();
    let mut cover = 0;
    for (lo, hi) in segs {
        assert_eq!(lo, cover, "request {r}: the plan's pages are not one prefix");
        cover = hi;
    }
    cover
}

#[test]
fn stale_plan_reads_only_planned_pages() {
    let Some(dec) = decoder_or_skip("stale_plan_reads_only_planned_pages") else {
        return;
    };
    for (layout, _, h_q) in CONFIGS {
        // s_q = 1: every row a request has is visible, so the result is the reference over the
        // rows read.
        let planned = [5000, 3000, 64, 1000, 0];
        let max = [6000, 6000, 800, 2000, 900];
        let base = Case::<Bf16>::from_spec(&CaseSpec::new(1, h_q, &max, 21));
        let shape = base.shape;
        let stream = RawStream::non_blocking().unwrap();
        let bt = DeviceBuffer::from_slice(&base.block_table).unwrap();
        let mut sl = DeviceBuffer::from_slice(&planned).unwrap();
        let mut layer = Layer::new(&shape, &base.cache);
        // SAFETY: as in graph_replays_match_reference.
        let plan = unsafe { dec.plan_raw(&shape, sl.as_device_ptr().as_raw(), stream.raw(), Some(layout)) }.unwrap();
        // The plan's host copies read the device after the stream has run the scheduler.
        stream.synchronize().unwrap();
        let offsets = plan.split_offsets().unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        for now in [
            [200, 6000, 0, 1000, 900], // shrunk, grown, shrunk to nothing, the same, planned empty
            [5000, 3000, 800, 2000, 1],
            [1, 1, 1, 1, 1],
        ] {
            let case = step_case(&base, &now, &mut rng);
            stream.synchronize().unwrap();
            sl.copy_from(&now[..]).unwrap();
            layer.q.copy_from(&case.q[..]).unwrap();
            layer.kv.copy_from(&case.cache[..]).unwrap();
            layer.poison(&shape);
            layer.decode(&dec, &plan, &bt, &sl, &stream);
            stream.synchronize().unwrap();
            // The documented result: request r over its first min(seqlen, covered pages * 64)
            // rows; a request the plan saw empty is written empty.
            let read: Vec<i32> = (0..shape.batch)
                .map(|r| {
                    let pages = tiles_of(now[r], shape.max_pages as u32);
                    let cover = covered_pages(&plan, &offsets, r, pages);
                    now[r].min((cover as usize * TILE_ROWS) as i32)
                })
                .collect();
            let expect = step_case(&case, &read, &mut StdRng::seed_from_u64(0));
            let expect = Case {
                q: case.q.clone(),
                ..expect
            };
            check_requests(
                &expect,
                &layer.fetch(&shape),
                &format!("{layout:?} stale plan, seqlens {now:?}"),
            );
        }
    }
}

#[test]
fn bad_block_table_entries_read_zeros() {
    let Some(dec) = decoder_or_skip("bad_block_table_entries_read_zeros") else {
        return;
    };
    for (layout, s_q, h_q) in CONFIGS {
        let case = Case::<Bf16>::from_spec(&CaseSpec::new(s_q, h_q, &[700, 300], 31));
        let shape = case.shape;
        let mp = shape.max_pages;
        // Used slots: request 0 has 11 pages, request 1 has 5.
        let bad = [
            (0, 2, -1),
            (0, 5, shape.num_pages as i32),
            (1, 1, 1 << 25),
            (1, 3, i32::MAX),
        ];
        let mut table = case.block_table.clone();
        for &(r, slot, v) in &bad {
            table[r * mp + slot] = v;
        }
        let stream = RawStream::non_blocking().unwrap();
        let bt = DeviceBuffer::from_slice(&table).unwrap();
        let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
        let mut layer = Layer::new(&shape, &case.cache);
        layer.q.copy_from(&case.q[..]).unwrap();
        layer.poison(&shape);
        // SAFETY: as in graph_replays_match_reference.
        unsafe {
            let plan = dec
                .plan_raw(&shape, sl.as_device_ptr().as_raw(), stream.raw(), Some(layout))
                .unwrap();
            layer.decode(&dec, &plan, &bt, &sl, &stream);
            stream.synchronize().unwrap();
        }
        // The documented result: those pages' rows are zeros. The reference reads them from a
        // page of zeros appended to the cache.
        let zero_page = shape.num_pages;
        let mut expect = Case {
            shape: DecodeShape::new(shape.batch, s_q, h_q, shape.num_pages + 1, mp),
            cache: case.cache.clone(),
            block_table: case.block_table.clone(),
            q: case.q.clone(),
            seqlens: case.seqlens.clone(),
            softmax_scale: case.softmax_scale,
            seed: case.seed,
        };
        expect.cache.extend(vec![Bf16::from_f32(0.0); TILE_ROWS * shape.d_qk]);
        for &(r, slot, _) in &bad {
            expect.block_table[r * mp + slot] = zero_page as i32;
        }
        check_requests(
            &expect,
            &layer.fetch(&shape),
            &format!("{layout:?} bad block-table entries"),
        );
    }
}
