"""etap.quant and the FP8 reference in torch, on the CPU (any device torch has; skip without
torch, fail with ETAP_REQUIRE_GPU=1): the quantizers byte for byte equal to etap's Rust ones
(``etap._etap``, the library's reference and the kernel's tests) and, for FlashMLA's format, to a
straight re-implementation of FlashMLA's quantizer (its ``tests/quant.py``, V32 layout); the
dequantizers equal to Rust's and within e4m3's rounding of the input; torch's e4m3 cast equal to
etap's; the FP8 reference the bf16 one over the dequantized cache."""

import ctypes
import math

import pytest

from etap import _etap, quant
from etap.reference import dequantize_cache, make_inputs, mla_decode_fp8_reference, mla_decode_reference

STRIDE = 65 * 656


def raw(torch, t):
    """The bytes of a tensor's elements, in row-major order."""
    c = t.detach().cpu().contiguous().view(torch.uint8).clone()
    return ctypes.string_at(c.data_ptr(), c.numel())


def storage_bytes(t):
    """Every byte of a tensor's allocation (a CPU tensor)."""
    st = t.untyped_storage()
    return ctypes.string_at(st.data_ptr(), st.nbytes())


def from_bytes(torch, b, dtype, shape):
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dtype).view(shape)


def same_bf16(torch, a, b):
    """bf16 tensors equal bit for bit, NaN matching NaN (its payload aside)."""
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int16), b[~nb].view(torch.int16))


def edge_cache(torch, pages=3, seed=0, nan=True):
    """A bf16 cache [pages, 64, 1, 576] of FlashMLA-style values (randn / 10) with edge tokens:
    zero tiles, tiles under the 1e-4 margin, amax / 448 exactly a power of two and just above
    one, values near bf16's largest, negative zeros, and (with `nan`) NaN values and NaN tokens."""
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(pages, 64, 1, 576, generator=g) / 10).to(torch.bfloat16)
    t = k.view(pages * 64, 576)
    t[1, :128] = 0
    t[2, 128:256] = (torch.randn(128, generator=g) * 1e-6).to(torch.bfloat16)
    t[3, 256] = 448 * 4.0  # amax / 448 = 4: scale 4
    t[4, 384] = -450.0  # just above 448: scale 2
    t[5, 0] = 448 * 2.0**-20
    t[5, 1:128] = 0
    t[6, :512] = ((torch.rand(512, generator=g) * 2 - 1) * 3e38).to(torch.bfloat16)
    t[7, 100:110] = -0.0
    t[8, :] = 2.0**-20  # tiny values, at the margin's scale
    t[9, 128:256] = 224.0  # amax / 448 = 1/2: exactly
    if nan:
        t[10, 5] = float("nan")
        t[11, 300] = float("nan")
        t[12, 600 - 64 :] = float("nan")  # RoPE NaN
        t[-1] = float("nan")  # a poisoned token
        if pages > 1:
            t[64 + 13] = float("nan")
    return k


def flashmla_quantize_v32(torch, k_cache):
    """FlashMLA's quantizer (tests/quant.py, ``quantize_k_cache`` with the V32 layout), written
    anew from its definition: per 128-value tile the float32 scale 2^ceil(log2(clamp_min(
    amax / 448, 1e-4))) (torch.pow, torch's max: NaN propagates), each value cast to e4m3 after a
    float32 division by it; the RoPE part's bf16 bits; a [nb, bs + 1, 656] allocation of which
    the first bs slots of each page are returned as [nb, bs, 1, 656]."""
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    src = k_cache.squeeze(2)
    whole = torch.empty((nb, bs + 1, 656), dtype=torch.float8_e4m3fn)
    tokens = whole[:, :bs, :]
    scales = tokens[..., 512:528].view(torch.float32)
    tokens[..., 528:].view(torch.bfloat16).copy_(src[..., 512:])
    for tile in range(4):
        cols = slice(128 * tile, 128 * (tile + 1))
        inv = src[..., cols].abs().max(dim=-1).values.float() / 448.0
        inv = torch.pow(2, inv.clamp_min(1e-4).log2().ceil()).float()
        scales[..., tile] = inv
        tokens[..., cols] = (src[..., cols].float() / inv.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return tokens.view(nb, bs, 1, 656)


def test_torch_e4m3_cast_is_etaps_within_464(torch_any):
    """torch's .to(float8_e4m3fn), which the quantizers use, is etap's e4m3_from_f32 on every
    e4m3 value, every midpoint, their neighbours and random values, within +-464 (beyond, and for
    NaN, the quantizers set NaN themselves: torch's cast saturates since some version)."""
    torch = torch_any
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    vals = codes[~torch.isnan(codes)].unique()  # sorted
    mids = (vals[1:] + vals[:-1]) / 2
    g = torch.Generator().manual_seed(3)
    x = torch.cat([
        vals, mids, torch.nextafter(mids, torch.full_like(mids, math.inf)),
        torch.nextafter(mids, torch.full_like(mids, -math.inf)), torch.randn(20000, generator=g) * 100,
        torch.randn(20000, generator=g) / 100, torch.rand(2000, generator=g) * 40 + 440,
        torch.tensor([0.0, -0.0, 464.0, -464.0, 463.99, -463.99]),
    ]).float()
    x = x[x.abs() <= 464]
    assert x.numel() > 40000
    ours = raw(torch, x.to(torch.float8_e4m3fn))
    assert ours == _etap.e4m3_from_f32(raw(torch, x))


def test_656_quantizer_is_etaps_byte_for_byte(torch_any):
    """etap.quant.quantize_fp8_656 against the Rust quantizer, on every byte of the allocation
    (the 65th slot of each page included), NaN tokens and NaN values included; the result as
    FlashMLA's quantizer returns it: [nb, 64, 1, 656] float8_e4m3fn, pages 65 slots apart."""
    torch = torch_any
    for pages, seed in ((3, 0), (1, 1), (5, 2)):
        k = edge_cache(torch, pages, seed)
        q8 = quant.quantize_fp8_656(k)
        assert q8.dtype == torch.float8_e4m3fn and q8.shape == (pages, 64, 1, 656)
        assert q8.stride() == (STRIDE, 656, 656, 1) and q8.storage_offset() == 0
        assert q8.untyped_storage().nbytes() == pages * STRIDE
        ours = storage_bytes(q8)
        assert ours == _etap.quantize_fp8_656(raw(torch, k), pages)
    # A cache made by make_inputs (NaN past each request's length and in unused pages).
    _, k, _, _ = make_inputs(3, 1, 16, 0, device="cpu", seed=5, lens=[1, 700, 64])
    assert torch.isnan(k).any()
    assert storage_bytes(quant.quantize_fp8_656(k)) == _etap.quantize_fp8_656(raw(torch, k), k.shape[0])


def test_656_quantizer_is_flashmlas_on_tiles_without_nan(torch_any):
    torch = torch_any
    for pages, seed in ((3, 0), (2, 7)):
        k = edge_cache(torch, pages, seed, nan=False)
        ours = quant.quantize_fp8_656(k)
        theirs = flashmla_quantize_v32(torch, k)
        assert theirs.shape == ours.shape and theirs.stride() == ours.stride()
        assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
    # Also FlashMLA's page sizes other than etap's 64 (the layout: bs + 1 slots a page).
    k = (torch.randn(2, 16, 1, 576) / 10).to(torch.bfloat16)
    ours = quant.quantize_fp8_656(k)
    assert ours.stride() == (17 * 656, 656, 656, 1)
    assert torch.equal(ours.view(torch.uint8), flashmla_quantize_v32(torch, k).view(torch.uint8))


def test_656_quantizer_and_flashmlas_differ_only_on_tiles_with_nan(torch_any):
    """A tile holding a NaN: FlashMLA's scale is NaN and so is every value of the tile; etap's
    scale is its other values' and only the NaN stays NaN. A NaN token is NaN in both."""
    torch = torch_any
    k = edge_cache(torch, 2, 4)
    ours = quant.dequantize_fp8_656(quant.quantize_fp8_656(k)).view(-1, 576)
    theirs = quant.dequantize_fp8_656(flashmla_quantize_v32(torch, k)).view(-1, 576)
    src = k.view(-1, 576)
    tiles = torch.isnan(src[:, :512]).view(-1, 4, 128).any(-1)  # [tokens, 4]: tiles holding a NaN
    ours_t, theirs_t = ours[:, :512].view(-1, 4, 128), theirs[:, :512].view(-1, 4, 128)
    assert tiles.any() and (~tiles).any()
    assert torch.isnan(theirs_t[tiles]).all()
    assert torch.equal(torch.isnan(ours_t), torch.isnan(src[:, :512].view(-1, 4, 128)))
    assert same_bf16(torch, ours_t[~tiles], theirs_t[~tiles])
    assert same_bf16(torch, ours[:, 512:], theirs[:, 512:])
    nan_tokens = torch.isnan(src).all(-1)
    assert nan_tokens.sum() == 2 and torch.isnan(ours[nan_tokens]).all() and torch.isnan(theirs[nan_tokens]).all()


def test_656_dequantizer(torch_any):
    """Rust's dequantizer bit for bit (NaN for NaN); the RoPE part as given; the latent part
    within e4m3's rounding: |x - y| <= max(|x| / 16, scale / 1024); any strides and uint8."""
    torch = torch_any
    k = edge_cache(torch, 3, 9)
    q8 = quant.quantize_fp8_656(k)
    back = quant.dequantize_fp8_656(q8)
    assert back.dtype == torch.bfloat16 and back.shape == (3, 64, 1, 576) and back.is_contiguous()
    rust = from_bytes(torch, _etap.dequantize_fp8_656(storage_bytes(q8), 3), torch.bfloat16, (3, 64, 1, 576))
    assert same_bf16(torch, back, rust)
    assert same_bf16(torch, quant.dequantize_fp8_656(q8.view(torch.uint8)), back)
    assert same_bf16(torch, quant.dequantize_fp8_656(q8.contiguous()), back)
    x, y = k.view(-1, 576).float(), back.view(-1, 576).float()
    assert torch.equal(torch.isnan(x), torch.isnan(y))
    assert same_bf16(torch, back.view(-1, 576)[:, 512:], k.view(-1, 576)[:, 512:])
    scales = q8.view(torch.uint8).squeeze(2)[..., 512:528].contiguous().view(torch.float32).reshape(-1, 4)
    bound = torch.maximum(x[:, :512].abs() / 16, scales.repeat_interleave(128, dim=1) / 1024)
    ok = ((x[:, :512] - y[:, :512]).abs() <= bound) | torch.isnan(x[:, :512])
    assert ok.all()
    # The scales: powers of two, at or above amax / 448, at most twice it (above the margin).
    amax = torch.nan_to_num(x[:, :512].abs(), nan=0.0).view(-1, 4, 128).amax(-1)
    assert torch.equal(torch.frexp(scales).mantissa, torch.full_like(scales, 0.5))
    assert (scales >= amax / 448).all()
    big = amax / 448 > 1e-4
    assert (scales[big] < 2 * amax[big] / 448).all()
    assert (scales[~big] == 2.0**-13).all()


def test_per_tensor_quantizer_is_etaps(torch_any):
    torch = torch_any
    _, k, _, _ = make_inputs(3, 1, 16, 0, device="cpu", seed=6, lens=[1, 700, 64])
    k = k.clone()
    k.view(-1)[17] = -3.3  # the largest magnitude: amax / 448 is no power of two
    assert torch.isnan(k).any()
    s = quant.per_tensor_scale(k)
    assert isinstance(s, float) and s == _etap.per_tensor_scale(raw(torch, k))
    amax = torch.tensor(3.3, dtype=torch.bfloat16).item()  # the bf16 nearest 3.3
    assert s == torch.tensor(amax / 448, dtype=torch.float32).item()
    assert math.frexp(s)[0] != 0.5, "the scale must not be a power of two here (the division's rounding matters)"
    e = quant.quantize_e4m3_per_tensor(k, s)
    assert e.dtype == torch.float8_e4m3fn and e.shape == k.shape and e.is_contiguous()
    assert raw(torch, e) == _etap.quantize_e4m3_per_tensor(raw(torch, k), s)
    back = quant.dequantize_e4m3_per_tensor(e, s)
    assert back.dtype == torch.bfloat16 and back.shape == k.shape
    rust = from_bytes(torch, _etap.dequantize_e4m3_per_tensor(raw(torch, e), s), torch.bfloat16, tuple(k.shape))
    assert same_bf16(torch, back, rust)
    assert same_bf16(torch, quant.dequantize_e4m3_per_tensor(e.view(torch.uint8), s), back)
    x, y = k.float(), back.float()
    assert torch.equal(torch.isnan(x), torch.isnan(y))
    fin = ~torch.isnan(x)
    assert ((x - y).abs()[fin] <= x.abs()[fin] * (2.0**-4 + 2.0**-8) + s / 1024).all()
    assert y[fin].abs().max() <= 448 * s * (1 + 2.0**-8)
    # Other scales, also powers of two and ones that clip (values past 464 * s become NaN).
    for scale in (1.0, 0.001, 2.0**-7, 1 / 3):
        assert raw(torch, quant.quantize_e4m3_per_tensor(k, scale)) == _etap.quantize_e4m3_per_tensor(raw(torch, k),
                                                                                                      scale)
    assert quant.per_tensor_scale(torch.zeros(4, 64, 1, 576, dtype=torch.bfloat16)) == 1.0
    assert quant.per_tensor_scale(torch.full((3,), float("nan"), dtype=torch.bfloat16)) == 1.0


def test_per_tensor_quantizer_divides(torch_any):
    """x / scale is a float32 division, not x * (1 / scale): 10.9375 / 7 is 1.5625 exactly, the
    midpoint from 1.5 (0x3C, even) to 1.625 (0x3D), so it rounds to 1.5; 10.9375 * f32(1 / 7)
    rounds to just above 1.5625, hence to 1.625."""
    torch = torch_any
    x = torch.tensor([10.9375, -10.9375, 10.9375 * 4, 10.9375 / 64], dtype=torch.bfloat16)
    e = quant.quantize_e4m3_per_tensor(x, 7.0)
    assert e.view(torch.uint8).tolist() == [0x3C, 0xBC, 0x4C, 0x0C]
    assert raw(torch, e) == _etap.quantize_e4m3_per_tensor(raw(torch, x), 7.0)
    recip = (x.float() * torch.tensor(1 / 7, dtype=torch.float32)).to(torch.float8_e4m3fn)
    assert recip.view(torch.uint8).tolist()[0] == 0x3D  # what a multiplication would give


def test_quantizer_argument_errors(torch_any):
    torch = torch_any
    k = torch.zeros(2, 64, 1, 576, dtype=torch.bfloat16)
    for f in (quant.quantize_fp8_656, quant.per_tensor_scale, lambda t: quant.quantize_e4m3_per_tensor(t, 1.0)):
        with pytest.raises(TypeError, match=r"k_cache: dtype must be torch.bfloat16 \(the cache to quantize\), got "
                                            r"torch.float16"):
            f(k.half())
        with pytest.raises(TypeError, match="k_cache: expected a torch.Tensor, got list"):
            f([1.0])
    for bad in (torch.zeros(2, 64, 576, dtype=torch.bfloat16), torch.zeros(2, 64, 2, 576, dtype=torch.bfloat16),
                torch.zeros(2, 64, 1, 512, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match=r"k_cache: expected \[num_blocks, page_block_size, 1, 576\]"):
            quant.quantize_fp8_656(bad)
    q8 = quant.quantize_fp8_656(k)
    with pytest.raises(ValueError, match=r"k_cache: expected \[num_blocks, page_block_size, 1, 656\]"):
        quant.dequantize_fp8_656(q8.squeeze(2))
    for f in (quant.dequantize_fp8_656, lambda t: quant.dequantize_e4m3_per_tensor(t, 1.0)):
        with pytest.raises(TypeError, match=r"k_cache: dtype must be torch.float8_e4m3fn or torch.uint8 \(an FP8 "
                                            r"cache\), got torch.bfloat16"):
            f(k)
    for bad in (0.0, -1.0, math.nan, math.inf, 1e39, 1e-50):
        with pytest.raises(ValueError, match="scale: .* must be finite and positive"):
            quant.quantize_e4m3_per_tensor(k, bad)
        with pytest.raises(ValueError, match="scale: .* must be finite and positive"):
            quant.dequantize_e4m3_per_tensor(q8, bad)
    for bad in ("1", True, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="scale: expected a float"):
            quant.quantize_e4m3_per_tensor(k, bad)


def test_fp8_reference_is_the_reference_over_the_dequantized_cache(torch_any):
    """mla_decode_fp8_reference: exactly mla_decode_reference over the exactly dequantized cache
    (both formats; the per-tensor values in float64, of which dequantize_cache's default bf16 is
    the rounding); and near the reference over the unquantized cache (what quantization costs: a
    loose bound, the reference's sanity, not the kernel's)."""
    torch = torch_any
    lens = [0, 1, 65, 700]
    q, k, bt, sl = make_inputs(len(lens), 2, 8, 0, device="cpu", seed=8, lens=lens)
    s = quant.per_tensor_scale(k)
    caches = ((quant.quantize_fp8_656(k), None), (quant.quantize_e4m3_per_tensor(k, s), s))
    ro, rl = mla_decode_reference(q, k, bt, sl, softmax_scale=0.1)
    for cache, scale in caches:
        for empty_lse in ("+inf", "-inf"):
            fo, fl = mla_decode_fp8_reference(q, cache, bt, sl, scale, softmax_scale=0.1, empty_lse=empty_lse)
            exact = dequantize_cache(cache, scale, exact=True)
            rounded, bf16 = exact.to(torch.bfloat16), dequantize_cache(cache, scale)
            assert ((rounded == bf16) | (rounded.isnan() & bf16.isnan())).all()  # NaN: the poisoned rows
            eo, el = mla_decode_reference(q, exact, bt, sl, softmax_scale=0.1, empty_lse=empty_lse)
            assert torch.equal(fo, eo) and torch.equal(fl, el)
        fo, fl = mla_decode_fp8_reference(q, cache, bt, sl, scale, softmax_scale=0.1)
        assert not torch.isnan(fo).any() and torch.equal(torch.isinf(fl), torch.isinf(rl))
        assert (fo - ro).abs().max() < 0.02, (fo - ro).abs().max()
        fin = torch.isfinite(rl)
        assert (fl[fin] - rl[fin]).abs().max() < 0.02
        assert (fo[0] == 0).all() and torch.isposinf(fl[0]).all()  # the empty request
    with pytest.raises(ValueError, match="kv_scale: given, but k_cache is FlashMLA's 656-byte format"):
        dequantize_cache(caches[0][0], 1.0)
    with pytest.raises(ValueError, match=r"kv_scale: needed for a per-tensor e4m3 cache \(576 bytes a token\)"):
        dequantize_cache(caches[1][0])
    with pytest.raises(ValueError, match="k_cache: an FP8 cache has 656 or 576 bytes a token, got 512"):
        dequantize_cache(caches[1][0][..., :512])
