//! On a GPU: bad input gets a typed error before any launch, and nothing is written to the
//! caller's buffers (out and lse keep their NaN poison).
use cust::memory::{CopyDestination, DeviceBuffer};
use cust::stream::{Stream, StreamFlags};
use etap::gpu::decoder_or_skip;
use etap::{Bf16, DecodeShape, Element, EtapError};
use etap_tests::Case;

fn untouched(out: &DeviceBuffer<Bf16>, lse: &DeviceBuffer<f32>) -> bool {
    let mut o = vec![Bf16::default(); out.len()];
    let mut l = vec![0f32; lse.len()];
    out.copy_to(&mut o[..]).unwrap();
    lse.copy_to(&mut l[..]).unwrap();
    o.iter().all(|x| x.to_f32().is_nan()) && l.iter().all(|x| x.is_nan())
}

#[test]
fn bad_inputs_are_rejected_and_nothing_is_written() {
    let Some(dec) = decoder_or_skip("gpu_api") else { return };
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let case = Case::<Bf16>::new(2, 16, &[300, 70], 7);
    let shape = case.shape;
    let q = DeviceBuffer::from_slice(&case.q).unwrap();
    let kv = DeviceBuffer::from_slice(&case.cache).unwrap();
    let bt = DeviceBuffer::from_slice(&case.block_table).unwrap();
    let sl = DeviceBuffer::from_slice(&case.seqlens).unwrap();
    let mut out = DeviceBuffer::from_slice(&vec![Bf16::nan(); shape.out_len()]).unwrap();
    let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()]).unwrap();
    let plan = dec.plan(&shape, &sl, &stream).unwrap();

    // Unsupported heads, s_q, head dims, empty batch: rejected by plan.
    for (bad, want) in [
        (DecodeShape { h_q: 12, ..shape }, "UnsupportedHeads"),
        (DecodeShape { s_q: 5, ..shape }, "UnsupportedSeqQ"),
        (DecodeShape { d_qk: 512, ..shape }, "HeadDim"),
        (DecodeShape { d_v: 576, ..shape }, "HeadDim"),
        (DecodeShape { batch: 0, ..shape }, "EmptyBatch"),
    ] {
        let e = dec
            .plan(&bad, &sl, &stream)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(format!("{e:?}").starts_with(want), "{bad:?}: got {e:?}, want {want}");
    }

    // Wrong buffer lengths: rejected by decode_into, nothing written.
    let short_q = DeviceBuffer::from_slice(&case.q[..case.q.len() - 576]).unwrap();
    let e = dec
        .decode_into(&plan, &short_q, &kv, &bt, &sl, None, &mut out, &mut lse, &stream)
        .unwrap_err();
    assert!(matches!(e, EtapError::Length { arg: "q", .. }), "{e:?}");
    let mut short_lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len() - 1]).unwrap();
    let e = dec
        .decode_into(&plan, &q, &kv, &bt, &sl, None, &mut out, &mut short_lse, &stream)
        .unwrap_err();
    assert!(matches!(e, EtapError::Length { arg: "lse", .. }), "{e:?}");
    stream.synchronize().unwrap();
    assert!(untouched(&out, &lse), "a rejected call wrote to out/lse");

    // Misaligned raw addresses (q or out 2 bytes in): rejected by decode_raw, nothing written.
    let good = etap::RawBuffers {
        q: q.as_device_ptr().as_raw(),
        kv_cache: kv.as_device_ptr().as_raw(),
        block_table: bt.as_device_ptr().as_raw(),
        cache_seqlens: sl.as_device_ptr().as_raw(),
        out: out.as_device_ptr().as_raw(),
        lse: lse.as_device_ptr().as_raw(),
    };
    for (bufs, want) in [
        (etap::RawBuffers { q: good.q + 2, ..good }, "q"),
        (
            etap::RawBuffers {
                out: good.out + 2,
                ..good
            },
            "out",
        ),
    ] {
        // SAFETY: rejected before any launch, which is what is tested. Were the check broken,
        // the launch would use live buffers shifted by 2 bytes (a misaligned-address fault or a
        // TMA encoding error makes the test fail; it cannot pass silently).
        let e = unsafe { dec.decode_raw(&plan, etap::Dtype::Bf16, bufs, None, stream.as_inner()) }.unwrap_err();
        assert!(matches!(e, EtapError::Misaligned { arg, .. } if arg == want), "{e:?}");
    }
    stream.synchronize().unwrap();
    assert!(untouched(&out, &lse), "a rejected raw call wrote to out/lse");

    // The checked path: a block-table entry outside the cache, a seqlen past the table.
    let mut table = case.block_table.clone();
    table[1] = shape.num_pages as i32 + 5; // request 0 uses slots 0..5 (300 rows)
    let bad_bt = DeviceBuffer::from_slice(&table).unwrap();
    let e = dec.check_tables(&shape, &bad_bt, &sl).unwrap_err();
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
    let e = dec.check_tables(&shape, &bt, &long).unwrap_err();
    assert!(matches!(e, EtapError::SeqlenBeyondTable { request: 1, .. }), "{e:?}");
    let neg = DeviceBuffer::from_slice(&[300, -1]).unwrap();
    let e = dec.check_tables(&shape, &bt, &neg).unwrap_err();
    assert!(matches!(e, EtapError::NegativeSeqlen { request: 1, .. }), "{e:?}");
    dec.check_tables(&shape, &bt, &sl).unwrap();

    // Even unchecked, a bad entry never reads out of bounds (the copy engine zero-fills rows
    // outside the cache): the launch succeeds and every output is finite.
    dec.decode_into(&plan, &q, &kv, &bad_bt, &sl, None, &mut out, &mut lse, &stream)
        .unwrap();
    stream.synchronize().unwrap();
    let mut o = vec![Bf16::default(); shape.out_len()];
    out.copy_to(&mut o[..]).unwrap();
    assert!(o.iter().all(|x| x.to_f32().is_finite()));
}
