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


class FakeDevice:
    def __init__(self, type_, index):
        self.type = type_
        self.index = index


_next = [0x7F0000000000]


class FakeTensor:
    def __init__(self, shape, dtype=BF16, device=("cuda", 0), strides=None, ptr=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = FakeDevice(*device)
        if strides is None:
            strides, n = [], 1
            for d in reversed(self.shape):
                strides.insert(0, n)
                n *= d
        self._strides = tuple(strides)
        if ptr is None:
            n = 1
            for d in self.shape:
                n *= d
            ptr = _next[0]
            _next[0] += (n * dtype.itemsize + 4095) // 4096 * 4096 + 4096
        self._ptr = ptr

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
