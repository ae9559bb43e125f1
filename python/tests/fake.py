"""Tensors made of attributes only, for testing the argument checks without torch or a GPU."""


class FakeDtype:
    def __init__(self, name, itemsize):
        self.name = name
        self.itemsize = itemsize

    def __str__(self):
        return self.name


BF16 = FakeDtype("torch.bfloat16", 2)
F16 = FakeDtype("torch.float16", 2)
F32 = FakeDtype("torch.float32", 4)
I32 = FakeDtype("torch.int32", 4)
I64 = FakeDtype("torch.int64", 8)
U8 = FakeDtype("torch.uint8", 1)
FP8 = FakeDtype("torch.float8_e4m3fn", 1)


class FakeDevice:
    def __init__(self, type_, index):
        self.type = type_
        self.index = index


_next = [0x7F0000000000]


class FakeStorage:
    def __init__(self, ptr, nbytes):
        self._ptr = ptr
        self._nbytes = nbytes

    def data_ptr(self):
        return self._ptr

    def nbytes(self):
        return self._nbytes


class FakeTensor:
    """`storage_nbytes`: the bytes of its allocation from its start (default: just what its
    shape and strides reach), as ``untyped_storage()`` reports them."""

    def __init__(self, shape, dtype=BF16, device=("cuda", 0), strides=None, ptr=None, storage_nbytes=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = FakeDevice(*device)
        if strides is None:
            strides, n = [], 1
            for d in reversed(self.shape):
                strides.insert(0, n)
                n *= d
        self._strides = tuple(strides)
        if storage_nbytes is None:
            reach = 0 if 0 in self.shape else 1 + sum((d - 1) * s for d, s in zip(self.shape, self._strides))
            storage_nbytes = reach * dtype.itemsize
        self._storage_nbytes = storage_nbytes
        if ptr is None:
            ptr = _next[0]
            _next[0] += (storage_nbytes + 4095) // 4096 * 4096 + 4096
        self._ptr = ptr

    def untyped_storage(self):
        return FakeStorage(self._ptr, self._storage_nbytes)

    def stride(self):
        return self._strides

    def data_ptr(self):
        return self._ptr

    def element_size(self):
        return self.dtype.itemsize

    def dim(self):
        return len(self.shape)


def decode_inputs(b=2, s_q=1, h_q=16, num_pages=8, max_pages=4, dtype=BF16, device=("cuda", 0), page_size=64):
    q = FakeTensor((b, s_q, h_q, 576), dtype, device)
    k_cache = FakeTensor((num_pages, page_size, 1, 576), dtype, device)
    block_table = FakeTensor((b, max_pages), I32, device)
    cache_seqlens = FakeTensor((b,), I32, device)
    return q, k_cache, block_table, cache_seqlens


FP8_656_PAGE_STRIDE = 65 * 656


def fp8_656_cache(num_pages=8, dtype=FP8, device=("cuda", 0), **kw):
    """FlashMLA's FP8 cache as its quantizer returns it: [num_pages, 64, 1, 656], pages 65 token
    slots apart, the allocation holding all 65 slots of every page."""
    kw.setdefault("storage_nbytes", num_pages * FP8_656_PAGE_STRIDE)
    return FakeTensor((num_pages, 64, 1, 656), dtype, device, strides=(FP8_656_PAGE_STRIDE, 656, 656, 1), **kw)


def fp8_inputs(b=2, s_q=1, h_q=16, num_pages=8, max_pages=4, kv_format="fp8_656", cache_dtype=FP8,
               device=("cuda", 0), q_dtype=BF16):
    """q (bf16 unless `q_dtype`), an FP8 cache of `kv_format` ("fp8_656" or "fp8_per_tensor"),
    block table and seqlens."""
    q = FakeTensor((b, s_q, h_q, 576), q_dtype, device)
    if kv_format == "fp8_656":
        k_cache = fp8_656_cache(num_pages, cache_dtype, device)
    else:
        k_cache = FakeTensor((num_pages, 64, 1, 576), cache_dtype, device)
    block_table = FakeTensor((b, max_pages), I32, device)
    cache_seqlens = FakeTensor((b,), I32, device)
    return q, k_cache, block_table, cache_seqlens
