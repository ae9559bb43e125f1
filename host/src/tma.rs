//! TMA tensor maps (`CUtensorMap`), encoded on the host by the driver's
//! `cuTensorMapEncodeTiled` and handed to kernels in global memory.
//!
//! cust 0.3.2's bindings predate tensor maps, so the one driver entry point is declared here;
//! it is exported by every libcuda since CUDA 12.0 (the Hopper drivers), which cust links.
use crate::error::{EtapError, Result};
use cust::memory::{DeviceBox, DeviceCopy};
use std::ffi::c_void;

/// An encoded tensor map: 128 opaque bytes, 64-byte aligned, as the driver defines it (the
/// contract's type, which the kernels read).
pub use etap_core::contract::TensorMap;

/// A [`TensorMap`] as an element of device memory (`cust`'s buffers need their element type to
/// be `DeviceCopy`, a trait `etap-core`, with no dependencies, does not implement).
#[repr(transparent)]
#[derive(Clone, Copy, Debug)]
pub struct DeviceMap(pub TensorMap);

// SAFETY: plain bytes with no pointers the device could misuse (the global address inside is
// the device address the map describes).
unsafe impl DeviceCopy for DeviceMap {}

/// `CU_TENSOR_MAP_DATA_TYPE_UINT16`: the copy engine only moves bytes; 16-bit elements of
/// either float type travel the same.
const DATA_TYPE_U16: u32 = 1;
/// `CU_TENSOR_MAP_DATA_TYPE_UINT32`: an FP8 cache's raw rows, four bytes an element.
const DATA_TYPE_U32: u32 = 2;
/// `CU_TENSOR_MAP_INTERLEAVE_NONE`.
const INTERLEAVE_NONE: u32 = 0;
/// `CU_TENSOR_MAP_SWIZZLE_128B`: the layout the wgmma descriptors read.
const SWIZZLE_128B: u32 = 3;
/// `CU_TENSOR_MAP_SWIZZLE_NONE`.
const SWIZZLE_NONE: u32 = 0;
/// `CU_TENSOR_MAP_L2_PROMOTION_L2_256B`: fetch whole 256-byte sectors of the contiguous rows.
const L2_PROMOTION_256B: u32 = 3;
/// `CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE`: out-of-bounds elements are filled with zeros.
const OOB_FILL_ZERO: u32 = 0;

extern "C" {
    fn cuTensorMapEncodeTiled(
        tensor_map: *mut TensorMap,
        data_type: u32,
        rank: u32,
        global_address: *mut c_void,
        global_dim: *const u64,
        global_strides: *const u64,
        box_dim: *const u32,
        element_strides: *const u32,
        interleave: u32,
        swizzle: u32,
        l2_promotion: u32,
        oob_fill: u32,
    ) -> u32;
}

/// Encode a map of a row-major `[rows, cols]` matrix of 16-bit elements at device address
/// `addr`, read in boxes of `[box_rows, 64]` with the 128-byte swizzle.
pub fn encode_2d(addr: u64, rows: u64, cols: u64, box_rows: u32) -> Result<TensorMap> {
    const BOX_COLS: u32 = 64; // one 128-byte swizzle row of 16-bit elements
    if !addr.is_multiple_of(16) || !(cols * 2).is_multiple_of(16) || rows == 0 || box_rows == 0 || box_rows > 256 {
        return Err(EtapError::Device(format!(
            "tensor map of [{rows}, {cols}] at {addr:#x} with {box_rows}-row boxes is not encodable"
        )));
    }
    encode(
        addr,
        DATA_TYPE_U16,
        [cols, rows],
        cols * 2,
        [BOX_COLS, box_rows],
        SWIZZLE_128B,
    )
}

/// Encode a map of `rows` raw rows of `row_bytes` bytes (a multiple of 16, at most 1024) at
/// `addr`, read a whole row wide in boxes of `box_rows` rows, unswizzled: an FP8 cache's rows,
/// which the FP8 kernel converts itself.
pub fn encode_rows(addr: u64, rows: u64, row_bytes: u32, box_rows: u32) -> Result<TensorMap> {
    if !addr.is_multiple_of(16)
        || !row_bytes.is_multiple_of(16)
        || row_bytes > 1024
        || rows == 0
        || box_rows == 0
        || box_rows > 256
    {
        return Err(EtapError::Device(format!(
            "tensor map of {rows} rows of {row_bytes} bytes at {addr:#x} with {box_rows}-row boxes is not encodable"
        )));
    }
    let words = (row_bytes / 4) as u64;
    encode(
        addr,
        DATA_TYPE_U32,
        [words, rows],
        row_bytes as u64,
        [row_bytes / 4, box_rows],
        SWIZZLE_NONE,
    )
}

/// `cuTensorMapEncodeTiled` of a rank-2 tensor (`dims` innermost first, `row_stride` bytes).
fn encode(
    addr: u64,
    data_type: u32,
    dims: [u64; 2],
    row_stride: u64,
    boxes: [u32; 2],
    swizzle: u32,
) -> Result<TensorMap> {
    let mut map = TensorMap([0; 16]);
    let strides = [row_stride];
    let elem_strides = [1u32, 1];
    // SAFETY: every pointer is to a live local of the length the driver reads for rank 2
    // (2 dims, 1 stride, 2 box dims, 2 element strides); `map` is a 64-byte-aligned 128-byte
    // out-parameter. The function only writes `map`.
    let rc = unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            2,
            addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            INTERLEAVE_NONE,
            swizzle,
            L2_PROMOTION_256B,
            OOB_FILL_ZERO,
        )
    };
    if rc != 0 {
        return Err(EtapError::Device(format!(
            "cuTensorMapEncodeTiled failed with CUresult {rc}"
        )));
    }
    Ok(map)
}

/// A tensor map copied to device memory, where the kernels read it.
pub struct DeviceTensorMap {
    pub buf: DeviceBox<DeviceMap>,
}

impl DeviceTensorMap {
    pub fn new(addr: u64, rows: u64, cols: u64, box_rows: u32) -> Result<Self> {
        let map = encode_2d(addr, rows, cols, box_rows)?;
        Ok(DeviceTensorMap {
            buf: DeviceBox::new(&DeviceMap(map))?,
        })
    }
    /// Device address of the map.
    pub fn ptr(&self) -> u64 {
        self.buf.as_device_ptr().as_raw()
    }
}
