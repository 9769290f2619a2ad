"""Two Ray nodes on one machine (two raylets): TP=2 with SPREAD puts one rank on each node."""

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.executor.conftest import greedy_tokens, make_llm

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
