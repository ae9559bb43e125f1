"""``ETAP_DRY_RUN=1``: the GPU tests' own code, run on the CPU with the float64 reference in place of
the kernels. For a session without a GPU, to find the mistakes of new or changed GPU tests before
device time is spent on them (session 21 found two this way). It says nothing about the kernels.

    cd python/tests && ETAP_DRY_RUN=1 python -m pytest -q test_fp8_gpu.py -k packed

What is faked (conftest.py calls :func:`install` when the variable is set; everything in Python
above the native module runs as it is, the argument checks included):
- every tensor counts as being on cuda:0, ``torch.cuda.synchronize`` does nothing, the current
  stream is 0 and never capturing;
- ``etap._etap.Decoder``: a plan keeps its shape, its layout being ``_etap.validate_shape``'s; a
  decode writes the reference's out (rounded to out's dtype) and lse (float32; -inf for a
  (token, head) that sees no row, as the kernels write it) into the caller's tensors, found by
  their addresses among the tensors the argument checks have seen; a re-plan does nothing;
- ``etap.reference.make_inputs`` makes its tensors on the CPU unless told otherwise.

The tests that need a real device fail under it (CUDA graphs, side streams, a second device,
the benchmark, anything timed, a stale plan's defined result): select the ones to run."""

import torch

import etap
from etap import _checks, _etap, interface, reference

# Tensors the argument checks have seen, by address: the decode's buffers are among them.
_seen = {}


class DryRunPlan:
    """A plan: the shape it was made for and the layout a real one would pick."""

    def __init__(self, batch, s_q, h_q, num_pages, max_pages, page_size, total_q=None, kv_format=None,
                 kv_page_stride=None):
        self.shape = (batch, s_q, h_q, num_pages, max_pages, page_size)
        self.total_q = total_q
        self.kv_format = kv_format
        self.kv_page_stride = kv_page_stride
        self.layout = _etap.validate_shape(*self.shape, total_q=total_q, kv_format=kv_format,
                                           kv_page_stride=kv_page_stride)

    def __repr__(self):
        # As etap._etap.Plan's.
        b, s_q, h_q, num_pages, max_pages, page_size = self.shape
        tokens = f"s_q={s_q}" if self.total_q is None else f"total_q={self.total_q}, max_seqlen_q={s_q}"
        fmt = "" if self.kv_format is None else f", kv_format={self.kv_format}"
        fmt += "" if self.kv_page_stride is None else f", kv_page_stride={self.kv_page_stride}"
        return (f"etap.Plan(device=0, batch={b}, {tokens}, h_q={h_q}, num_pages={num_pages}, max_pages={max_pages}, "
                f"page_size={page_size}{fmt}, layout={self.layout})")


class DryRunDecoder:
    """``etap._etap.Decoder`` with the reference for its kernels."""

    def plan(self, batch, s_q, h_q, num_pages, max_pages, page_size, cache_seqlens, stream, total_q=None,
             kv_format=None, kv_page_stride=None):
        return DryRunPlan(batch, s_q, h_q, num_pages, max_pages, page_size, total_q, kv_format, kv_page_stride)

    def replan(self, plan, cache_seqlens, stream):
        pass

    def decode(self, plan, dtype, q, k_cache, block_table, cache_seqlens, out, lse, softmax_scale, stream,
               cu_seqlens_q=0):
        _write_reference(plan, (q, k_cache, block_table, cache_seqlens, out, lse), None, softmax_scale, cu_seqlens_q)

    def decode_fp8(self, plan, dtype, q, k_cache, block_table, cache_seqlens, out, lse, kv_scale, softmax_scale,
                   stream, cu_seqlens_q=0):
        _write_reference(plan, (q, k_cache, block_table, cache_seqlens, out, lse), kv_scale, softmax_scale,
                         cu_seqlens_q)


def _write_reference(plan, addresses, kv_scale, softmax_scale, cu_seqlens_q):
    q, k, bt, sl, out, lse = (_seen[a] for a in addresses)
    cu = _seen[cu_seqlens_q] if cu_seqlens_q else None
    if plan.kv_format is not None:
        k = k.view(torch.uint8)  # the reference dequantizes bytes (float8 has no CPU arithmetic)
        if cu is None:
            ro, rl = reference.mla_decode_fp8_reference(q, k, bt, sl, kv_scale, softmax_scale=softmax_scale,
                                                        empty_lse="-inf")
        else:
            ro, rl = reference.mla_decode_fp8_packed_reference(q, cu, k, bt, sl, kv_scale, plan.shape[1],
                                                               softmax_scale=softmax_scale, empty_lse="-inf")
    elif cu is None:
        ro, rl = reference.mla_decode_reference(q, k, bt, sl, softmax_scale=softmax_scale, empty_lse="-inf")
    else:
        ro, rl = reference.mla_decode_packed_reference(q, cu, k, bt, sl, plan.shape[1], softmax_scale=softmax_scale,
                                                       empty_lse="-inf")
    out.copy_(ro.to(out.dtype))
    lse.copy_(rl.float())


def install():
    """Put the fakes in place, for the whole test session."""
    check_tensor = _checks.require_tensor

    def require_tensor(name, t):
        check_tensor(name, t)
        _seen[t.data_ptr()] = t

    _checks.require_tensor = require_tensor
    _checks.device_of = lambda t: ("cuda", 0)
    torch.cuda.synchronize = lambda *args, **kw: None
    interface._stream_handle = lambda device: 0
    _etap.stream_capture_id = lambda decoder, stream: None
    dry = DryRunDecoder()
    interface.decoder = lambda device: dry
    etap.decoder = interface.decoder
    # The test modules import make_inputs after this (conftest.py runs first), and
    # make_packed_inputs calls it through the module.
    make_inputs = reference.make_inputs
    reference.make_inputs = lambda *args, device="cpu", **kw: make_inputs(*args, device=device, **kw)
