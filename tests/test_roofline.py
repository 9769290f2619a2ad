"""The roofline floors that `zllm bench throughput` reports its figures against."""

from zllm.architecture import ModelArchitecture
from zllm.bench.roofline import Hardware, ModelCost
from zllm.bench.throughput import model_dir_for

H200 = Hardware(copy_bytes_per_s=4.15e12, matmul_flops_per_s=790e12)


def test_op_floor_adds_what_the_step_floor_overlaps():
    cost = ModelCost(ModelArchitecture.from_model_dir(model_dir_for("llama-3.1-8b")))
    # A decode step of W1 at 256 requests: the weight GEMMs are compute-bound (256 rows), the
    # KV read is bandwidth-bound, and run one after the other they cannot hide each other.
    decode = [(640, 1)] * 256
    step, ops = cost.floor_s(H200, decode, 256), cost.op_floor_s(H200, decode, 256)
    nbytes, flops = cost.step(decode, 256)
    assert step == max(nbytes / H200.copy_bytes_per_s, flops / H200.matmul_flops_per_s)
    assert 1.1 * step < ops < nbytes / H200.copy_bytes_per_s + flops / H200.matmul_flops_per_s
    # A batch-1 decode reads weights and KV alike (both bandwidth-bound): the floors agree.
    assert abs(cost.op_floor_s(H200, [(640, 1)], 1) - cost.floor_s(H200, [(640, 1)], 1)) < 1e-12
    # A prefill step is compute-bound throughout: the floors agree.
    prefill = [(0, 512)] * 16
    assert abs(cost.op_floor_s(H200, prefill, 16) - cost.floor_s(H200, prefill, 16)) < 1e-9
