//! etap's device code: ETAP MLA decode kernels for Hopper (sm_90a), in Rust.
//!
//! - [`device`]: our small device runtime (indices, barriers, mbarrier, TMA, wgmma).
//! - [`elem`]: the element type (bf16, fp16) as a type the kernels are generic over.
//! - [`tile`]: the named tile operations the kernels are written in (load tile,
//!   S^T = K·Q^T, column softmax, O^T += V^T·P^T, store), as ThunderKittens keeps its tile ops.
//! - [`decode`]: the decode kernels' frame (the parameter block, the shared-memory layout, the
//!   prologue, the producer and its TMA ring); [`decode::kv_on_m`] the ETAP (KV rows on M)
//!   consumer and kernels, [`decode::heads_on_m`] the heads-on-M one for requests of 32 or more
//!   (token, head) rows.
//! - [`barriers`]: the named barriers' ids, one list for both decode kernels.
//! - [`merge`]: the decode kernels' own merge of each request's splits by their lse.
//! - [`schedule`]: the one-thread kernel that runs `etap_core::schedule` on device seqlens.
//! - [`tile_gemm`]: a test kernel proving descriptors and layouts on the hardware.
#![no_std]
#![feature(abi_ptx, asm_experimental_arch)]
#![allow(clippy::missing_safety_doc)]

pub mod barriers;
pub mod decode;
pub mod device;
pub mod elem;
pub mod merge;
pub mod schedule;
pub mod tile;
pub mod tile_gemm;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    device::sync::trap()
}
