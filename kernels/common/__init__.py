"""The code the ops share: the chunkwise algorithm (``chunk_torch``: the CPU path,
``chunk_triton``: the Triton kernels), the recurrent decoding forward (``recurrent_torch``,
``recurrent_triton``), the backend choice (``dispatch``) and validation and layout helpers
(``utils``). The op folders (``gated_delta_rule``, ``linear_attn``) call in through
``dispatch``; nothing here is an op's public entry point."""
