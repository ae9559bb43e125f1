"""The torch custom ops (torch.ops.etap.mla_decode, and mla_decode_fp8 over FP8 caches) under
torch.compile, and a smoke run of python -m etap.bench. GPU only, but for the ops' schemas and
fake implementations (torch on any device)."""

import pytest

from etap.reference import make_inputs, max_violation, mla_decode_fp8_reference, mla_decode_reference


def test_max_violation_takes_tolerances_by_dtype(torch_any):
    """max_violation holds bf16 and fp16 outputs to their own bounds, and refuses an output of
    another dtype (float32, say: the compiled tests' doubled outputs) unless both tolerances are
    given, rather than failing on a missing table entry."""
    torch = torch_any
    ref = torch.full((2, 4), 0.5, dtype=torch.float64)
    lse, ref_lse = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)
    off = ref + 2e-3  # 2e-3 off at 0.5: within bf16's bound (8e-4 + 0.5 * 2/128), past fp16's
    assert max_violation(off.to(torch.bfloat16), lse, ref, ref_lse) <= 1.0
    assert max_violation(off.to(torch.float16), lse, ref, ref_lse) > 1.0
    with pytest.raises(ValueError, match="out: no default tolerance for float32"):
        max_violation(off.float(), lse, ref, ref_lse)
    with pytest.raises(ValueError, match="out: no default tolerance for float32"):
        max_violation(off.float(), lse, ref, ref_lse, out_atol=1e-3)
    assert max_violation(off.float(), lse, ref, ref_lse, 1e-3, 4e-3) <= 1.0
    assert max_violation(off.float(), lse, ref, ref_lse, 1e-4, 1e-3) > 1.0


def test_custom_ops_schemas_and_fake_shapes(torch_any):
    """The ops' schemas, and their fake implementations' outputs (what torch.compile traces
    with): out [b, s_q, h_q, 512] of q's dtype, lse float32 [b, h_q, s_q], whatever the cache."""
    torch = torch_any
    import etap.ops  # noqa: F401 - registers the ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    schema = str(torch.ops.etap.mla_decode_fp8.default._schema)
    assert schema.startswith("etap::mla_decode_fp8(Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, "
                             "float? softmax_scale, bool causal, bool fmla_lse, float? kv_scale) -> (Tensor, Tensor)"), schema
    assert str(torch.ops.etap.mla_decode.default._schema).startswith("etap::mla_decode(Tensor q, Tensor k_cache, ")
    with FakeTensorMode():
        for dtype in (torch.bfloat16, torch.float16):
            q = torch.empty(3, 2, 16, 576, dtype=dtype)
            bt = torch.empty(3, 4, dtype=torch.int32)
            sl = torch.empty(3, dtype=torch.int32)
            calls = [
                (torch.ops.etap.mla_decode, (torch.empty(10, 64, 1, 576, dtype=dtype),)),
                (torch.ops.etap.mla_decode_fp8, (torch.empty(10, 64, 1, 656, dtype=torch.uint8),), None),
                (torch.ops.etap.mla_decode_fp8, (torch.empty(10, 64, 1, 576, dtype=torch.uint8),), 0.5),
            ]
            for op, (k,), *scale in calls:
                out, lse = op(q, k, bt, sl, None, True, True, *scale)
                assert (tuple(out.shape), out.dtype) == ((3, 2, 16, 512), dtype)
                assert (tuple(lse.shape), lse.dtype) == ((3, 16, 2), torch.float32)


@pytest.mark.parametrize("fmt", ["fp8_656", "fp8_per_tensor"])
def test_fp8_custom_op_eager_opcheck_and_compile(torch_cuda, fmt):
    """torch.ops.etap.mla_decode_fp8 eagerly (every request against the float64 reference over
    the dequantized cache), under opcheck (the per-tensor cache: see below), and compiled
    (fullgraph) with new seqlens."""
    torch = torch_cuda
    import etap.ops  # noqa: F401 - registers the ops
    from etap import quant

    q, k, bt, sl = make_inputs(4, 2, 16, 1000, varlen=True, seed=43)
    sl[1] = 0
    if fmt == "fp8_656":
        k8, s = quant.quantize_fp8_656(k), None
    else:
        s = quant.per_tensor_scale(k)
        k8 = quant.quantize_e4m3_per_tensor(k, s)

    def check(o, l, sl, scale, empty_lse, what):
        ref_o, ref_l = mla_decode_fp8_reference(q, k8, bt, sl, s, softmax_scale=scale, causal=True, empty_lse=empty_lse)
        for i in range(q.shape[0]):
            v = max_violation(o[i : i + 1], l[i : i + 1], ref_o[i : i + 1], ref_l[i : i + 1])
            assert v <= 1.0, f"{what}: request {i}: error {v:.3f} x tolerance"

    out, lse = torch.ops.etap.mla_decode_fp8(q, k8, bt, sl, None, True, True, s)
    check(out, lse, sl, None, "+inf", "eager")
    out_n, lse_n = torch.ops.etap.mla_decode_fp8(q, k8, bt, sl, None, True, False, s)
    assert torch.isneginf(lse_n[1]).all() and torch.isposinf(lse[1]).all()
    # opcheck runs the op on copies of its inputs allocated to their last byte. A copy of
    # FlashMLA's cache lacks the last page's 65th token slot, which etap requires allocated (as
    # FlashMLA's quantizer allocates it), so opcheck runs on the per-tensor cache only: the op's
    # schema and fake implementation are the same for both formats. Its schema test compares
    # each input before and after with torch.allclose, which has no float8 kernel: the cache goes
    # in as its uint8 view, which the op takes as well.
    if fmt == "fp8_per_tensor":
        torch.library.opcheck(
            torch.ops.etap.mla_decode_fp8.default, (q, k8.view(torch.uint8), bt, sl, None, True, True, s),
            test_utils=("test_schema", "test_faketensor"),
        )

    def f(q, k8, bt, sl):
        o, l = torch.ops.etap.mla_decode_fp8(q, k8, bt, sl, 0.05, True, True, s)
        return o.float() * 2.0, l + 1.0

    sl2 = (sl // 2).contiguous()
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        for seqlens in (sl, sl2):  # new seqlens, same compiled function: re-planned inside the op
            o, l = compiled(q, k8, bt, seqlens)
            # o / 2 is the op's output exactly (its bf16 values, doubled in float32): back to bf16.
            check((o / 2.0).to(q.dtype), l - 1.0, seqlens, 0.05, "+inf", f"{backend}, seqlens {seqlens.tolist()}")


def test_custom_op_eager_opcheck_and_compile(torch_cuda):
    torch = torch_cuda
    import etap.ops  # noqa: F401 - registers torch.ops.etap.mla_decode

    q, k, bt, sl = make_inputs(4, 2, 16, 1000, varlen=True, seed=41)
    sl[1] = 0
    out, lse = torch.ops.etap.mla_decode(q, k, bt, sl, None, True, True)
    assert max_violation(out, lse, *mla_decode_reference(q, k, bt, sl)) <= 1.0
    out_n, lse_n = torch.ops.etap.mla_decode(q, k, bt, sl, None, True, False)
    assert torch.isneginf(lse_n[1]).all() and torch.isposinf(lse[1]).all()
    torch.library.opcheck(
        torch.ops.etap.mla_decode.default, (q, k, bt, sl, None, True, True), test_utils=("test_schema", "test_faketensor")
    )

    def f(q, k, bt, sl):
        o, l = torch.ops.etap.mla_decode(q, k, bt, sl, 0.05, True, True)
        return o.float() * 2.0, l + 1.0

    ref_o, ref_l = mla_decode_reference(q, k, bt, sl, softmax_scale=0.05)
    sl2 = (sl // 2).contiguous()
    ref2 = mla_decode_reference(q, k, bt, sl2, softmax_scale=0.05)
    # aot_eager: the op and its fake implementation traced without graph breaks; inductor: the
    # default backend, generating kernels around the op.
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        o2, l2 = compiled(q, k, bt, sl)
        # o2 / 2 is the op's output exactly (its bf16 values, doubled in float32): back to bf16,
        # whose tolerance max_violation applies.
        assert max_violation((o2 / 2.0).to(q.dtype), l2 - 1.0, ref_o, ref_l) <= 1.0, backend
        # New seqlens, same compiled function: re-planned inside the op.
        o3, l3 = compiled(q, k, bt, sl2)
        assert max_violation((o3 / 2.0).to(q.dtype), l3 - 1.0, *ref2) <= 1.0, backend


def test_bench_smoke(torch_cuda, capsys):
    from etap import bench

    assert bench.main(["--shape", "4,1,16,2048", "--shape", "2,2,64,1000", "--layers", "2", "--iters", "3"]) == 0
    text = capsys.readouterr().out
    assert "etap us" in text and text.count("\n") >= 3
    print(text)
    # etap's cache in pages of 16 rows (the peers', when importable, in pages of 64).
    assert bench.main(["--shape", "3,3,6,700", "--page-size", "16", "--layers", "2", "--iters", "3"]) == 0
    text = capsys.readouterr().out
    assert "etap's cache pages of 16 rows" in text and "   3   3    6    700 |" in text
    print(text)
