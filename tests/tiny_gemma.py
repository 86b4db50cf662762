"""The tiny Gemma configuration shared by the distribution tests.

`tests/test_distribution.py` builds it in process for layout maps, and
`tests/distributed_jax_check.py` trains it on a simulated 8-device mesh in
a subprocess; both must agree on the layer paths (`QUERY`).
"""

CONFIG = dict(
    vocabulary_size=64,
    num_layers=1,
    num_query_heads=4,
    num_key_value_heads=4,
    hidden_dim=16,
    intermediate_dim=32,
    head_dim=8,
)
QUERY = "decoder_block_0/attention/query"
