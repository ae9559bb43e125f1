//! A quick timing probe (ignored by default; the benchmark is `cargo xtask bench`): decode at a
//! few shapes with CUDA events, against a device-to-device copy measured in the same process.
use cust::event::{Event, EventFlags};
use cust::memory::DeviceBuffer;
use cust::stream::{Stream, StreamFlags};
use etap::gpu::decoder_or_skip;
use etap::{Bf16, DecodeShape, Element};

fn fill(n: usize, seed: u64) -> Vec<Bf16> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + 1e-3)
        })
        .collect()
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore]
fn timing_probe() {
    let Some(dec) = decoder_or_skip("timing_probe") else {
        return;
    };
    let stream = Stream::new(StreamFlags::NON_BLOCKING, None).unwrap();
    let (e0, e1) = (
        Event::new(EventFlags::DEFAULT).unwrap(),
        Event::new(EventFlags::DEFAULT).unwrap(),
    );
    // Copy roof: 1 GiB device to device, read + write bytes.
    let n = 1usize << 29;
    let a = unsafe { DeviceBuffer::<u16>::uninitialized(n).unwrap() };
    let b = unsafe { DeviceBuffer::<u16>::uninitialized(n).unwrap() };
    let mut ts = vec![];
    for i in 0..25 {
        e0.record(&stream).unwrap();
        unsafe {
            cust::sys::cuMemcpyDtoDAsync_v2(
                b.as_device_ptr().as_raw(),
                a.as_device_ptr().as_raw(),
                n * 2,
                stream.as_inner(),
            );
        }
        e1.record(&stream).unwrap();
        e1.synchronize().unwrap();
        if i >= 5 {
            ts.push(e1.elapsed_time_f32(&e0).unwrap());
        }
    }
    let copy_gbs = 2.0 * (n * 2) as f64 / (median(ts) as f64 * 1e-3) / 1e9;
    drop((a, b));
    println!("copy roof: {copy_gbs:.0} GB/s");
    let configs = std::env::var("ETAP_SHAPES").unwrap_or("16,1,16,65536;16,1,16,16384;16,1,16,4096;16,1,16,1024;16,2,16,65536;16,1,32,65536;16,1,64,65536;16,1,128,65536;64,1,16,8192;128,1,16,4096".into());
    for cfg in configs.split(';') {
        let v: Vec<usize> = cfg.split(',').map(|x| x.parse().unwrap()).collect();
        let (bsz, s_q, h_q, s_k) = (v[0], v[1], v[2], v[3]);
        let pages_per = s_k.div_ceil(64);
        let num_pages = bsz * pages_per;
        // Rotate over enough cache copies to defeat the L2 (~60 MB): at least 256 MB per cycle.
        let set_bytes = num_pages * 64 * 576 * 2;
        let sets = (256usize << 20).div_ceil(set_bytes).clamp(1, 16);
        let shape = DecodeShape::new(bsz, s_q, h_q, num_pages, pages_per);
        let q = DeviceBuffer::from_slice(&fill(shape.q_len(), 1)).unwrap();
        let base = fill(shape.cache_len(), 2);
        let kvs: Vec<_> = (0..sets).map(|_| DeviceBuffer::from_slice(&base).unwrap()).collect();
        // A shuffled table.
        let mut table: Vec<i32> = (0..num_pages as i32).collect();
        let mut x = 12345u64;
        for i in (1..table.len()).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            table.swap(i, (x >> 33) as usize % (i + 1));
        }
        let bt = DeviceBuffer::from_slice(&table).unwrap();
        let sl = DeviceBuffer::from_slice(&vec![s_k as i32; bsz]).unwrap();
        let mut out = DeviceBuffer::from_slice(&vec![Bf16::nan(); shape.out_len()]).unwrap();
        let mut lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()]).unwrap();
        let plan = dec.plan(&shape, &sl, &stream).unwrap();
        let mut ts = vec![];
        for i in 0..110 {
            let kv = &kvs[i % sets];
            e0.record(&stream).unwrap();
            dec.decode_into(&plan, &q, kv, &bt, &sl, None, &mut out, &mut lse, &stream)
                .unwrap();
            e1.record(&stream).unwrap();
            e1.synchronize().unwrap();
            if i >= 10 {
                ts.push(e1.elapsed_time_f32(&e0).unwrap());
            }
        }
        // Back to back: one event pair around 100 calls, as a serving loop (or a graph) runs them.
        e0.record(&stream).unwrap();
        for i in 0..100 {
            dec.decode_into(&plan, &q, &kvs[i % sets], &bt, &sl, None, &mut out, &mut lse, &stream)
                .unwrap();
        }
        e1.record(&stream).unwrap();
        e1.synchronize().unwrap();
        let b2b = e1.elapsed_time_f32(&e0).unwrap() as f64 * 1e3 / 100.0;
        let us = median(ts) as f64 * 1e3;
        let bytes = ((bsz * s_k * 576 + bsz * s_q * h_q * (576 + 512)) * 2) as f64;
        let gbs = bytes / (us * 1e-6) / 1e9;
        println!(
            "b={bsz:<4} s_q={s_q} h={h_q:<4} s_k={s_k:<6} {us:8.1} us {gbs:7.0} GB/s {:5.1}% of copy | back-to-back {b2b:8.1} us {:5.1}% (sets {sets})",
            100.0 * gbs / copy_gbs,
            100.0 * bytes / (b2b * 1e-6) / 1e9 / copy_gbs
        );
    }
}
