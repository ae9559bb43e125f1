//! Serving mode, the headline figure: decode as vLLM and SGLang run it. L layers (61, as
//! DeepSeek-V3), each with its own KV cache (so the L2 holds none of it), share one plan and
//! one q; all L decode calls are captured in one CUDA graph, and the figure is the median
//! replay time / L. Timed with the block table shuffled (a cache after hours of serving) and
//! contiguous (each request's pages in order), the page data the same in both.
//!
//! The re-plan is not inside the timed graph (as the peers' metadata is not): it runs once per
//! step for all layers.
use crate::BoxResult;
use cust::memory::DeviceCopy;
use cust::memory::{CopyDestination, DeviceBuffer};
use etap::driver::{Graph, RawEvent, RawStream};
use etap::{DecodeShape, Decoder, Element, KvFormat, Layout, RawBuffers};

/// Timed replays (after [`WARM_REPLAYS`]).
pub const REPLAYS: usize = 20;
pub const WARM_REPLAYS: usize = 3;

/// One serving-mode timing.
pub struct Serving {
    /// Median replay time / layers, in us.
    pub us: f64,
    /// Layers in the graph (fewer than asked when the caches do not fit in device memory).
    pub layers: usize,
    /// The last layer's output of the last replay (out as f32, lse), for the check against the
    /// per-call result.
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// The block table with each request's pages laid out in order (`r`'s slot `i` -> page
/// `first_r + i`), and the cache permuted to match, so both layouts hold the same rows.
pub fn contiguous<C: Copy>(shape: &DecodeShape, table: &[i32], seqlens: &[i32], cache: &[C]) -> (Vec<i32>, Vec<C>) {
    let mp = shape.max_pages;
    // A page's elements (or an FP8 cache's bytes, with its page stride).
    let page = cache.len() / shape.num_pages;
    let mut new_table = table.to_vec();
    let mut new_cache = cache.to_vec();
    let mut next = 0usize;
    for (r, &s) in seqlens.iter().enumerate() {
        let used = crate::gen::pages_for(s, shape.page_size);
        for slot in 0..used {
            let old = table[r * mp + slot] as usize;
            new_cache[next * page..(next + 1) * page].copy_from_slice(&cache[old * page..(old + 1) * page]);
            new_table[r * mp + slot] = next as i32;
            next += 1;
        }
    }
    (new_table, new_cache)
}

/// Time `layers` decode calls in one graph: `cache` copied into `layers` device buffers (one,
/// read by every layer, with `shared_cache`: a diagnostic of what distinct caches cost),
/// `table`/`seqlens` its block table and lengths, `q` the query.
#[allow(clippy::too_many_arguments)]
pub fn time<T: Element, C: DeviceCopy>(
    dec: &Decoder,
    shape: &DecodeShape,
    layout: Layout,
    q: &[T],
    cache: &[C],
    kv_scale: Option<f32>,
    table: &[i32],
    seqlens: &[i32],
    layers: usize,
    shared_cache: bool,
) -> BoxResult<Serving> {
    let stream = RawStream::non_blocking()?;
    // The packed query layout with every request at s_q tokens (`--packed`): the same q and
    // out; lse comes back as [b * s_q, h_q] and is returned in the uniform layout.
    let offsets = shape
        .packed_q
        .map(|_| DeviceBuffer::from_slice(&crate::packed_offsets(shape)))
        .transpose()?;
    let cache_bytes = std::mem::size_of_val(cache);
    let (free, _) = cust::memory::mem_get_info()?;
    let layers = layers.min(((free as f64 * 0.85) / cache_bytes as f64) as usize).max(1);
    let q_d = DeviceBuffer::from_slice(q)?;
    let bt = DeviceBuffer::from_slice(table)?;
    let sl = DeviceBuffer::from_slice(seqlens)?;
    let first = DeviceBuffer::from_slice(cache)?;
    let mut caches = vec![];
    let distinct = if shared_cache { 1 } else { layers };
    for _ in 1..distinct {
        // SAFETY: filled right below by a device-to-device copy of the whole buffer.
        let c = unsafe { DeviceBuffer::<C>::uninitialized(cache.len())? };
        // SAFETY: two live allocations of `cache_bytes` bytes that do not overlap.
        let rc = unsafe {
            cust::sys::cuMemcpyDtoD_v2(c.as_device_ptr().as_raw(), first.as_device_ptr().as_raw(), cache_bytes)
        };
        if rc != cust::sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuMemcpyDtoD failed: {rc:?}").into());
        }
        caches.push(c);
    }
    caches.insert(0, first);
    let out = DeviceBuffer::from_slice(&vec![T::nan(); shape.out_len()])?;
    let lse = DeviceBuffer::from_slice(&vec![f32::NAN; shape.lse_len()])?;
    let raw = |c: &DeviceBuffer<C>| RawBuffers {
        q: q_d.as_device_ptr().as_raw(),
        kv_cache: c.as_device_ptr().as_raw(),
        block_table: bt.as_device_ptr().as_raw(),
        cache_seqlens: sl.as_device_ptr().as_raw(),
        out: out.as_device_ptr().as_raw(),
        lse: lse.as_device_ptr().as_raw(),
        q_offsets: offsets.as_ref().map_or(0, |o| o.as_device_ptr().as_raw()),
    };
    // SAFETY (the raw calls): every buffer above lives until this function returns, after the
    // stream's last synchronization; lengths are the shape's, allocations aligned, one context.
    let plan = unsafe { dec.plan_raw(shape, sl.as_device_ptr().as_raw(), stream.raw(), Some(layout))? };
    // One eager call per layer first: the tensor maps are uploaded then, not in the graph.
    let all = || -> etap::Result<()> {
        for l in 0..layers {
            let bufs = raw(&caches[l % distinct]);
            if shape.kv_format == KvFormat::Elem16 {
                unsafe { dec.decode_raw(&plan, T::DTYPE, bufs, None, stream.raw())? };
            } else {
                unsafe { dec.decode_fp8_raw(&plan, T::DTYPE, bufs, kv_scale, None, stream.raw())? };
            }
        }
        Ok(())
    };
    all()?;
    stream.synchronize()?;
    let graph = unsafe { Graph::capture(stream.raw(), all)? };
    for _ in 0..WARM_REPLAYS {
        unsafe { graph.launch(stream.raw())? };
    }
    let (start, stop) = (RawEvent::new()?, RawEvent::new()?);
    let mut times = Vec::with_capacity(REPLAYS);
    for _ in 0..REPLAYS {
        start.record(&stream)?;
        unsafe { graph.launch(stream.raw())? };
        stop.record(&stream)?;
        stream.synchronize()?;
        times.push(stop.since_us(&start)? / layers as f64);
    }
    let mut o = vec![T::default(); shape.out_len()];
    let mut l = vec![0f32; shape.lse_len()];
    out.copy_to(&mut o[..])?;
    lse.copy_to(&mut l[..])?;
    Ok(Serving {
        us: crate::metrics::median(&times),
        layers,
        out: o.iter().map(|v| v.to_f32()).collect(),
        lse: crate::lse_to_uniform(shape, l),
    })
}
