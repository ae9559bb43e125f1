"""The torch custom op (torch.ops.etap.mla_decode) under torch.compile, and a smoke run of
python -m etap.bench. GPU only."""

from etap.reference import make_inputs, max_violation, mla_decode_reference


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
        assert max_violation(o2 / 2.0, l2 - 1.0, ref_o, ref_l) <= 1.0, backend
        # New seqlens, same compiled function: re-planned inside the op.
        o3, l3 = compiled(q, k, bt, sl2)
        assert max_violation(o3 / 2.0, l3 - 1.0, *ref2) <= 1.0, backend


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
