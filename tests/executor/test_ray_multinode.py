"""Two Ray nodes on one machine (two raylets): TP=2 with SPREAD puts one rank on each node."""

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.executor.conftest import MAX_TOKENS, PROMPTS, greedy_tokens, make_llm
from zllm import SamplingParams

_STORE = 100 * 2**20


@pytest.fixture(scope="module")
def two_node_cluster():
    # The head node has no CPUs, so both rank bundles must land on the two worker nodes.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": _STORE, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"node_a": 1}, object_store_memory=_STORE)
    cluster.add_node(num_cpus=1, resources={"node_b": 1}, object_store_memory=_STORE)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_tp2_spread_over_two_nodes_matches_transformers(two_node_cluster, gqa_model,
                                                         reference_tokens):
    llm = make_llm(gqa_model, tensor_parallel_size=2, placement_strategy="SPREAD",
                   ray_address=two_node_cluster.address, engine_process=False)
    try:
        node_ids = llm.engine.engine_core.executor.node_ids
        assert len(set(node_ids)) == 2, "one rank per node"
        custom = {n["NodeID"]: {"node_a", "node_b"} & set(n["Resources"]) for n in ray.nodes()}
        assert set().union(*(custom[n] for n in node_ids)) == {"node_a", "node_b"}
        assert greedy_tokens(llm) == reference_tokens
    finally:
        llm.shutdown()


def test_a_node_that_leaves_mid_generation_is_replaced_and_nothing_is_lost(two_node_cluster,
                                                                           gqa_model,
                                                                           reference_tokens):
    # The rank on the node that leaves dies with it; the group is rebuilt on the node that
    # remains and one that joins (Ray places the group again), and generation resumes. A first
    # attempt may still meet the dying node (another restart, within max_worker_restarts); the
    # stats count rebuilds that succeeded.
    llm = make_llm(gqa_model, tensor_parallel_size=2, placement_strategy="SPREAD",
                   ray_address=two_node_cluster.address, engine_process=False,
                   execute_timeout_s=60, placement_timeout_s=120, max_worker_restarts=5)
    try:
        core = llm.engine.engine_core
        before = list(core.executor.node_ids)
        leaving = next(n for n in two_node_cluster.worker_nodes if n.node_id == before[1])
        for i, prompt in enumerate(PROMPTS):
            llm.engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS,
                                                                   temperature=0.0))
        llm.engine.step()  # the first step is in flight
        two_node_cluster.remove_node(leaving, allow_graceful=False)
        joined = two_node_cluster.add_node(num_cpus=1, object_store_memory=_STORE)
        outputs = {}
        while llm.engine.has_unfinished_requests():
            for out in llm.engine.step():
                outputs[out.request_id] = out.outputs[0].token_ids
        assert [outputs[f"r{i}"] for i in range(len(PROMPTS))] == reference_tokens
        assert core.stats.num_worker_restarts == 1
        # A new placement group (its old one lost a node), placed by SPREAD: which rank lands on
        # which of the two nodes is Ray's choice.
        assert set(core.executor.node_ids) == {before[0], joined.node_id}
    finally:
        llm.shutdown()
