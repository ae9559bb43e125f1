//! On a GPU: bad input gets a typed error that names the argument, before any launch, and
//! nothing is written to the caller's buffers: out and lse keep a known bit pattern, byte for
//! byte, through every rejected call of `Decoder::decode_into`, `Decoder::decode` and the raw
//! entry `Decoder::decode_raw`.
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::stream::{Stream, StreamFlags};
use etap::gpu::decoder_or_skip;
use etap::{Bf16, DecodeShape, Decoder, Dtype, Element, EtapError, Plan, RawBuffers};
use etap_tests::Case;

/// A known, varied bit pattern for `n` 16-bit elements (not a single repeated value, so a
/// partial or shifted write shows too).
fn pattern16<T: Element>(n: usize, salt: u32) -> Vec<T> {
    let bits: Vec<u16> = (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(salt) >> 16) as u16)
        .collect();
    bytemuck::cast_slice::<u16, T>(&bits).to_vec()
}

/// As [`pattern16`], for f32 lse.
fn pattern32(n: usize, salt: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| f32::from_bits(i.wrapping_mul(2_246_822_519).wrapping_add(salt)))
        .collect()
}

/// A caller's out and lse, filled with the known pattern, and the pattern.
struct Outputs<T: Element> {
    out: DeviceBuffer<T>,
    lse: DeviceBuffer<f32>,
    out_bits: Vec<u8>,
    lse_bits: Vec<u8>,
}

impl<T: Element> Outputs<T> {
    fn new(out_len: usize, lse_len: usize) -> Self {
        Self::filled(pattern16::<T>(out_len, 0x1234), pattern32(lse_len, 0x9876))
    }

    /// Filled with NaN: what an unwritten value looks like to a finiteness check.
    fn nan(out_len: usize, lse_len: usize) -> Self {
        Self::filled(vec![T::nan(); out_len], vec![f32::NAN; lse_len])
    }

    fn filled(o: Vec<T>, l: Vec<f32>) -> Self {
        Outputs {
            out: DeviceBuffer::from_slice(&o).unwrap(),
            lse: DeviceBuffer::from_slice(&l).unwrap(),
            out_bits: bytemuck::cast_slice::<T, u8>(&o).to_vec(),
            lse_bits: bytemuck::cast_slice::<f32, u8>(&l).to_vec(),
        }
    }

    /// After the stream has run everything: whether out and lse still hold the pattern.
    fn unchanged(&self, stream: &Stream) -> bool {
        stream.synchronize().unwrap();
        let mut o = vec![T::default(); self.out.len()];
        let mut l = vec![0f32; self.lse.len()];
        self.out.copy_to(&mut o[..]).unwrap();
        self.lse.copy_to(&mut l[..]).unwrap();
        bytemuck::cast_slice::<T, u8>(&o) == &self.out_bits[..]
            && bytemuck::cast_slice::<f32, u8>(&l) == &self.lse_bits[..]
    }
}

/// The device inputs of a case.
struct Inputs<T: Element> {
    q: DeviceBuffer<T>,
    kv: DeviceBuffer<T>,
    bt: DeviceBuffer<i32>,
    sl: DeviceBuffer<i32>,
}

impl<T: Element> Inputs<T> {
    fn new(case: &Case<T>) -> Self {
        Inputs {
            q: DeviceBuffer::from_slice(&case.q).unwrap(),
            kv: DeviceBuffer::from_slice(&case.cache).unwrap(),
            bt: DeviceBuffer::from_slice(&case.block_table).unwrap(),
            sl: DeviceBuffer::from_slice(&case.seqlens).unwrap(),
        }
    }
}

fn is_length(e: &EtapError, want: &str) -> bool {
    matches!(e, EtapError::Length { arg, .. } if *arg == want)
}

#[test]
fn plan_rejects_bad_shapes() {
    let Some(dec) = decoder_or_skip("gpu_api plan") else {
        return;
    };
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let case = Case::<Bf16>::new(2, 16, &[300, 70], 7);
    let shape = case.shape;
    let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
    for (bad, want) in [
        (DecodeShape { h_q: 129, ..shape }, "UnsupportedHeads"),
        (DecodeShape { h_q: 0, ..shape }, "UnsupportedHeads"),
        (DecodeShape { s_q: 9, ..shape }, "UnsupportedSeqQ"),
        (shape.with_page_size(8), "UnsupportedPageSize"),
        (shape.with_page_size(256), "UnsupportedPageSize"),
        (DecodeShape { d_qk: 512, ..shape }, "HeadDim"),
        (DecodeShape { d_v: 576, ..shape }, "HeadDim"),
        (DecodeShape { batch: 0, ..shape }, "EmptyBatch"),
        (DecodeShape { num_pages: 0, ..shape }, "Zero"),
        (DecodeShape { max_pages: 0, ..shape }, "Zero"),
    ] {
        let e = dec
            .plan(&bad, &sl, &stream)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(format!("{e:?}").starts_with(want), "{bad:?}: got {e:?}, want {want}");
    }
    // Seqlens of another batch size.
    let e = dec
        .plan(&DecodeShape { batch: 3, ..shape }, &sl, &stream)
        .err()
        .expect("3 requests with 2 seqlens accepted");
    assert!(is_length(&e, "cache_seqlens"), "{e:?}");
}

/// Every rejected argument of `decode_into` (each buffer one element short and one long, a
/// softmax scale that is not finite and positive), `decode` (each input) and `decode_raw`
/// (each address off its alignment) gives a typed error naming it, and leaves the caller's out and lse bytes unchanged
/// after the stream has run. A valid call on the same buffers then does change them (so the
/// check could see a write), and its output passes `etap::check`.
#[test]
fn rejected_calls_leave_out_and_lse_unchanged() {
    let Some(dec) = decoder_or_skip("gpu_api rejected calls") else {
        return;
    };
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let case = Case::<Bf16>::new(2, 16, &[300, 70], 7);
    let shape = case.shape;
    let x = Inputs::new(&case);
    let plan = dec.plan(&shape, &x.sl, &stream).unwrap();
    stream.synchronize().unwrap();

    // decode_into: a wrong length of each buffer, one at a time.
    let resized = |v: &[Bf16], longer: bool| -> DeviceBuffer<Bf16> {
        let mut v = v.to_vec();
        if longer {
            v.push(v[0]);
        } else {
            v.pop();
        }
        DeviceBuffer::from_slice(&v).unwrap()
    };
    let resized_i32 = |v: &[i32], longer: bool| -> DeviceBuffer<i32> {
        let mut v = v.to_vec();
        if longer {
            v.push(0);
        } else {
            v.pop();
        }
        DeviceBuffer::from_slice(&v).unwrap()
    };
    for longer in [false, true] {
        let d = if longer { 1isize } else { -1 };
        let q2 = resized(&case.q, longer);
        let kv2 = resized(&case.cache, longer);
        let bt2 = resized_i32(&case.block_table, longer);
        let sl2 = resized_i32(&case.seqlens, longer);
        for (arg, q, kv, bt, sl) in [
            ("q", &q2, &x.kv, &x.bt, &x.sl),
            ("kv_cache", &x.q, &kv2, &x.bt, &x.sl),
            ("block_table", &x.q, &x.kv, &bt2, &x.sl),
            ("cache_seqlens", &x.q, &x.kv, &x.bt, &sl2),
        ] {
            let mut o = Outputs::<Bf16>::new(shape.out_len(), shape.lse_len());
            let e = dec
                .decode_into(&plan, q, kv, bt, sl, None, &mut o.out, &mut o.lse, &stream)
                .expect_err(arg);
            assert!(is_length(&e, arg), "{arg} {d:+}: got {e:?}");
            assert!(o.unchanged(&stream), "decode_into with {arg} {d:+} wrote to out/lse");
            let e = dec.decode(&plan, q, kv, bt, sl, None, &stream).expect_err(arg);
            assert!(is_length(&e, arg), "decode, {arg} {d:+}: got {e:?}");
        }
        for arg in ["out", "lse"] {
            let (out_len, lse_len) = match arg {
                "out" => ((shape.out_len() as isize + d) as usize, shape.lse_len()),
                _ => (shape.out_len(), (shape.lse_len() as isize + d) as usize),
            };
            let mut o = Outputs::<Bf16>::new(out_len, lse_len);
            let e = dec
                .decode_into(&plan, &x.q, &x.kv, &x.bt, &x.sl, None, &mut o.out, &mut o.lse, &stream)
                .expect_err(arg);
            assert!(is_length(&e, arg), "{arg} {d:+}: got {e:?}");
            assert!(o.unchanged(&stream), "decode_into with {arg} {d:+} wrote to out/lse");
        }
    }

    // softmax_scale: not finite or not positive.
    for scale in [f32::NAN, f32::INFINITY, 0.0, -1.0] {
        let mut o = Outputs::<Bf16>::new(shape.out_len(), shape.lse_len());
        let e = dec
            .decode_into(
                &plan,
                &x.q,
                &x.kv,
                &x.bt,
                &x.sl,
                Some(scale),
                &mut o.out,
                &mut o.lse,
                &stream,
            )
            .expect_err("softmax_scale");
        assert!(
            matches!(
                e,
                EtapError::Invalid {
                    arg: "softmax_scale",
                    ..
                }
            ),
            "softmax_scale {scale}: got {e:?}"
        );
        assert!(
            o.unchanged(&stream),
            "decode_into with softmax_scale {scale} wrote to out/lse"
        );
    }

    // decode_raw: each address off its alignment by 2 bytes (q and kv_cache, which need 16, also
    // by 8; out, which needs 8, also by 4).
    let mut o = Outputs::<Bf16>::new(shape.out_len(), shape.lse_len());
    let good = RawBuffers {
        q: x.q.as_device_ptr().as_raw(),
        kv_cache: x.kv.as_device_ptr().as_raw(),
        block_table: x.bt.as_device_ptr().as_raw(),
        cache_seqlens: x.sl.as_device_ptr().as_raw(),
        out: o.out.as_device_ptr().as_raw(),
        lse: o.lse.as_device_ptr().as_raw(),
        q_offsets: 0,
    };
    // `good` with the address of `arg` moved by `by` bytes.
    let shifted = |arg: &'static str, by: u64| {
        let mut b = good;
        match arg {
            "q" => b.q += by,
            "kv_cache" => b.kv_cache += by,
            "block_table" => b.block_table += by,
            "cache_seqlens" => b.cache_seqlens += by,
            "out" => b.out += by,
            "lse" => b.lse += by,
            _ => unreachable!("{arg}"),
        }
        (arg, b)
    };
    let bad = [
        shifted("q", 2),
        shifted("q", 8),
        shifted("kv_cache", 2),
        shifted("kv_cache", 8),
        shifted("out", 2),
        shifted("out", 4),
        shifted("lse", 2),
        shifted("block_table", 2),
        shifted("cache_seqlens", 2),
    ];
    for (want, bufs) in bad {
        // SAFETY: every address points into a live buffer of this test, shifted by a few
        // bytes; the call is rejected before any launch, which is what is tested. Were the
        // check broken, the launch would use live buffers shifted by 2 to 8 bytes (a
        // misaligned-address fault, a TMA encoding error, or changed out/lse bytes make the
        // test fail; it cannot pass silently).
        let e = unsafe { dec.decode_raw(&plan, Dtype::Bf16, bufs, None, stream.as_inner()) }.unwrap_err();
        assert!(
            matches!(e, EtapError::Misaligned { arg, .. } if arg == want),
            "{want} misaligned: got {e:?}"
        );
        assert!(
            o.unchanged(&stream),
            "decode_raw with {want} misaligned wrote to out/lse"
        );
    }

    // q_offsets with a uniform plan, and a packed plan without them (the buffers' lengths fit
    // both: q_offsets = r * s_q packs the uniform batch).
    let offsets = DeviceBuffer::from_slice(
        &(0..=shape.batch as i32)
            .map(|r| r * shape.s_q as i32)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let with_offsets = RawBuffers {
        q_offsets: offsets.as_device_ptr().as_raw(),
        ..good
    };
    let packed = dec
        .plan(&shape.with_packed_q(shape.batch * shape.s_q), &x.sl, &stream)
        .unwrap();
    for (what, plan, bufs) in [
        ("q_offsets with a uniform plan", &plan, with_offsets),
        ("a packed plan without q_offsets", &packed, good),
    ] {
        // SAFETY: live buffers of this test with the lengths both plans need; rejected before
        // any launch (were it not, the launch reads and writes only these buffers).
        let e = unsafe { dec.decode_raw(plan, Dtype::Bf16, bufs, None, stream.as_inner()) }.unwrap_err();
        assert!(
            matches!(e, EtapError::Invalid { arg: "q_offsets", .. }),
            "{what}: got {e:?}"
        );
        assert!(o.unchanged(&stream), "decode_raw with {what} wrote to out/lse");
    }
    let short = DeviceBuffer::from_slice(&[0i32, 2]).unwrap();
    let e = dec
        .decode_packed_into(
            &packed, &x.q, &short, &x.kv, &x.bt, &x.sl, None, &mut o.out, &mut o.lse, &stream,
        )
        .unwrap_err();
    assert!(
        matches!(e, EtapError::Length { arg: "q_offsets", .. }),
        "short q_offsets: got {e:?}"
    );
    assert!(
        o.unchanged(&stream),
        "decode_packed_into with short q_offsets wrote to out/lse"
    );

    // The control: a valid call on the same buffers writes them, correctly.
    decode_checked(&dec, &plan, &case, &x, &mut o, &stream);
    assert!(!o.unchanged(&stream), "a valid call left out/lse unchanged");
}

/// Decode `case` into `o` and check the whole output with `etap::check` against the reference.
fn decode_checked(
    dec: &Decoder,
    plan: &Plan,
    case: &Case<Bf16>,
    x: &Inputs<Bf16>,
    o: &mut Outputs<Bf16>,
    stream: &Stream,
) {
    let shape = case.shape;
    dec.decode_into(plan, &x.q, &x.kv, &x.bt, &x.sl, None, &mut o.out, &mut o.lse, stream)
        .unwrap();
    stream.synchronize().unwrap();
    let mut out = vec![Bf16::default(); shape.out_len()];
    let mut lse = vec![0f32; shape.lse_len()];
    o.out.copy_to(&mut out[..]).unwrap();
    o.lse.copy_to(&mut lse[..]).unwrap();
    let out: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
    let (ro, rl) = case.reference();
    let (per_out, per_lse) = (shape.cols() * shape.d_v, shape.cols());
    let refs: Vec<(usize, &[f32], &[f32])> = (0..shape.batch)
        .map(|r| (r, &ro[r * per_out..][..per_out], &rl[r * per_lse..][..per_lse]))
        .collect();
    let outcome = etap::check::compare(Dtype::Bf16, shape.s_q, shape.h_q, &case.seqlens, &out, &lse, &refs);
    assert!(outcome.passes(), "{:?}", outcome.failure());
}

#[test]
fn check_tables_rejects_bad_tables() {
    let Some(dec) = decoder_or_skip("gpu_api check_tables") else {
        return;
    };
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let case = Case::<Bf16>::new(2, 16, &[300, 70], 7);
    let shape = case.shape;
    let x = Inputs::new(&case);
    let plan = dec.plan(&shape, &x.sl, &stream).unwrap();

    // A block-table entry outside the cache, a seqlen past the table, a negative seqlen,
    // tables of the wrong length.
    let mut table = case.block_table.clone();
    table[1] = shape.num_pages as i32 + 5; // request 0 uses slots 0..5 (300 rows)
    let bad_bt = DeviceBuffer::from_slice(&table).unwrap();
    let e = dec.check_tables(&shape, &bad_bt, &x.sl).unwrap_err();
    assert!(
        matches!(
            e,
            EtapError::BlockTableEntry {
                request: 0,
                slot: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let long = DeviceBuffer::from_slice(&[300, (shape.max_pages * 64 + 1) as i32]).unwrap();
    let e = dec.check_tables(&shape, &x.bt, &long).unwrap_err();
    assert!(matches!(e, EtapError::SeqlenBeyondTable { request: 1, .. }), "{e:?}");
    let neg = DeviceBuffer::from_slice(&[300, -1]).unwrap();
    let e = dec.check_tables(&shape, &x.bt, &neg).unwrap_err();
    assert!(matches!(e, EtapError::NegativeSeqlen { request: 1, .. }), "{e:?}");
    let short_bt = DeviceBuffer::from_slice(&case.block_table[1..]).unwrap();
    let e = dec.check_tables(&shape, &short_bt, &x.sl).unwrap_err();
    assert!(is_length(&e, "block_table"), "{e:?}");
    let short_sl = DeviceBuffer::from_slice(&case.seqlens[1..]).unwrap();
    let e = dec.check_tables(&shape, &x.bt, &short_sl).unwrap_err();
    assert!(is_length(&e, "cache_seqlens"), "{e:?}");
    dec.check_tables(&shape, &x.bt, &x.sl).unwrap();

    // Even unchecked, a bad entry never reads out of bounds (the copy engine zero-fills rows
    // outside the cache): the launch succeeds and every row is written and finite.
    let mut o = Outputs::<Bf16>::nan(shape.out_len(), shape.lse_len());
    dec.decode_into(
        &plan, &x.q, &x.kv, &bad_bt, &x.sl, None, &mut o.out, &mut o.lse, &stream,
    )
    .unwrap();
    stream.synchronize().unwrap();
    let mut out = vec![Bf16::default(); shape.out_len()];
    let mut lse = vec![0f32; shape.lse_len()];
    o.out.copy_to(&mut out[..]).unwrap();
    o.lse.copy_to(&mut lse[..]).unwrap();
    let out: Vec<f32> = out.iter().map(|v| v.to_f32()).collect();
    etap::check::check_written(shape.s_q, shape.h_q, &case.seqlens, &out, &lse).unwrap();
}
